"""ImageFolder trees and archives of them, as torchvision's ImageFolder reads them.

Two layouts: ``root/{train,test}/<class>/<image>`` (the data set's own test split, and
its validation split when there is a ``val/`` folder too), or a single
``root/<class>/<image>`` that kdistill splits into train/validation/test
(:mod:`kdistill.data.split`). Images may sit in sub-folders of their class folder. Which
files are images follows torchvision (:data:`IMG_EXTENSIONS`, any case); other files are
skipped and counted in the log, hidden files and folders (``.DS_Store``,
``.ipynb_checkpoints/``) silently.

Archives (.tar, .tar.gz/.tgz, .zip) are read member by member without extracting
anything to disk, so no member name can write outside a folder; names that are absolute or
contain ``..`` are refused all the same, since they mean the archive is not what it claims.
Classes are the sorted class folder names (of ``train`` in the first layout; ``test`` must
have the same set).
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdistill.data import split as splitting
from kdistill.data.archive import _zip_kind
from kdistill.errors import DataError
from kdistill.progress import log, progress

# torchvision.datasets.folder.IMG_EXTENSIONS: the files ImageFolder counts as images
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# the rules that choose and group a source's image files (extensions, sub-folders, splits):
# a change changes the decoded arrays of the same files, so it is part of the cache key
LAYOUT_RULES = 2
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SPLITS = ("train", "test")
Allocate = Callable[[dict[str, int], list[str]], dict[str, np.ndarray]]


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


ON_DISK = b""  # a folder's file: its bytes are read when it is decoded, not when it is listed


def _iter_members(source: Path) -> Iterator[tuple[str, bytes | None]]:
    """(relative posix name, file bytes) of every regular file in an archive, (name,
    ON_DISK) of every file in a folder (read later, by :func:`_member_bytes`, so a folder
    larger than memory can be listed), and (name, None) for every folder (so that an empty
    class folder can be named)."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            name = path.relative_to(source).as_posix()
            if path.is_dir():
                yield name, None
            elif path.is_file():
                yield name, ON_DISK
        return
    name = source.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    if _zip_kind(info) == "zip-symlink":
                        raise DataError(
                            f"{source}: member {info.filename!r} is a link; ImageFolder archives must hold plain files"
                        )
                    yield _checked(source, info.filename).rstrip("/"), None if info.is_dir() else zf.read(info)
        else:
            with tarfile.open(source, "r:*") as tf:
                for member in tf:
                    if member.issym() or member.islnk():
                        raise DataError(
                            f"{source}: member {member.name!r} is a link; ImageFolder archives must hold plain files"
                        )
                    if member.isfile():
                        yield _checked(source, member.name), tf.extractfile(member).read()
                    elif member.isdir():
                        yield _checked(source, member.name).rstrip("/"), None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"{source}: cannot read archive ({e}); expected a valid .tar, .tar.gz or .zip") from None


def _member_bytes(source: Path, members: dict[str, bytes | None], name: str) -> bytes:
    """A member's bytes: kept from the archive, or read from the folder now."""
    data = members[name]
    if data is not ON_DISK or not source.is_dir():
        return data
    try:
        return (source / name).read_bytes()
    except OSError as e:
        raise DataError(f"{source}:{name}: cannot read ({e.strerror or e})") from None


def _iter_names(source: Path) -> Iterator[tuple[str, bool]]:
    """(relative posix name, whether a file) of every member, reading no file's bytes."""
    if source.is_dir():
        for path in source.rglob("*"):
            yield path.relative_to(source).as_posix(), path.is_file()
        return
    try:
        if source.name.lower().endswith(".zip"):
            with zipfile.ZipFile(source) as zf:
                for info in zf.infolist():
                    yield info.filename.rstrip("/"), not info.is_dir()
        else:
            with tarfile.open(source, "r:*") as tf:
                for member in tf:
                    yield member.name.rstrip("/"), member.isfile()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DataError(f"{source}: cannot read archive ({e}); expected a valid .tar, .tar.gz or .zip") from None


def own_splits(source: Path) -> tuple[str, ...]:
    """The splits a folder tree or archive brings itself: ("test",) for root/{train,test}/,
    ("test", "val") with a val/ folder too, () for a single root of class folders (cheap: no
    image is read)."""
    members = list(_iter_names(source))
    names, is_file = [n for n, _ in members], [f for _, f in members]
    prefix, has_test = _find_layout(names, is_file)
    has_val = has_test and any(f and n.startswith(f"{prefix}val/") for n, f in members)
    return ("test", "val") if has_val else ("test",) if has_test else ()


def folders_of(own: tuple[str, ...]) -> str:
    """How an error names the folders behind a tree's own splits."""
    return "its test/ and val/ folders" if "val" in own else "its test/ folder"


def _checked(archive: Path, name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{archive}: member {name!r} has an absolute path or '..'; refusing the archive")
    return path.as_posix()


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _hidden(parts: list[str]) -> bool:
    return any(p.startswith(".") for p in parts)


@dataclass
class Listing:
    """What a source holds before anything is decoded: its classes and, per split, the
    (key, label, name in messages) of its images, by label and then name; ``read(key)``
    gives an image's bytes; ``record`` describes a split kdistill made (or None)."""

    classes: list[str]
    splits: dict[str, list[tuple[str, int, str]]]
    read: Callable[[str], bytes]
    record: dict | None = None


def _find_layout(names: list[str], is_file: list[bool]) -> tuple[str, bool]:
    """(prefix of the data set's root, whether it has train/ and test/ folders). A single
    folder at the top (``cifar10-jpeg/train/...``, ``photos/<class>/...``) is the root."""

    def folders(prefix: str) -> set[str]:
        return {
            n[len(prefix) :].split("/", 1)[0]
            for n, f in zip(names, is_file)
            if n.startswith(prefix) and (not f or "/" in n[len(prefix) :]) and n != prefix.rstrip("/")
        } - {""}

    tops = {t for t in folders("") if not t.startswith(".")}
    prefix = ""
    if not tops & set(SPLITS) and len(tops) == 1:
        inner = {t for t in folders(next(iter(tops)) + "/") if not t.startswith(".")}
        if inner:
            prefix, tops = next(iter(tops)) + "/", inner
    return prefix, bool(tops & set(SPLITS))


def _group(
    names: list[str], is_file: list[bool], prefix: str, bases: tuple[str, ...]
) -> tuple[dict[str, dict[str, list[str]]], Counter, list[str]]:
    """{base: {class: image names below its class folder}} for each base folder (``train/``,
    ``test/`` or the root itself, ""), the skipped non-images by suffix, and the images
    outside every class folder."""
    groups: dict[str, dict[str, list[str]]] = {b: {} for b in bases}
    skipped: Counter = Counter()
    misplaced: list[str] = []
    for name, file in zip(names, is_file):
        if _hidden(name.split("/")) or name == prefix.rstrip("/"):
            continue
        rel = name[len(prefix) :].split("/") if name.startswith(prefix) else []  # [] beside the root folder
        if bases == ("",):
            base, inside = ("", rel) if rel else (None, [])
        else:
            base, inside = (rel[0], rel[1:]) if rel and rel[0] in groups else (None, [])
        if not file:
            if base is not None and len(inside) == 1:
                groups[base].setdefault(inside[0], [])  # a class folder, maybe empty
        elif not is_image_file(name):
            skipped[_suffix(name)] += 1
        elif base is not None and len(inside) >= 2:
            groups[base].setdefault(inside[0], []).append("/".join(inside))
        else:
            misplaced.append(name)
    return groups, skipped, misplaced


def _suffix(name: str) -> str:
    return PurePosixPath(name).suffix.lower() or "(no extension)"


def log_skipped(skipped: Counter) -> None:
    """One log line: ``skipped 3 files that are not images (.txt: 2, .csv: 1)``."""
    if skipped:
        n = sum(skipped.values())
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        what = "files that are not images" if n != 1 else "file that is not an image"
        log(f"skipped {n} {what} ({counts})")


def read_imagefolder(
    source: Path, split: dict | None = None, val_size: int = 0
) -> Listing:  # long: the two layouts' checks, one line each, then one split
    """List a folder tree or archive; split it when it is a single root of class folders (or
    when ``split`` asks for validation images from ``train/``). See :func:`splitting.resolve`."""
    if not source.exists():
        raise DataError(
            f"data set {str(source)!r} does not exist; expected a folder or a .tar/.tar.gz/.zip archive of "
            "root/<class>/<image> or root/{train,test}/<class>/<image>"
        )
    members = dict(_iter_members(source))
    names = list(members)
    is_file = [members[n] is not None for n in names]
    prefix, has_test = _find_layout(names, is_file)
    has_val = has_test and any(f and n.startswith(f"{prefix}val/") for n, f in zip(names, is_file))
    bases = (*SPLITS, "val") if has_val else SPLITS if has_test else ("",)
    groups, skipped, misplaced = _group(names, is_file, prefix, bases)
    log_skipped(skipped)
    if misplaced:
        where = " and ".join(f"{b}/<class>/" for b in bases) + " folders" if has_test else "the <class>/ folders"
        log(f"skipped {len(misplaced)} image(s) outside {where} (e.g. {misplaced[0]!r})")
    for base in bases:
        if not groups[base]:
            raise DataError(
                f"{source}: no images under {prefix}{base}/<class>/; expected {prefix}{base}/<class>/<image> (images: "
                f"{', '.join(IMG_EXTENSIONS)})"
                if base
                else f"{source}: no class folders with images; expected root/<class>/<image> or "
                f"root/{{train,test}}/<class>/<image> (images: {', '.join(IMG_EXTENSIONS)})"
            )
    for base in bases:
        for cls in sorted(groups[base]):
            if not groups[base][cls]:
                folder = f"{prefix}{base}/{cls}/" if base else f"{prefix}{cls}/"
                raise DataError(f"{source}: class folder {folder} is empty; expected at least one image in it")
    train = groups[bases[0]]
    classes = sorted(train)
    if has_test and set(groups["test"]) != set(classes):
        missing = sorted(set(classes) ^ set(groups["test"]))
        raise DataError(f"{source}: train and test have different classes (differ in: {', '.join(missing)})")
    if len(classes) < 2:
        raise DataError(f"{source}: found a single class {classes}; a classifier needs at least 2")
    if has_val and set(groups["val"]) - set(classes):
        extra = sorted(set(groups["val"]) - set(classes))
        raise DataError(f"{source}: val/ has classes that train/ has not ({', '.join(extra)})")
    own = tuple(b for b in bases if b in ("test", "val"))
    how = splitting.resolve(split, own, val_size, str(source), folders_of(own))
    assigned = {b: groups[b] for b in own}
    record = None
    if how is not None:
        val, test, seed = how
        assigned = {**splitting.assign(train, val, test, seed, str(source)), **assigned}
        layout = "train/test folders" if has_test else "class folders"
        record = splitting.describe(assigned, {"layout": layout, "val": val, "test": test or None, "seed": seed})
    else:
        assigned["train"] = train
    # each split's files, back to member names: a split made by kdistill comes from train/
    base_of = {s: (f"{prefix}{s if s in own else 'train'}/" if has_test else prefix) for s in assigned}
    label = {cls: i for i, cls in enumerate(classes)}
    splits = {
        s: [
            (base_of[s] + rel, label[cls], f"{source}:{base_of[s]}{rel}")
            for cls in classes
            for rel in sorted(assigned[s].get(cls, []))
        ]
        for s in splitting.SPLIT_NAMES
        if s in assigned
    }
    return Listing(classes, splits, lambda key: _member_bytes(source, members, key), record)


RESIZE_POLICIES = ("crop", "squash")


def _resized(img: Image.Image, size: int, resize: str) -> Image.Image:
    """``img`` as ``size`` x ``size`` pixels. ``crop``: the shorter side scaled to ``size``
    and the longer one centre-cropped to it (the aspect ratio is kept; torchvision's
    ``Resize(size)`` + ``CenterCrop(size)``); ``squash``: both sides scaled to ``size``
    (the whole image, stretched). Pillow's bilinear filter, antialiased when shrinking; an
    image already ``size`` x ``size`` is untouched by either."""
    if img.size == (size, size):
        return img
    if resize == "squash":
        return img.resize((size, size), Image.BILINEAR)
    width, height = img.size
    side = min(width, height)  # the centred square, in source pixels (fractional edges allowed)
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))


