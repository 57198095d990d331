"""Teacher soft-label cache that stays correct under augmentation.

Distillation pays a teacher forward pass for every student step, and users train many
students against one teacher. Caching the teacher's logits per *image* would be wrong as
soon as the images are augmented: the student sees a different crop and flip every epoch.
But kdistill's augmentation is replayable: the crop offsets (or random-resized-crop
boxes) and flips of every sample in every epoch are a pure function of (seed, epoch, sample index)
(:func:`kdistill.data.loader.epoch_views`). So the cache runs the teacher once over E
epochs of augmented views and stores its logits by (epoch, sample index); a distillation
run with the same seed and augmentation then replays the very same views and reads the
logits instead of running the teacher. The shuffling order does not matter (logits are
stored by sample index), so the batch size may differ between the cache and the run.

Storage: float16 logits, (E, N, K): 30 epochs of CIFAR-10 (N = 50,000, K = 10) take 30 MB.
For many classes, ``top_k`` keeps only the k largest logits of each view (values + class
indices) and one value for all the others, their mean: KD's soft targets are dominated by
the top classes, and the cache shrinks by about K / (1.5 k).

With ``train.view_period`` P the views repeat every P epochs (epoch e shows each sample
as epoch e mod P did, in its own shuffled order): a cache of P epochs then serves a run of
any length, and a live-teacher distillation builds one in memory before training.

The cache records a fingerprint (a digest of the training images and labels, of the
normalisation, of the teacher's weights; the augmentation settings, seed and number of
samples) and refuses to serve a run whose fingerprint differs, naming what differs.
Methods that need the teacher's stage features (fitnets, at, crd, ...) cannot use a logit
cache; the distillation task refuses that combination.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.errors import CacheError, CheckpointError
from kdistill.files import atomic_write
from kdistill.progress import log, progress

FORMAT = "kdistill-teacher-cache/1"
DTYPES = {"float16": torch.float16, "float32": torch.float32}

# what each fingerprint key means, for error messages
FINGERPRINT_KEYS = {
    "data": "training images and labels",
    "num_samples": "number of training samples",
    "normalize": "normalisation (mean/std)",
    "augment": "data.augment",
    "crop_padding": "data.crop_padding",
    "flip": "data.flip",
    "resized_crop": "data.augmentation: random_resized_crop (train_size, crop_scale, crop_ratio)",
    "train_size": "data.train_size",
    "view_period": "train.view_period (the augmentation repeats every P epochs)",
    "seed": "seed",
    "teacher": "teacher weights",
    "teacher_temperature": "ensemble temperature (the teachers' soft outputs are averaged at the method's T)",
    "teacher_input": "the teacher's input (teacher.input_size, mean, std)",
}


DIGEST_CHUNK_BYTES = 64 << 20  # a large tensor is hashed in slices of about this size


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 of the tensors' shapes, dtypes and bytes (any dtype, any device, any layout)."""
    digest = hashlib.sha256()
    for t in tensors:
        _digest_rows(digest, t)
    return digest.hexdigest()


