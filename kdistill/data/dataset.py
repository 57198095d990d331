"""Data sets as in-memory uint8 tensors, whatever their source.

``load_dataset("cifar10-mini" | "cifar10" | "cifar100" | path)`` returns an
:class:`ImageDataset`; a path is an ImageFolder folder or archive (``imagefolder.py``) or a
CSV/JSONL manifest (``manifest.py``), split into train/validation/test when it has no test
split of its own (``split.py``). Decoding JPEGs is slow, so decoded arrays are cached on
disk, keyed by the source's checksum, the split made of it (:func:`source_key`) the
image size and the resize policy: a second run on the same data loads them in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.data import split as splitting
from kdistill.data.archive import sha256_file
from kdistill.data.cifar import load_cifar
from kdistill.data.imagefolder import (
    LAYOUT_RULES,
    RESIZE_POLICIES,
    decode,
    folders_of,
    is_archive,
    own_splits,
    read_imagefolder,
)
from kdistill.data.manifest import is_manifest, read_manifest
from kdistill.errors import CheckpointError, DataError
from kdistill.files import TMP_SUFFIX, atomic_write, atomic_write_text
from kdistill.progress import log

BUNDLED = {"cifar10-mini": Path(__file__).parent / "bundled" / "cifar10-mini.tar.gz"}
DOWNLOADABLE = ("cifar10", "cifar100")
CACHE_VERSION = 1


def default_data_dir() -> Path:
    """$KDISTILL_CACHE, else $XDG_CACHE_HOME/kdistill, else ~/.cache/kdistill."""
    if os.environ.get("KDISTILL_CACHE"):
        return Path(os.environ["KDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdistill"


@dataclass(frozen=True)
class ImageDataset:
    """A classification data set held in memory. Images are uint8 (N, 3, H, W)."""

    name: str
    classes: list[str]
    train_images: Tensor
    train_labels: Tensor  # int64 (N,)
    test_images: Tensor
    test_labels: Tensor
    checksum: str  # identifies the source data (and the decoding), for caches and fingerprints
    source: str = ""  # what to pass to load_dataset to load it again (name or absolute path)
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    val_split: dict | None = None  # {"size": N, "seed": S}: how the validation images were drawn
    split: dict | None = None  # the split kdistill made of the source's files (kdistill.data.split.describe)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        x = self.train_images.float().div_(255)
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()

    def with_validation(self, val_size: int, seed: int = 0) -> ImageDataset:
        """Hold out ``val_size`` training images (a seeded random subset) as a validation split."""
        if val_size == 0:
            return self
        n = len(self.train_labels)
        if val_size >= n:
            raise DataError(f"data.val_size={val_size} must be smaller than the {n} training images of {self.name}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        keep, val = perm[val_size:].sort().values, perm[:val_size].sort().values
        return replace(
            self,
            train_images=self.train_images[keep],
            train_labels=self.train_labels[keep],
            val_images=self.train_images[val],
            val_labels=self.train_labels[val],
            val_split={"size": val_size, "seed": seed},
        )


def _folder_signature(root: Path) -> str:
    """Cheap identity of a folder tree: names, sizes and modification times of its files."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_key(checksum: str, split: tuple[float, float, int] | None) -> str:
    """What the decoded arrays of a source depend on besides the image size: the source's
    checksum (its files), the rules that pick and group its images (``LAYOUT_RULES``), and
    the split made of them (fractions and seed; the layout is the source's own)."""
    key = f"{checksum}\0rules={LAYOUT_RULES}"
    if split is not None:
        val, test, seed = float(split[0]), float(split[1]), int(split[2])  # 0 and 0.0 are one split
        key += f"\0split={json.dumps([val, test, seed])}"
    return hashlib.sha256(key.encode()).hexdigest()


def _own_splits(source: Path, checksum: str, data_dir: Path) -> tuple[str, ...]:
    """The splits a folder or archive brings itself (``imagefolder.own_splits``); an
    archive's are remembered by its checksum in ``data_dir/layouts/``, since listing a
    .tar.gz reads all of it (6.8 s for the 60,000 CIFAR-10 JPEGs)."""
    if source.is_dir():
        return own_splits(source)
    path = data_dir / "layouts" / f"{checksum[:32]}-r{LAYOUT_RULES}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return tuple(json.loads(path.read_text())["own"])
    own = own_splits(source)
    with contextlib.suppress(CheckpointError):  # only a speed-up
        atomic_write_text(path, json.dumps({"own": list(own)}), "data set layout")
    return own


def _cache_path(data_dir: Path, checksum: str, image_size: int, resize: str = "crop") -> Path:
    return data_dir / "decoded" / f"{checksum[:32]}-{image_size}px-{resize}-v{CACHE_VERSION}.npz"


STALE_SECONDS = 3600  # a temporary file this old is a killed writer's leftover, not a live one's


def _save_cache(path: Path, arrays: dict[str, np.ndarray], classes: list[str]) -> None:
    """Write atomically (a killed run never leaves a half-written cache) and remove the
    temporaries that killed writers left behind earlier."""
    now = time.time()
    for tmp in path.parent.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()
    atomic_write(path, lambda f: np.savez(f, classes=np.array(classes), **arrays), "decoded-image cache")