def _decode(name: str, data: bytes, size: int, resize: str = "crop") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = _resized(img.convert("RGB"), size, resize)  # grayscale, palette, RGBA -> RGB
            # contiguous (3, H, W): a transposed view would make the stacked array channels-last
            # in memory, and reductions over it (the mean/std) round differently from the same
            # values loaded back from the cache: the first run would differ from later ones
            return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
    except UnidentifiedImageError:
        raise DataError(
            f"{name}: unreadable image (not a format Pillow recognises); expected a JPEG/PNG/... file"
        ) from None
    except (Image.DecompressionBombError, OSError, ValueError) as e:
        raise DataError(
            f"{name}: unreadable image ({e.__class__.__name__}: {e}); expected a JPEG/PNG/... file"
        ) from None


DECODE_WINDOW = 512  # images decoded ahead of the one being stored: bounded memory, whatever the set's size


def _windows(pool: ThreadPoolExecutor, fn: Callable, items: list) -> Iterator:
    """``pool.map(fn, items)`` a window at a time (a plain map would hold every decoded
    image that the consumer has not stored yet)."""
    for start in range(0, len(items), DECODE_WINDOW):
        yield from pool.map(fn, items[start : start + DECODE_WINDOW])


def decode(
    listing: Listing, image_size: int, resize: str = "crop", allocate: Allocate | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every split of ``listing``: {split: (images (N,3,S,S) uint8, labels (N,) int64)},
    every image resized to S = ``image_size`` by the ``resize`` policy (see :func:`_resized`).

    ``allocate(counts, classes)`` ({split: N}), if given, returns the arrays to decode each
    split into ({split: (N,3,S,S) uint8}, e.g. memory maps of a file), before any image is
    decoded."""
    out = {}
    shape = (3, image_size, image_size)
    counts = {split: len(items) for split, items in listing.splits.items()}
    arrays = (
        allocate(counts, listing.classes)
        if allocate
        else {s: np.empty((n, *shape), np.uint8) for s, n in counts.items()}
    )
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        for split, items in listing.splits.items():
            jobs = _windows(pool, lambda item: _decode(item[2], listing.read(item[0]), image_size, resize), items)
            images = arrays[split]
            for k, image in enumerate(progress(jobs, total=len(items), desc=f"decode {split}")):
                images[k] = image  # one at a time into place: never a second copy of the split
            labels = np.array([label for _, label, _ in items], dtype=np.int64)
            out[split] = (images, labels)
    return out


def load_imagefolder(
    source: Path, image_size: int, split: dict | None = None, resize: str = "crop"
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Decode a folder tree or archive into {split: (images (N,3,S,S) uint8, labels (N,) int64)}."""
    listing = read_imagefolder(source, split)
    return decode(listing, image_size, resize), listing.classes
