"""Safe archive extraction and file checksums.

Data sets arrive as archives from the internet, so a member name or link target is
untrusted input: ``../../.bashrc``, ``/etc/cron.d/x`` or a symlink to ``/`` followed by a
file "inside" it would write outside the destination. ``safe_extract`` refuses such
archives outright (rather than silently rewriting names, as ``zipfile`` does) and builds
the destination atomically, so a crash or Ctrl-C never leaves a half-extracted folder that
a later run would mistake for a complete one.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from kdistill.errors import DataError
from kdistill.files import create_temporary_folder

__all__ = ["md5_file", "safe_extract", "sha256_file"]

_CHUNK = 1 << 20  # bytes per read: large archives are hashed without loading them whole
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_ZIP_SUFFIXES = (".zip",)
# Only in Python >= 3.12 and the 3.8.17/3.9.17/3.10.12/3.11.4 backports; () matches nothing.
_FilterError: Any = getattr(tarfile, "FilterError", ())


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    return _hash_file(path, hashlib.new("sha256"))


def md5_file(path: Path) -> str:
    """Hex MD5 of a file, read in chunks (for matching published checksums only)."""
    # usedforsecurity=False keeps this working on FIPS-mode systems, where plain md5() is
    # disabled; MD5 here detects corrupt downloads, the trust comes from the HTTPS source.
    return _hash_file(path, hashlib.new("md5", usedforsecurity=False))


def _hash_file(path: Path, digest: Any) -> str:  # Any: hashlib has no public hash type
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path} to compute its checksum: {e.strerror or e}") from e
    return digest.hexdigest()


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar, .tar.gz/.tgz or .zip ``archive`` into the new folder ``dest``.

    Every member is checked before anything is written: absolute names, names or link
    targets that leave ``dest`` (via ``..`` or through a link in the archive), and device
    files / FIFOs raise ``DataError`` naming the archive and the member. On Python versions
    that have it, ``tarfile``'s "data" filter is applied as well, as a second line of defence.

    The archive is unpacked into a temporary folder beside ``dest`` that is renamed to
    ``dest`` only once extraction has finished, so ``dest`` either does not exist or is
    complete. ``dest`` must not exist yet.
    """
    archive, dest = Path(archive), Path(dest)
    extract = _extractor_for(archive)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist or is not a file")
    if os.path.lexists(dest):
        raise DataError(f"cannot extract {archive}: destination {dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)

    # Beside dest (same file system) so that the final rename is atomic; the dot prefix
    # and suffix make any leftover from a killed process easy to recognise.
    # Permissions by the umask (``mkdtemp`` would make the extracted folder private).
    staging = create_temporary_folder(dest.parent, dest.name, ".partial")
    try:
        extract(archive, staging)
        os.replace(staging, dest)
    except OSError as e:
        raise DataError(f"cannot extract {archive} into {dest}: {e}") from e
    finally:
        # Only still present if something above failed (including KeyboardInterrupt).
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _extractor_for(archive: Path) -> Callable[[Path, Path], None]:
    name = archive.name.lower()
    if name.endswith(_TAR_SUFFIXES):
        return _extract_tar
    if name.endswith(_ZIP_SUFFIXES):
        return _extract_zip
    supported = ", ".join(_TAR_SUFFIXES + _ZIP_SUFFIXES)
    raise DataError(f"cannot extract {archive}: unsupported archive type (expected {supported})")


def _extract_tar(archive: Path, root: Path) -> None:
    try:
        # "r:*" detects the compression from the content, not the suffix.
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()  # reads through the archive: most damage shows here
            _check_members(
                archive,
                ((m.name, _tar_kind(m), m.linkname) for m in members),
            )
            # Fatal and non-fatal extraction problems alike become exceptions, not log lines.
            tar.errorlevel = 2
            data_filter = getattr(tarfile, "data_filter", None)
            if data_filter is not None:
                tar.extractall(root, members=members, filter=data_filter)
            else:
                # No filter (Python < 3.12 without the 2023 backports): our checks above
                # already reject every unsafe member; here we also drop what the filter
                # would: ownership from the archive (applied when running as root) and
                # setuid/setgid/group-/world-writable permission bits.
                uid, gid = getattr(os, "getuid", int)(), getattr(os, "getgid", int)()
                for m in members:
                    m.uid, m.gid, m.uname, m.gname = uid, gid, "", ""
                    m.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)
                tar.extractall(root, members=members)
    except _FilterError as e:
        raise DataError(f"refusing to extract {archive}: member {e.tarinfo.name!r} is unsafe ({e})") from e
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError) as e:
        # Truncated or corrupt streams surface as any of these depending on where the
        # damage is and how the archive is compressed.
        raise DataError(f"cannot read {archive}: corrupt or truncated tar archive ({e})") from e
    except OSError as e:  # disk full, permissions, a member path the OS rejects
        raise DataError(f"cannot extract {archive}: {e}") from e


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.isdir():
        return "dir"
    if member.isreg():
        return "file"
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    return "special"  # character/block device, FIFO, or a type tarfile does not know