def _load_cache(path: Path) -> tuple[dict[str, np.ndarray], list[str]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "classes"}
            return arrays, [str(c) for c in z["classes"]]
    except (OSError, ValueError, KeyError):
        return None  # missing or corrupt: decode again


def load_dataset(
    dataset: str | Path = "cifar10-mini",
    image_size: int = 32,
    data_dir: Path | None = None,
    download: bool = True,
    val_size: int = 0,
    seed: int = 0,
    resize: str = "crop",
    split: dict | None = None,
) -> ImageDataset:
    """Load a data set by name (cifar10-mini, cifar10, cifar100), ImageFolder folder or
    archive, or CSV/JSONL manifest, its images at ``image_size`` x ``image_size``
    (``resize``: ``crop``, the shorter side to the size and a centre crop, or ``squash``;
    see :func:`kdistill.data.imagefolder._resized`). ``split`` is ``data.split`` ({"val",
    "test", "seed"}) or a checkpoint's record of its split (then a split that came out
    otherwise is warned of); ``val_size`` images are drawn from the training images with
    ``seed`` afterwards."""
    if resize not in RESIZE_POLICIES:
        raise DataError(f"data.resize={resize!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    name = str(dataset)
    if name in DOWNLOADABLE:
        return _load_downloadable(name, image_size, data_dir, download, split, val_size).with_validation(val_size, seed)

    source = BUNDLED.get(name, Path(name).expanduser())
    if not source.exists():
        known = ", ".join([*BUNDLED, *DOWNLOADABLE])
        raise DataError(
            f"data set {name!r} not found: expected one of {known}, a path to an ImageFolder folder or archive, "
            "or a .csv/.jsonl manifest"
        )
    listing = None
    if source.is_dir() or is_archive(source):
        checksum = "dir-" + _folder_signature(source) if source.is_dir() else sha256_file(source)
        own = _own_splits(source, checksum, data_dir)
        how = splitting.resolve(split, own, val_size, str(source), folders_of(own))
    elif is_manifest(source):
        listing, checksum = read_manifest(source, split, val_size)
        how = _how(listing.record)
    else:
        raise DataError(
            f"data set {name!r}: {source} is neither a folder nor an archive (.tar, .tar.gz, .zip) or manifest (.csv, .jsonl)"
        )
    cache = _cache_path(data_dir, source_key(checksum, how), image_size, resize)
    cached = _load_cache(cache) if cache.exists() else None
    if cached is not None:
        arrays, classes = cached
    else:
        log(f"decoding {source} (cached afterwards in {cache.parent})")
        request = None if how is None else {"val": how[0], "test": how[1] or None, "seed": how[2]}
        listing = listing or read_imagefolder(source, request, val_size)
        splits = decode(listing, image_size, resize)
        classes = listing.classes
        arrays = {f"{s}_{kind}": a for s, (x, y) in splits.items() for kind, a in (("images", x), ("labels", y))}
        arrays["split_record"] = np.array(json.dumps(listing.record))  # a string, kept with the arrays it describes
        try:
            _save_cache(cache, arrays, classes)
        except CheckpointError as e:  # only a speed-up: the run goes on without it
            log(f"warning: {e}")
    record = json.loads(str(arrays["split_record"])) if "split_record" in arrays else None
    _check_recorded(split, record, source)
    ds = ImageDataset(
        name=source.name.split(".")[0] if name not in BUNDLED else name,
        classes=classes,
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        checksum=checksum,
        source=name if name in BUNDLED else str(source.resolve()),
        val_images=torch.from_numpy(arrays["val_images"]) if "val_images" in arrays else None,
        val_labels=torch.from_numpy(arrays["val_labels"]) if "val_labels" in arrays else None,
        split=record,
    )
    return ds.with_validation(val_size, seed)


def _load_downloadable(
    name: str, image_size: int, data_dir: Path, download: bool, split: dict | None, val_size: int
) -> ImageDataset:
    if splitting.resolve(split, ("test",), val_size, name, "its official test set"):
        raise DataError(f"data.split.val: {name} comes as arrays; hold out validation images with data.val_size")
    arrays = load_cifar(name, data_dir / name, download=download)
    if image_size != 32:
        raise DataError(f"data.image_size={image_size}: {name} images are 32x32; use image_size: 32")
    return ImageDataset(
        name=name,
        classes=list(arrays.classes),
        train_images=torch.from_numpy(arrays.train_images),
        train_labels=torch.from_numpy(arrays.train_labels),
        test_images=torch.from_numpy(arrays.test_images),
        test_labels=torch.from_numpy(arrays.test_labels),
        checksum=f"{name}-official",
        source=name,
    )


def _how(record: dict | None) -> tuple[float, float, int] | None:
    """The (val, test, seed) a split record was made with; None when the source split itself."""
    if record is None or record.get("seed") is None:
        return None
    return record["val"], record["test"] or 0.0, record["seed"]


def _check_recorded(split: dict | None, record: dict | None, source: Path) -> None:
    """A checkpoint's record of its split, given back as ``split``: warn when the same
    fractions and seed now assign the files otherwise (the files changed since)."""
    theirs = (split or {}).get("fingerprint")
    if theirs and record and theirs != record["fingerprint"]:
        log(
            f"warning: {source}: the recorded split (fingerprint {theirs}, {split.get('counts')}) is not this one "
            f"({record['fingerprint']}, {record['counts']}): its files changed since, so the test images are not the same"
        )
