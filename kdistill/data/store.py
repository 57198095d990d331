"""The decoded data set as one file on disk, read through a memory map.

Decoding images is slow and their uint8 pixels can be larger than the machine's memory, so
a data set is decoded once into a *store*: a file holding a header and the raw arrays
(images (N, C, H, W) uint8, labels (N,) int64, per split). Later runs, every DDP rank and
every sweep worker on the machine map the same file (``numpy.memmap``): the operating
system's page cache holds its pages once, shared, and evicts them under memory pressure;
no process copies the images into its own (anonymous) memory.

Layout: ``MAGIC`` (8 bytes), the header's length (8 bytes, little endian), the header as
JSON, then each array at a 4096-byte aligned offset. The header names the format version,
the source's checksum, the class names and every array's dtype, shape, offset and size,
and a digest of the labels. A file that is shorter or longer than its header says (a
truncated copy), whose source checksum differs (another data set), or whose labels do not
match their digest is refused with one line naming the file.

Writing is atomic: the arrays are decoded straight into a memory map of a temporary file
(its blocks reserved up front, so a full disk is an error before any work, not a crash
half-way), the header is written last, then the file is renamed into place. One writer at a
time (a lock on the stores' folder): a process that waited for another's build finds the finished
store and uses it.

Never modify a store in place (as with any memory-mapped file, a process reading a file that
shrinks under it is killed by SIGBUS); delete it instead: processes that have it open keep
their copy, and the next run builds a new one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.errors import DataError
from kdistill.files import TMP_SUFFIX, create_temporary

MAGIC = b"KDSTORE\0"
FORMAT_VERSION = 1
ALIGN = 4096  # bytes: every array starts on a page boundary
DIGEST_BYTES = 16 << 20  # arrays up to this size (labels) are digested and checked on every read
_PREFIX = len(MAGIC) + 8

ArraySpec = tuple[tuple[int, ...], str]  # (shape, numpy dtype name)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _layout(specs: dict[str, ArraySpec], header_room: int) -> tuple[dict[str, dict], int]:
    """Offsets of the arrays after a header of ``header_room`` bytes; and the file's size."""
    offset, arrays = _aligned(_PREFIX + header_room), {}
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        arrays[name] = {"shape": list(shape), "dtype": np.dtype(dtype).str, "offset": offset, "nbytes": nbytes}
        offset = _aligned(offset + nbytes)
    return arrays, offset


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1)).hexdigest()


class StoreUnwritable(DataError):
    """The store's folder cannot hold files (not a folder, no permission): the data can
    still be decoded into memory, without the store."""


def _map(path: Path, a: dict, mode: str) -> np.ndarray:
    shape, dtype = tuple(a["shape"]), np.dtype(a["dtype"])
    if a["nbytes"] == 0:  # an empty file region cannot be mapped
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=a["offset"], shape=shape)


class Store:
    """An opened store: its header and its arrays, memory-mapped read-only."""

    def __init__(self, path: Path, header: dict, arrays: dict[str, np.ndarray]):
        self.path, self.header, self.arrays = path, header, arrays

    @property
    def classes(self) -> list[str]:
        return list(self.header["classes"])

    def tensor(self, name: str) -> Tensor:
        """The array ``name`` as a CPU tensor sharing the mapped pages (no copy).

        The mapping is copy-on-write: the file is never modified, and a write into the tensor
        (which kdistill never does) stays private to the process."""
        with warnings.catch_warnings():  # torch warns about any non-writable array
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.arrays[name])


