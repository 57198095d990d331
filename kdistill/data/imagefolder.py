"""ImageFolder trees and archives of them: ``root/{train,test}/<class>/<image>``.

Archives (.tar, .tar.gz/.tgz, .zip) are read member by member without extracting
anything to disk, so no member name can write outside a folder; names that are absolute or
contain ``..`` are refused all the same, since they mean the archive is not what it claims.
Classes are the sorted folder names of ``train``; ``test`` must have the same set.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from kdistill.data.archive import _zip_kind
from kdistill.errors import DataError
from kdistill.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
SPLITS = ("train", "test")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _iter_members(source: Path) -> Iterator[tuple[str, bytes | None]]:
    """(relative posix name, file bytes) of every regular file in a folder or an archive,
    and (name, None) for every folder (so that an empty class folder can be named)."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            name = path.relative_to(source).as_posix()
            if path.is_dir():
                yield name, None
            elif path.is_file():
                try:
                    yield name, path.read_bytes()
                except OSError as e:
                    raise DataError(f"{source}:{name}: cannot read ({e.strerror or e})") from None
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


def _checked(archive: Path, name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"{archive}: member {name!r} has an absolute path or '..'; refusing the archive")
    return path.as_posix()


def _split_layout(source: Path, names: list[str], is_file: list[bool]) -> tuple[str, dict[str, dict[str, list[int]]]]:
    """Find the ``train``/``test`` folders (at the top or one level down) and group the
    files by class; a class folder without files gets an empty list."""
    prefix = ""
    tops = {n.split("/", 1)[0] for n, f in zip(names, is_file) if f or "/" in n}
    if "train" not in tops and len(tops) == 1:  # e.g. cifar10-jpeg/train/...
        prefix = next(iter(tops)) + "/"
    layout: dict[str, dict[str, list[int]]] = {s: {} for s in SPLITS}
    for i, name in enumerate(names):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        if not is_file[i]:
            if len(parts) == 2 and parts[0] in SPLITS and not parts[1].startswith("."):
                layout[parts[0]].setdefault(parts[1], [])  # a class folder
            continue
        if len(parts) != 3 or parts[0] not in SPLITS:
            continue
        split, cls, filename = parts
        if filename.startswith(".") or cls.startswith("."):  # .DS_Store, .ipynb_checkpoints/
            continue
        layout[split].setdefault(cls, []).append(i)
    for split in SPLITS:
        if not layout[split]:
            raise DataError(
                f"{source}: no images under {prefix}{split}/<class>/; expected an ImageFolder tree root/{{train,test}}/<class>/<image>"
            )
    return prefix, layout


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


def load_imagefolder(
    source: Path, image_size: int, resize: str = "crop"
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Decode a folder tree or archive into {split: (images (N,3,S,S) uint8, labels (N,) int64)},
    every image resized to S = ``image_size`` by the ``resize`` policy (see :func:`_resized`)."""
    if not source.exists():
        raise DataError(
            f"data set {str(source)!r} does not exist; expected a folder or a .tar/.tar.gz/.zip archive of root/{{train,test}}/<class>/<image>"
        )
    members = list(_iter_members(source))
    names = [n for n, _ in members]
    prefix, layout = _split_layout(source, names, [data is not None for _, data in members])
    for split in SPLITS:
        for cls in sorted(layout[split]):
            if not layout[split][cls]:
                raise DataError(
                    f"{source}: class folder {prefix}{split}/{cls}/ is empty; expected at least one image in it"
                )
    classes = sorted(layout["train"])
    if set(layout["test"]) != set(classes):
        missing = sorted(set(classes) ^ set(layout["test"]))
        raise DataError(f"{source}: train and test have different classes (differ in: {', '.join(missing)})")
    if len(classes) < 2:
        raise DataError(f"{source}: found a single class {classes}; a classifier needs at least 2")
    out = {}
    with ThreadPoolExecutor() as pool:  # PIL releases the GIL while decoding
        for split in SPLITS:
            items = [
                (i, label)
                for label, cls in enumerate(classes)
                for i in sorted(layout[split][cls], key=lambda i: names[i])
            ]
            jobs = pool.map(
                lambda item: _decode(f"{source}:{names[item[0]]}", members[item[0]][1], image_size, resize), items
            )
            images = np.stack(list(progress(jobs, total=len(items), desc=f"decode {split}")))
            labels = np.array([label for _, label in items], dtype=np.int64)
            out[split] = (images, labels)
    return out, classes
