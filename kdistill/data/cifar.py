"""The official CIFAR-10 / CIFAR-100 data sets (python version), as in-memory uint8 arrays.

Layout on disk is the one torchvision uses, so an existing torchvision download is reused:

    data_dir/cifar-10-python.tar.gz     the archive as downloaded (MD5-verified)
    data_dir/cifar-10-batches-py/       its extracted folder
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import pickle
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from kdistill.data.archive import md5_file, safe_extract
from kdistill.errors import DataError
from kdistill.files import create_temporary

__all__ = ["CifarArrays", "load_cifar"]

_IMAGE_SHAPE = (3, 32, 32)  # stored CHW: 1024 red, then 1024 green, then 1024 blue bytes
_ROW_BYTES = 3 * 32 * 32
_CHUNK = 1 << 20  # bytes per download read
_TIMEOUT_S = 60  # per blocking socket operation, not for the whole download


class CifarArrays(NamedTuple):
    train_images: np.ndarray  # (N_train, 3, 32, 32) uint8
    train_labels: np.ndarray  # (N_train,) int64
    test_images: np.ndarray  # (N_test, 3, 32, 32) uint8
    test_labels: np.ndarray  # (N_test,) int64
    classes: list[str]  # class index -> name


@dataclass(frozen=True)
class _Spec:
    title: str
    url: str
    md5: str  # of the archive, as published by torchvision / the CIFAR page
    folder: str  # top-level folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str  # key of the class names in the meta file
    labels_key: str  # key of the labels in each batch file
    num_classes: int

    @property
    def archive_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_SPECS = {
    "cifar10": _Spec(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        names_key="label_names",
        labels_key="labels",
        num_classes=10,
    ),
    "cifar100": _Spec(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        names_key="fine_label_names",
        labels_key="fine_labels",
        num_classes=100,
    ),
}


def load_cifar(
    name: str,
    data_dir: Path,
    download: bool = True,
    url: str | None = None,
    md5: str | None = None,
) -> CifarArrays:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``) from ``data_dir``.

    If the extracted folder is missing, the archive in ``data_dir`` is used, or downloaded
    first when ``download`` is true; the archive must match its MD5 before it is extracted.
    ``url`` and ``md5`` replace the official ones (a mirror, or a ``file://`` URL in tests);
    the archive keeps its official file name so later calls find it.
    """
    if name not in _SPECS:
        raise DataError(f"unknown CIFAR data set {name!r}; expected one of {sorted(_SPECS)}")
    spec = _SPECS[name]
    data_dir = Path(data_dir)
    url = url or spec.url
    md5 = (md5 or spec.md5).lower()
    folder = data_dir / spec.folder
    archive = data_dir / spec.archive_name

    if folder.exists():
        missing = [f for f in _all_files(spec) if not (folder / f).is_file()]
        if missing:
            # Our own extraction is atomic, so a partial folder was made by hand or damaged;
            # deleting someone's files ourselves would be worse than asking.
            raise DataError(
                f"{spec.title} folder {folder} lacks {', '.join(missing)}; delete the folder to extract it again"
            )
    else:
        if archive.exists():
            # Also covers an archive placed by hand, or one whose extraction was cut short:
            # nothing is unpickled from an archive that has not matched the checksum.
            actual = md5_file(archive)
            if actual != md5:
                raise DataError(f"{archive} has md5 {actual}, expected {md5}; delete it to download again")
        elif download:
            _download(url, archive, md5)
        else:
            raise DataError(
                f"{spec.title} not found: neither {folder} nor {archive} exists; allow the "
                f"download (data.download: true), or fetch {url} elsewhere and place it at {archive.resolve()} (md5 {md5})"
            )
        _extract_folder(archive, data_dir, spec.folder)

    classes = _load_classes(folder / spec.meta_file, spec)
    train_images, train_labels = _load_batches(folder, spec.train_files, spec)
    test_images, test_labels = _load_batches(folder, spec.test_files, spec)
    return CifarArrays(train_images, train_labels, test_images, test_labels, classes)


def _all_files(spec: _Spec) -> tuple[str, ...]:
    return (*spec.train_files, *spec.test_files, spec.meta_file)