def _digest_rows(digest, t: Tensor, rows: Tensor | None = None) -> None:
    """Feed ``t[rows]`` (default all of ``t``) to ``digest`` as :func:`tensor_digest` does,
    a slice of rows at a time: a memory-mapped data set is never copied whole."""
    t = t.detach()
    if t.dim() == 0:
        digest.update(f"{()}{t.dtype}".encode())
        digest.update(t.reshape(1).cpu().view(torch.uint8).numpy())
        return
    n = len(rows) if rows is not None else len(t)
    digest.update(f"{(n, *t.shape[1:])}{t.dtype}".encode())
    step = max(1, DIGEST_CHUNK_BYTES // max(1, t[:1].numel() * t.element_size()))
    for start in range(0, n, step):
        part = t[rows[start : start + step]] if rows is not None else t[start : start + step]
        digest.update(part.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def weights_digest(model: nn.Module) -> str:
    """Identity of a model's weights: names and values of its whole state dict."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_digest(value).encode())
    return digest.hexdigest()


def fingerprint(loader, teacher: nn.Module) -> dict[str, Any]:
    """What the cached logits depend on, for a :class:`~kdistill.data.loader.TrainLoader`."""
    norm = loader.normalize
    return {
        "data": _data_digest(loader),
        "num_samples": len(loader.labels),
        "normalize": tensor_digest(norm.scale, norm.shift) if norm is not None else None,
        "augment": loader.augment,
        "crop_padding": loader.padding,
        "flip": loader.flip,
        # None without them, as in caches made before they existed
        "resized_crop": _plain(loader.resized_crop),
        "train_size": loader.size,
        # None without it, as in caches made before it existed
        "view_period": getattr(loader, "view_period", 0) or None,
        "seed": loader.seed,
        "teacher": weights_digest(teacher),
        # an ensemble's combined logits depend on the temperature of its averaging
        "teacher_temperature": getattr(teacher, "temperature", None),
        # a teacher at its own resolution or normalisation (None: the data's view, as before)
        "teacher_input": _teacher_input(teacher),
    }


def _data_digest(loader) -> str:
    """The digest of the training inputs and labels, as :func:`tensor_digest` of the
    training set's own tensors would give (read a slice at a time)."""
    digest = hashlib.sha256()
    _digest_rows(digest, loader.inputs, getattr(loader, "rows", None))
    _digest_rows(digest, loader.labels)
    return digest.hexdigest()


def _teacher_input(teacher: nn.Module) -> dict[str, Any] | None:
    adapter = getattr(teacher, "kdistill_input", None)
    return adapter.record() if adapter is not None else None


def _plain(value: Any) -> Any:
    """Tuples as lists, as a saved and loaded fingerprint holds them."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def _short(value: Any) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else repr(value)


@dataclass
class TeacherCache:
    """Teacher logits of every sample's view in every epoch of a run.

    Either ``logits`` (E, N, K) or, with top-k storage, ``values`` (E, N, k), ``classes``
    (E, N, k) and ``tail`` (E, N): the value of every logit outside the top k.
    """

    fingerprint: dict[str, Any]
    epochs: int
    num_samples: int
    num_classes: int
    logits: Tensor | None = None
    values: Tensor | None = None
    classes: Tensor | None = None
    tail: Tensor | None = None
    path: Path | None = None
    build_seconds: float | None = None  # what running the teacher over the views took, once for every run it serves

    @property
    def period(self) -> int:
        """P > 0: the cache holds the views of the first P epochs, which every later epoch
        repeats (``train.view_period``); 0: one entry per epoch of the run."""
        return self.fingerprint.get("view_period") or 0

    @property
    def top_k(self) -> int:
        return 0 if self.values is None else self.values.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (self.logits, self.values, self.classes, self.tail) if t is not None
        )

    def describe(self) -> str:
        store = f"top-{self.top_k} logits" if self.top_k else f"{str(self.logits.dtype).removeprefix('torch.')} logits"
        return f"{self.epochs} epochs x {self.num_samples} samples x {self.num_classes} classes, {store}, {self.nbytes / 1e6:.1f} MB"

    def to(self, device: torch.device) -> TeacherCache:
        move = {
            k: getattr(self, k).to(device)
            for k in ("logits", "values", "classes", "tail")
            if getattr(self, k) is not None
        }
        return TeacherCache(
            self.fingerprint,
            self.epochs,
            self.num_samples,
            self.num_classes,
            path=self.path,
            build_seconds=self.build_seconds,
            **move,
        )

    def lookup(self, epoch: int, indices: Tensor) -> Tensor:
        """Teacher logits (B, K), float32, of the samples ``indices`` as epoch ``epoch`` shows them."""
        if self.period:
            epoch %= self.period
        if self.logits is not None:
            return self.logits[epoch, indices].float()
        tail = self.tail[epoch, indices].float()  # (B,)
        out = tail[:, None].expand(-1, self.num_classes).clone()  # (B, K)
        return out.scatter_(1, self.classes[epoch, indices].long(), self.values[epoch, indices].float())

    def check(self, expected: dict[str, Any], epochs: int) -> None:
        """Refuse a run whose fingerprint differs from the cache's, or that trains longer."""
        where = f"teacher cache {self.path}" if self.path else "the teacher cache"
        diffs = [
            f"{FINGERPRINT_KEYS.get(k, k)} (cache {_short(self.fingerprint.get(k))}, this run {_short(v)})"
            for k, v in expected.items()
            if self.fingerprint.get(k) != v
        ]
        if diffs:
            raise CacheError(
                f"{where} was made for another run: {'; '.join(diffs)}. Rebuild it with `kdistill cache-teacher` for this data, teacher, seed and augmentation"
            )
        if epochs > self.epochs and not (self.period and self.epochs >= self.period):
            raise CacheError(
                f"{where} holds {self.epochs} epochs of teacher outputs but this run trains {epochs}; rebuild it with --epochs {epochs} or train for at most {self.epochs} epochs"
            )

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash or a full disk leaves the old file or the new one."""
        path = Path(path)
        tensors = {
            k: getattr(self, k).cpu() for k in ("logits", "values", "classes", "tail") if getattr(self, k) is not None
        }
        state = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "epochs": self.epochs,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "build_seconds": self.build_seconds,
            **tensors,
        }
        try:  # the checkpoints' writer: temporary file, fsync, rename, fsync of the folder
            atomic_write(path, lambda f: torch.save(state, f), "teacher cache")
        except CheckpointError as e:
            raise CacheError(str(e)) from None
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        path = Path(path)
        if not path.is_file():
            raise CacheError(
                f"teacher cache {path} does not exist; make one with `kdistill cache-teacher --out {path}`"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CacheError(
                f"teacher cache {path} refused: it holds objects other than tensors and plain data"
            ) from None
        except Exception as e:  # garbage fails in many ways
            raise CacheError(f"teacher cache {path} is unreadable or truncated ({e.__class__.__name__})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CacheError(f"{path} is not a kdistill teacher cache (expected format {FORMAT!r})")
        try:
            return cls(
                state["fingerprint"],
                int(state["epochs"]),
                int(state["num_samples"]),
                int(state["num_classes"]),
                state.get("logits"),
                state.get("values"),
                state.get("classes"),
                state.get("tail"),
                path,
                state.get("build_seconds"),  # None in a cache written before it was recorded
            )
        except KeyError as e:
            raise CacheError(f"teacher cache {path} lacks the key {e.args[0]!r}") from None


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    loader,
    epochs: int,
    *,
    batch_size: int = 500,
    autocast=None,
    top_k: int = 0,
    dtype: str = "float16",
    desc: str = "teacher cache",
) -> TeacherCache:
    """Run ``teacher`` over ``epochs`` epochs of ``loader``'s augmented views (a
    :class:`~kdistill.data.loader.TrainLoader`) and keep its logits by (epoch, sample)."""
    if dtype not in DTYPES:
        raise CacheError(f"teacher cache dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if top_k < 0:
        raise CacheError(f"teacher cache top_k={top_k}: expected 0 (all logits) or a positive number")
    fp = fingerprint(loader, teacher)
    device, n = loader.device, len(loader.labels)
    was_training = teacher.training
    teacher.eval()
    store: dict[str, Tensor] = {}
    k = num_classes = 0
    work = [(epoch, start) for epoch in range(epochs) for start in range(0, n, batch_size)]
    # under torchrun every rank runs the teacher on its share of the work; the shares are
    # merged below with one all-reduce (MAX over a store filled with -inf / -1, so the
    # entries a rank did not compute never win). A rank without a share redoes the first
    # item: the same inputs and weights give the same values, so MAX keeps them.
    rank, world = distributed.shard()
    mine = work[rank::world] or work[:1]
    views, views_epoch = None, -1
    for epoch, start in progress(mine, total=len(mine), desc=desc):
        if epoch != views_epoch:
            views, views_epoch = loader.device_views(epoch), epoch
        idx = torch.arange(start, min(start + batch_size, n), device=device)
        with autocast or contextlib.nullcontext():
            z = teacher(loader.batch(idx, views).images).float()  # (b, K)
        if not store:  # first batch: the class count is now known
            num_classes = z.shape[1]
            k = top_k if 0 < top_k < num_classes else 0
            low = float("-inf") if world > 1 else None  # the merge's neutral value (see above)

            def new(shape, dtype_, fill=low):
                return (
                    torch.empty(shape, dtype=dtype_, device=device)
                    if fill is None
                    else torch.full(shape, fill, dtype=dtype_, device=device)
                )

            if k:
                index_dtype = (
                    torch.uint8 if num_classes <= 256 else torch.int16 if num_classes <= 32767 else torch.int32
                )
                store["values"] = new((epochs, n, k), torch.float16)
                store["classes"] = new((epochs, n, k), index_dtype, None if world == 1 else 0)
                store["tail"] = new((epochs, n), torch.float16)
            else:
                store["logits"] = new((epochs, n, num_classes), DTYPES[dtype])
        if k:
            values, classes = z.topk(k, dim=1)
            store["values"][epoch, idx] = values.half()
            store["classes"][epoch, idx] = classes.to(store["classes"].dtype)
            store["tail"][epoch, idx] = ((z.sum(1) - values.sum(1)) / (num_classes - k)).half()
        else:
            store["logits"][epoch, idx] = z.to(store["logits"].dtype)
    teacher.train(was_training)
    if world > 1:
        done = torch.zeros(epochs, n, dtype=torch.int32, device=device)  # which entries this rank computed
        for epoch, start in mine:
            done[epoch, start : start + batch_size] = 1
        for key, t in store.items():
            if key == "classes":  # integers: entries not computed here are -1 for the MAX
                merged = torch.where(done[..., None].bool(), t.to(torch.int32), -1)
            else:
                merged = t.float()
            distributed.all_reduce_max(merged)
            store[key] = merged.to(t.dtype)
    cache = TeacherCache(fp, epochs, n, num_classes, **store)
    log(f"{desc}: {cache.describe()}")
    return cache