def read_store(path: Path, checksum: str | None = None) -> Store:
    """Open the store at ``path``; ``checksum``: the source it must have been built from.

    Raises DataError (one line naming the file and what is wrong) for a file that is not a
    store, of another format version, truncated or padded, built from another source, or
    whose labels do not match their digest."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX)
            if len(prefix) < _PREFIX or prefix[: len(MAGIC)] != MAGIC:
                raise DataError(f"{path}: not a kdistill data store (no {MAGIC[:-1].decode()} header)")
            length = int.from_bytes(prefix[len(MAGIC) :], "little")
            header = json.loads(f.read(min(length, size)).decode())
    except OSError as e:
        raise DataError(f"{path}: cannot read data store ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{path}: damaged data store header; delete the file to rebuild it") from None
    if header.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: data store format {header.get('version')}, expected {FORMAT_VERSION}")
    if checksum is not None and header.get("checksum") != checksum:
        raise DataError(
            f"{path}: data store of another data set (source checksum {str(header.get('checksum'))[:16]}, "
            f"expected {checksum[:16]})"
        )
    if size != header.get("size"):
        raise DataError(
            f"{path}: data store is {size} bytes, its header says {header.get('size')} (truncated or damaged copy)"
        )
    arrays = {name: _map(path, a, "c") for name, a in header["arrays"].items()}
    for name, expected in header.get("digests", {}).items():
        if _digest(arrays[name]) != expected:
            raise DataError(f"{path}: data store array {name!r} does not match its digest (damaged file)")
    return Store(path, header, arrays)


Allocate = Callable[[dict[str, ArraySpec], dict], dict[str, np.ndarray]]
Build = Callable[[Allocate], None]


def write_store(path: Path, meta: dict, build: Build) -> None:
    """Build the store ``path``. ``build(allocate)`` calls ``allocate(specs, more_meta)``
    once ({name: (shape, dtype)}, JSON values for the header, e.g. the class names) and
    writes every array into the writable memory maps it returns (decode straight into
    them). Arrays up to ``DIGEST_BYTES`` (the labels) get a digest, checked on every read.

    Atomic: the file appears complete or not at all. No room on the disk raises DataError
    naming the file, the size needed and the room left, and leaves nothing behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(path.parent, path.name)
    except OSError as e:
        raise StoreUnwritable(f"cannot write data store {path}: {e.strerror or e}") from None
    header: dict = {"version": FORMAT_VERSION, **meta}
    maps: dict[str, np.ndarray] = {}

    def allocate(specs: dict[str, ArraySpec], more: dict) -> dict[str, np.ndarray]:
        header.update(more)
        # the header's size depends on the offsets, which depend on the header's size:
        # reserve room for it (the class names dominate) before laying the arrays out
        room = len(json.dumps({**header, "arrays": _layout(specs, 0)[0], "digests": dict.fromkeys(specs, "0" * 64)}))
        arrays, size = _layout(specs, room + 256)
        header.update(arrays=arrays, size=size, room=room + 256)
        _reserve(fd, size)
        maps.update({name: _map(tmp, a, "r+") for name, a in arrays.items()})
        return dict(maps)

    try:
        try:
            build(allocate)
            if not maps:
                raise RuntimeError("write_store: build() never called allocate()")
            header["digests"] = {n: _digest(m) for n, m in maps.items() if m.nbytes <= DIGEST_BYTES}
            for m in maps.values():
                if isinstance(m, np.memmap):
                    m.flush()
            maps.clear()
            text = json.dumps(header).encode()
            if len(text) > header["room"]:
                raise RuntimeError("data store header outgrew its room")
            os.pwrite(fd, MAGIC + len(text).to_bytes(8, "little") + text, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, e, header.get("size", 0)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, e: OSError, size: int) -> DataError:
    if e.errno != errno.ENOSPC:
        return DataError(f"cannot write data store {path}: {e.strerror or e}")
    free = shutil.disk_usage(path.parent).free
    return DataError(
        f"no room for data store {path}: it needs {size / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free there; "
        "free some space, or set KDISTILL_CACHE (or data.data_dir) to a folder on a larger disk"
    )


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks now: a full disk is then an OSError here, where a write
    through a memory map into an unallocated (sparse) block would kill the process (SIGBUS)."""
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


def open_or_build(path: Path, checksum: str, build: Build, on_invalid: Callable[[str], None] | None = None) -> Store:
    """The store at ``path`` built from the source ``checksum``: opened if it exists and
    checks out, else built (see :func:`write_store`) by one process at a time. An invalid
    store (truncated, another data set's) is reported through ``on_invalid(message)`` and
    rebuilt."""
    path = Path(path)
    if path.exists():
        try:
            return read_store(path, checksum)
        except DataError as e:
            if on_invalid:
                on_invalid(str(e))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one writer at a time among the processes of this machine (DDP ranks, sweep
        # workers): a lock on the stores' folder itself, which leaves no file behind
        folder = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise StoreUnwritable(f"cannot write data store {path}: {e.strerror or e}") from None
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # released when the descriptor closes
        if path.exists():  # another process built it while this one waited for the lock
            with contextlib.suppress(DataError):
                return read_store(path, checksum)
        for tmp in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):  # a killed writer's (the lock is ours)
            tmp.unlink(missing_ok=True)
        write_store(path, {"checksum": checksum}, build)
    finally:
        os.close(folder)
    return read_store(path, checksum)