def _download(url: str, archive: Path, md5: str) -> None:
    """Stream ``url`` to ``archive``, which only ever appears complete and MD5-verified."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temporary(
        archive.parent, archive.name, ".part"
    )  # permissions by the umask, like the data it holds
    digest = hashlib.new("md5", usedforsecurity=False)  # checksum while streaming, not after
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                    total = _content_length(response)
                    with _progress(total, archive.name) as advance:
                        while chunk := response.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            advance(len(chunk))
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(
                    f"cannot download {url}: {reason}; to work offline, fetch it elsewhere and place it at {archive.resolve()} (md5 {md5})"
                ) from e
        actual = digest.hexdigest()
        if actual != md5:
            raise DataError(
                f"download of {url} failed its checksum: expected md5 {md5}, got {actual}; the corrupt file was deleted"
            )
        os.replace(tmp, archive)
    finally:
        # Still here only on failure or interruption: never leave a partial or bad download.
        tmp.unlink(missing_ok=True)


def _content_length(response: Any) -> int | None:
    value = response.headers.get("Content-Length")
    return int(value) if value and value.isdigit() else None


@contextlib.contextmanager
def _progress(total: int | None, label: str) -> Iterator[Any]:
    """Yield ``advance(n_bytes)``; draws a tqdm bar only when a person is watching."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    try:
        from tqdm import tqdm  # imported lazily: only interactive downloads need it
    except ImportError:  # a declared dependency, but a missing bar must not stop a download
        yield lambda n: None
        return
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label) as bar:
        yield bar.update


def _extract_folder(archive: Path, data_dir: Path, folder: str) -> None:
    """Move ``folder`` out of ``archive`` into ``data_dir``, whole or not at all."""
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=data_dir) as staging:
        root = Path(staging) / "root"
        safe_extract(archive, root)
        if not (root / folder).is_dir():
            raise DataError(f"{archive} does not contain the expected folder {folder!r}")
        try:
            os.replace(root / folder, data_dir / folder)
        except OSError as e:  # e.g. another process created the folder meanwhile
            raise DataError(f"cannot move {folder!r} from {archive} into {data_dir}: {e}") from e


def _read_pickle(path: Path) -> dict[str, Any]:
    # SECURITY: unpickling runs code chosen by whoever wrote the file. The CIFAR batches
    # are only read from an archive whose MD5 matched the published checksum before it
    # was extracted (or from a folder the user put in data_dir themselves); that check is
    # what makes pickle acceptable here. Never point this at files of unknown origin.
    try:
        with open(path, "rb") as f:
            # latin1: the batches were pickled by Python 2, whose str is bytes; latin1 maps
            # bytes 1:1, so the numpy array buffers inside come through unchanged.
            obj = pickle.load(f, encoding="latin1")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except Exception as e:  # a damaged pickle can raise almost anything
        raise DataError(f"cannot read {path}: not a valid CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, expected a dict")
    # Python 3 pickles made with bytes keys (or loaded with encoding="bytes") use b"data".
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise DataError(f"{path} has no {key!r} entry (found {sorted(map(str, batch))})")
    return batch[key]


def _load_classes(path: Path, spec: _Spec) -> list[str]:
    names = _field(_read_pickle(path), spec.names_key, path)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: expected {spec.num_classes} class names, found {count}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def _load_batches(folder: Path, files: tuple[str, ...], spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for file in files:
        path = folder / file
        batch = _read_pickle(path)
        data = np.asarray(_field(batch, "data", path))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
            raise DataError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {_ROW_BYTES})")
        batch_labels = np.asarray(_field(batch, spec.labels_key, path))
        # Checked before casting, which would silently truncate floats like 3.7.
        if batch_labels.size and batch_labels.dtype.kind not in "iu":
            raise DataError(f"{path}: {spec.labels_key!r} are {batch_labels.dtype}, expected integers")
        batch_labels = batch_labels.astype(np.int64)
        if batch_labels.shape != (len(data),):
            raise DataError(
                f"{path}: {spec.labels_key!r} has shape {batch_labels.shape}, expected ({len(data)},) to match 'data'"
            )
        if batch_labels.size and not (0 <= batch_labels.min() and batch_labels.max() < spec.num_classes):
            raise DataError(
                f"{path}: labels range over [{batch_labels.min()}, {batch_labels.max()}], "
                f"expected [0, {spec.num_classes - 1}]"
            )
        images.append(data.reshape(-1, *_IMAGE_SHAPE))  # (n, 3072) -> (n, 3, 32, 32)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)