def _extract_zip(archive: Path, root: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_members(archive, ((i.filename, _zip_kind(i), "") for i in infos))
            # A member failing its CRC raises BadZipFile; safe_extract then discards the
            # staging folder.
            zf.extractall(root, members=infos)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DataError(f"cannot read {archive}: corrupt or truncated zip archive ({e})") from e
    except OSError as e:
        raise DataError(f"cannot extract {archive}: {e}") from e


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "dir"
    # Unix permissions live in the high 16 bits; zipfile ignores the file type and would
    # write a symlink or device entry as a regular file, so we refuse those instead.
    # The type bits are often 0 (e.g. zipfile.writestr sets only permissions): a file.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if stat.S_ISLNK(file_type):
        return "zip-symlink"  # its target is the member's content, which we do not vet
    if file_type and not (stat.S_ISREG(file_type) or stat.S_ISDIR(file_type)):
        return "special"
    return "file"


def _check_members(archive: Path, members: Iterable[tuple[str, str, str]]) -> None:
    """Raise DataError for the first unsafe (name, kind, link target) in ``members``."""
    members = list(members)
    # All link names up front: a link may be declared after a member that goes through it.
    links = {_normalise(name) for name, kind, _ in members if kind in ("symlink", "hardlink")}

    for name, kind, link_target in members:
        problem = _member_problem(name, kind, link_target, links)
        if problem:
            raise DataError(f"refusing to extract {archive}: member {name!r} {problem}")


def _member_problem(name: str, kind: str, link_target: str, links: set[str]) -> str | None:
    if kind == "special":
        return "is a device file or FIFO, not data"
    if kind == "zip-symlink":
        return "is a symlink, which zipfile would write as a regular file"
    if _is_absolute(name):
        return "has an absolute path"
    path = _normalise(name)
    if _escapes(path):
        return "escapes the destination with '..'"
    if _through_link(name, links):
        return "is inside a link, which could point outside the destination"

    if kind in ("symlink", "hardlink"):
        if _is_absolute(link_target):
            return f"is a {kind} to the absolute path {link_target!r}"
        # A symlink's target is relative to the folder holding the link; a hardlink's
        # target is another member, named relative to the archive root.
        base = posixpath.dirname(path) if kind == "symlink" else ""
        target = posixpath.join(base, link_target.replace("\\", "/"))
        if _escapes(_normalise(target)):
            return f"is a {kind} to {link_target!r}, outside the destination"
        if _through_link(target, links):
            return f"is a {kind} to {link_target!r}, which goes through another link"
    return None


def _is_absolute(name: str) -> bool:
    # Windows drive or UNC names ("C:\\x", "\\\\host\\share") are absolute on Windows hosts.
    return PurePosixPath(name).is_absolute() or bool(PureWindowsPath(name).anchor)


def _normalise(name: str) -> str:
    """The member's path relative to the root, with '.', '..' and '//' folded lexically."""
    # Lexical folding is exact here because the staging folder starts empty and paths
    # through a link are refused, so no component is a symlink when the OS resolves it.
    return posixpath.normpath(name.replace("\\", "/")) if name else "."


def _escapes(path: str) -> bool:
    return path == ".." or path.startswith("../")


def _through_link(name: str, links: set[str]) -> bool:
    """Whether resolving ``name`` passes through a link member, before any '..' folding.

    Through a link, '..' is resolved on the filesystem, not lexically: with ``l -> .``,
    ``l/../x`` folds to ``x`` on paper but lands beside the destination on disk.
    """
    parts = name.replace("\\", "/").split("/")
    return any(_normalise("/".join(parts[:i])) in links for i in range(1, len(parts)))
