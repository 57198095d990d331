"""Data sets as uint8 tensors, whatever their source.

``load_dataset("cifar10-mini" | "cifar10" | "cifar100" | path)`` returns an
:class:`ImageDataset`; a path is an ImageFolder folder or archive (``imagefolder.py``) or a
CSV/JSONL manifest (``manifest.py``), split into train/validation/test when it has no test
split of its own (``split.py``). Decoding JPEGs is slow and decoded images can be larger
than memory, so they are decoded once into a data store on disk (:mod:`kdistill.data.store`),
keyed by the source's checksum and the split made of it (:func:`source_key`), the image
size and the resize policy, and read back through a memory map: a second run on the same
data opens it in well under a second, and every process on the machine shares its pages
through the page cache instead of holding a copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
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
    Listing,
    decode,
    folders_of,
    is_archive,
    own_splits,
    read_imagefolder,
)
from kdistill.data.manifest import is_manifest, read_manifest
from kdistill.data.store import Allocate, Build, StoreUnwritable, open_or_build
from kdistill.errors import CheckpointError, DataError
from kdistill.files import TMP_SUFFIX, atomic_write_text
from kdistill.progress import log

BUNDLED = {"cifar10-mini": Path(__file__).parent / "bundled" / "cifar10-mini.tar.gz"}
DOWNLOADABLE = ("cifar10", "cifar100")
CACHE_VERSION = 3  # 1: .npz files; 2: data stores (kdistill.data.store); 3: the training split packed


def default_data_dir() -> Path:
    """$KDISTILL_CACHE, else $XDG_CACHE_HOME/kdistill, else ~/.cache/kdistill."""
    if os.environ.get("KDISTILL_CACHE"):
        return Path(os.environ["KDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdistill"


@dataclass(frozen=True)
class ImageDataset:
    """A classification data set. Images are uint8 (N, 3, H, W), in memory or memory-mapped
    from a data store.

    A validation split held out of the training images (:meth:`with_validation`) keeps
    index arrays instead of copies: ``train_rows`` / ``val_rows`` are then the rows of
    ``train_images`` / ``val_images`` that form the split (None: every row, in order), so a
    memory-mapped set is never gathered whole. :meth:`images` gives a split as one tensor.
    """

    name: str
    classes: list[str]
    train_images: Tensor
    train_labels: Tensor  # int64 (N,): the labels of the split (of train_images[train_rows])
    test_images: Tensor
    test_labels: Tensor
    checksum: str  # identifies the source data (and the decoding), for caches and fingerprints
    source: str = ""  # what to pass to load_dataset to load it again (name or absolute path)
    val_images: Tensor | None = None
    val_labels: Tensor | None = None
    val_split: dict | None = None  # {"size": N, "seed": S}: how the validation images were drawn
    split: dict | None = None  # the split kdistill made of the source's files (kdistill.data.split.describe)
    train_rows: Tensor | None = None  # int64 (N,): rows of train_images in the training split
    val_rows: Tensor | None = None  # int64 (N_val,): rows of val_images in the validation split
    # the training images packed a pixel per int32, (N, H+1, W+1) (loader.pack_pixels's layout),
    # when a data store keeps them so: train_images is then a view of them, and TrainLoader's
    # crops read them in place (TrainLoader(pixels=...))
    train_pixels: Tensor | None = None

    def __post_init__(self) -> None:
        # pixels that are not what train_images views (a dataclasses.replace of the images,
        # e.g. a subset) are dropped: the loader then packs each batch from the images
        if self.train_pixels is not None and not _views_pixels(self.train_images, self.train_pixels):
            object.__setattr__(self, "train_pixels", None)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])

    def images(self, split: str) -> Tensor:
        """The images of ``split`` ("train", "val", "test") as one tensor: a copy when the
        split is a subset of rows, which reads every image (mind the memory)."""
        images, rows = {
            "train": (self.train_images, self.train_rows),
            "val": (self.val_images, self.val_rows),
            "test": (self.test_images, None),
        }[split]
        return images if rows is None or images is None else images[rows]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in [0, 1] units."""
        return channel_mean_std(self.train_images, self.train_rows)

    def with_validation(self, val_size: int, seed: int = 0) -> ImageDataset:
        """Hold out ``val_size`` training images (a seeded random subset) as a validation
        split: index arrays into the same images, no copy of them."""
        if val_size == 0:
            return self
        n = len(self.train_labels)
        if val_size >= n:
            raise DataError(f"data.val_size={val_size} must be smaller than the {n} training images of {self.name}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        keep, val = perm[val_size:].sort().values, perm[:val_size].sort().values
        rows = self.train_rows if self.train_rows is not None else torch.arange(n)
        return replace(
            self,
            train_labels=self.train_labels[keep],
            train_rows=rows[keep],
            val_images=self.train_images,
            val_labels=self.train_labels[val],
            val_rows=rows[val],
            val_split={"size": val_size, "seed": seed},
        )


def _views_pixels(images: Tensor, pixels: Tensor) -> bool:
    """Whether ``images`` (N, C, H, W) is exactly the view of the packed ``pixels``
    (N, H+1, W+1) that :func:`_unpacked` makes (same memory, same rows, same strides)."""
    N, C, H, W = images.shape
    P = pixels.element_size()
    return (
        tuple(pixels.shape) == (N, H + 1, W + 1)
        and C <= P
        and images.dtype == torch.uint8
        and images.data_ptr() == pixels.data_ptr()
        and images.stride() == ((H + 1) * (W + 1) * P, 1, (W + 1) * P, P)
    )


CHUNK_VALUES = 1 << 20  # values per chunk of a whole-set reduction (4 MB as int32), whatever the set's size


def channel_mean_std(images: Tensor, rows: Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images (N, C, H, W) (their ``rows``
    only, if given), in [0, 1] units, read in chunks of about ``CHUNK_VALUES`` values: the
    sums are exact integers, so the result depends neither on the chunking nor on the
    memory layout, and a memory-mapped set is never read whole into memory."""
    n = len(rows) if rows is not None else len(images)
    C, H, W = images.shape[1:]
    step = max(1, CHUNK_VALUES // (C * H * W))
    total = torch.zeros(C, dtype=torch.float64)
    squares = torch.zeros(C, dtype=torch.float64)
    for start in range(0, n, step):
        chunk = images[rows[start : start + step]] if rows is not None else images[start : start + step]
        x = chunk.to(torch.int32)  # exact: a square is at most 255^2; sums accumulate in int64
        total += x.sum(dim=(0, 2, 3), dtype=torch.int64).cpu().double()
        squares += (x * x).sum(dim=(0, 2, 3), dtype=torch.int64).cpu().double()
    count = n * H * W
    mean = total / count
    var = (squares - count * mean * mean) / max(count - 1, 1)
    return (mean / 255).tolist(), (var.clamp_min(0).sqrt() / 255).tolist()


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


def _cache_path(data_dir: Path, key: str, image_size: int, resize: str = "crop") -> Path:
    return data_dir / "decoded" / f"{key[:32]}-{image_size}px-{resize}-v{CACHE_VERSION}.kdstore"


STALE_SECONDS = 3600  # a temporary file this old is a killed writer's leftover, not a live one's


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries that killed writers of other stores left behind long ago."""
    now = time.time()
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                tmp.unlink()


PIXEL_BYTES = 4  # a stored training pixel: its RGB bytes and a zero byte, read as one int32


def _image_spec(split: str, n: int, shape: tuple[int, int, int]) -> tuple[str, tuple[tuple[int, ...], str]]:
    """The store array that holds a split's images (name, (shape, dtype)): the training split
    packed a pixel per int32, (N, H+1, W+1, 4) bytes with a zero 4th byte, last row and last
    column (:func:`kdistill.data.loader.pack_pixels`'s layout, so the crops read it straight
    from the map: 1.33-1.45x the bytes); the other splits as (N, C, H, W)."""
    C, H, W = shape
    if split == "train" and C <= PIXEL_BYTES:
        return "train_pixels", ((n, H + 1, W + 1, PIXEL_BYTES), "uint8")
    return f"{split}_images", ((n, C, H, W), "uint8")


def _images_view(name: str, array: np.ndarray, channels: int) -> np.ndarray:
    """The (N, C, H, W) images of the store array ``name`` (a view: written through, no copy)."""
    if name != "train_pixels":
        return array
    return array[:, :-1, :-1, :channels].transpose(0, 3, 1, 2)


def _unpacked(tensors: dict[str, Tensor], channels: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """The store's tensors with ``train_images`` as the (N, C, H, W) view of the packed
    ``train_pixels``, and those pixels as int32 (N, H+1, W+1) (None when not packed)."""
    if "train_pixels" not in tensors:
        return tensors, None
    tensors = dict(tensors)
    packed = tensors.pop("train_pixels")
    tensors["train_images"] = packed[:, :-1, :-1, :channels].permute(0, 3, 1, 2)
    return tensors, packed.view(torch.int32).view(packed.shape[:3])


def _listing_build(listing: Callable[[], Listing], image_size: int, resize: str) -> Build:
    """A store build that lists the source (``listing()``, only when the store is built) and
    decodes it straight into the store's memory maps (never the whole decoded set in the
    process's own memory); the split record goes into the store's header."""

    def build(allocate: Allocate) -> None:
        maps: dict[str, np.ndarray] = {}
        listed = listing()

        def into(counts: dict[str, int], classes: list[str]) -> dict[str, np.ndarray]:
            specs = {}
            names = {}
            for split, n in counts.items():
                names[split], specs[names[split]] = _image_spec(split, n, (3, image_size, image_size))
                specs[f"{split}_labels"] = ((n,), "int64")
            meta = {"classes": list(classes), "image_size": image_size, "resize": resize, "split_record": listed.record}
            maps.update(allocate(specs, {**meta, "channels": 3}))
            return {split: _images_view(names[split], maps[names[split]], 3) for split in counts}

        for split, (_, labels) in decode(listed, image_size, resize, into).items():
            maps[f"{split}_labels"][:] = labels

    return build


def _arrays_build(arrays: dict[str, np.ndarray], classes: list[str]) -> Build:
    """A store build of arrays already in memory (a CIFAR download's)."""

    def build(allocate: Allocate) -> None:
        specs, names = {}, {}
        for k, a in arrays.items():
            split, kind = k.rsplit("_", 1)
            names[k], specs[names[k]] = (
                _image_spec(split, len(a), a.shape[1:]) if kind == "images" else (k, (a.shape, a.dtype.str))
            )
        channels = arrays["train_images"].shape[1]
        maps = allocate(specs, {"classes": list(classes), "channels": channels})
        for k, a in arrays.items():
            _images_view(names[k], maps[names[k]], channels)[:] = a

    return build


def _stored(path: Path, checksum: str, build: Build, what: str) -> tuple[dict[str, Tensor], list[str], dict] | None:
    """The arrays of the store ``path`` (built if needed) as memory-mapped tensors, the
    class names and the store's header; None if the store's folder cannot hold files (the
    caller decodes into memory instead)."""
    if path.parent.is_dir():
        _remove_stale_temporaries(path.parent)

    def invalid(message: str) -> None:
        log(f"warning: {message}; rebuilding it")

    if not path.exists():
        log(f"decoding {what} (stored afterwards in {path.parent})")
    try:
        store = open_or_build(path, checksum, build, invalid)
    except StoreUnwritable as e:  # only a speed-up for data that fits in memory: go on without it
        log(f"warning: {e}")
        return None
    return {name: store.tensor(name) for name in store.arrays}, store.classes, store.header


def _dataset_tensors(stored: tuple[dict[str, Tensor], list[str], dict]) -> tuple[dict[str, Tensor], list[str], dict]:
    """:func:`_stored`'s tensors as ImageDataset fields (``train_images`` a view of the
    packed ``train_pixels``), its classes and header."""
    tensors, classes, header = stored
    tensors, pixels = _unpacked(tensors, header.get("channels", 3))
    return {**tensors, "train_pixels": pixels}, classes, header


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
    key = source_key(checksum, how)

    def listed() -> Listing:
        request = None if how is None else {"val": how[0], "test": how[1] or None, "seed": how[2]}
        return listing or read_imagefolder(source, request, val_size)

    stored = _stored(
        _cache_path(data_dir, key, image_size, resize), key, _listing_build(listed, image_size, resize), str(source)
    )
    if stored is None:
        listed_now = listed()
        splits, classes, record = decode(listed_now, image_size, resize), listed_now.classes, listed_now.record
        tensors = {
            f"{s}_{kind}": torch.from_numpy(a)
            for s, (x, y) in splits.items()
            for kind, a in (("images", x), ("labels", y))
        }
    else:
        tensors, classes, header = _dataset_tensors(stored)
        record = header.get("split_record")
    _check_recorded(split, record, source)
    ds = ImageDataset(
        name=source.name.split(".")[0] if name not in BUNDLED else name,
        classes=classes,
        train_images=tensors["train_images"],
        train_labels=tensors["train_labels"],
        test_images=tensors["test_images"],
        test_labels=tensors["test_labels"],
        checksum=checksum,
        source=name if name in BUNDLED else str(source.resolve()),
        val_images=tensors.get("val_images"),
        val_labels=tensors.get("val_labels"),
        split=record,
        train_pixels=tensors.get("train_pixels"),
    )
    return ds.with_validation(val_size, seed)


def _load_downloadable(
    name: str, image_size: int, data_dir: Path, download: bool, split: dict | None, val_size: int
) -> ImageDataset:
    """A CIFAR download, kept as a data store like a folder's decoded images."""
    if splitting.resolve(split, ("test",), val_size, name, "its official test set"):
        raise DataError(f"data.split.val: {name} comes as arrays; hold out validation images with data.val_size")
    if image_size != 32:
        raise DataError(f"data.image_size={image_size}: {name} images are 32x32; use image_size: 32")
    checksum = f"{name}-official"
    fields = ("train_images", "train_labels", "test_images", "test_labels")

    def download_and_build(allocate: Allocate) -> None:
        arrays = load_cifar(name, data_dir / name, download=download)
        _arrays_build({k: getattr(arrays, k) for k in fields}, list(arrays.classes))(allocate)

    stored = _stored(_cache_path(data_dir, checksum, image_size), checksum, download_and_build, name)
    if stored is None:
        cifar = load_cifar(name, data_dir / name, download=download)
        tensors, classes = {k: torch.from_numpy(getattr(cifar, k)) for k in fields}, list(cifar.classes)
    else:
        tensors, classes, _ = _dataset_tensors(stored)
    return ImageDataset(name=name, classes=classes, checksum=checksum, source=name, **tensors)


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


def load_recorded(info: dict, dataset: str | Path | None = None, data_dir: Path | None = None) -> ImageDataset:
    """The data set a checkpoint's data record (``info``) describes, or ``dataset`` instead:
    its images stored as that run made them (squashed before ``data.resize`` existed) and, on
    the checkpoint's own data set, its recorded split (the same test images as in training)."""
    recorded = info.get("dataset")
    own = dataset is None or (
        recorded is not None and Path(dataset).expanduser().resolve() == Path(str(recorded)).expanduser().resolve()
    )
    return load_dataset(
        dataset or recorded,
        info.get("image_size", 32),
        data_dir,
        resize=info.get("resize", "squash"),
        split=info.get("split") if own else None,
    )
