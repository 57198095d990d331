"""Files written atomically: the one way kdistill writes anything a crash must not truncate.

Every layer writes through here (data caches, metrics logs, checkpoints, reports), so it
sits at the bottom and imports nothing of kdistill's but its errors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from kdistill.errors import CheckpointError

TMP_SUFFIX = ".tmp"  # of the temporary files of atomic writes: .<name>.<random>.tmp


def create_temporary(folder: Path, name: str, suffix: str = TMP_SUFFIX) -> tuple[int, Path]:
    """A new, empty file ``.<name>.<random><suffix>`` in ``folder``, opened for writing
    (descriptor, path).

    Its permissions are those a plain ``open()`` gives, ``0o666`` less the umask (the kernel
    applies it), so a report or checkpoint can be shared as the user's umask says;
    ``tempfile.mkstemp`` would make every file ``0o600``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = Path(folder) / f".{name}.{secrets.token_hex(6)}{suffix}"
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary file name for {name} in {folder}")


def create_temporary_folder(folder: Path, name: str, suffix: str) -> Path:
    """A new, empty folder ``.<name>.<random><suffix>`` in ``folder``, with the permissions of
    a plain ``mkdir`` (``0o777`` less the umask; ``tempfile.mkdtemp`` gives ``0o700``)."""
    for _ in range(100):
        path = Path(folder) / f".{name}.{secrets.token_hex(6)}{suffix}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary folder name for {name} in {folder}")


def atomic_write(path: Path, write: Callable[[BinaryIO], None], what: str = "file") -> None:
    """Write ``path`` through ``write(f)`` into a temporary file in the same folder, fsync
    it, rename it over ``path`` and fsync the folder. The file gets the permissions a plain
    ``open()`` would give it: ``0o666`` less the umask.

    A crash, a kill or a full disk at any moment leaves either the old file or the new one,
    never a truncated mix (the rename is atomic; the folder's fsync makes it survive a power
    cut too). A failed write raises :class:`CheckpointError` naming the file and the cause.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temporary(path.parent, path.name)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        cause = f"{blocker} is a file, not a folder" if blocker else e.strerror or e
        raise CheckpointError(f"cannot write {what} {path}: {cause}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer turns a failed write (disk full) into a RuntimeError from
        # its clean-up, with the OSError as the context: find it
        os_error = _os_error_in(e)
        Path(tmp).unlink(missing_ok=True)
        if os_error is None:
            raise
        kept = "; the previous one is intact" if path.exists() else ""
        raise CheckpointError(f"cannot write {what} {path}: {os_error.strerror or os_error}{kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # not every file system can fsync a folder
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _os_error_in(error: BaseException) -> OSError | None:
    """``error`` itself or the first OSError among its causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_write_text(path: Path, text: str, what: str = "file") -> None:
    atomic_write(path, lambda f: f.write(text.encode()), what)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` and below.

    Call only while holding the run directory's lock: then no live process is writing
    them. Returns the removed paths.
    """
    removed = []
    for tmp in Path(folder).rglob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed
