"""CIFAR download/verify/extract/load and safe archive extraction, offline.

Each test builds its own tiny archive in the official CIFAR python format and serves it
through a file:// URL, so the real code path (urllib, MD5, tar extraction, unpickling)
runs without a network.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from kdistill.data.archive import md5_file, safe_extract, sha256_file
from kdistill.data.cifar import load_cifar
from kdistill.errors import DataError


class Written(NamedTuple):
    """An archive made by a test and the arrays it holds."""

    archive: Path
    md5: str
    train_images: np.ndarray  # (N, 3, 32, 32) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]


def _batch(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows in CHW order
    labels = rng.integers(0, num_classes, size=n).tolist()  # plain ints, as in the originals
    return data, labels


def _make_tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _written(archive: Path, train, test, classes) -> Written:
    return Written(
        archive=archive,
        md5=hashlib.md5(archive.read_bytes()).hexdigest(),
        train_images=np.concatenate([d for d, _ in train]).reshape(-1, 3, 32, 32),
        train_labels=np.array([lab for _, labels in train for lab in labels], dtype=np.int64),
        test_images=np.concatenate([d for d, _ in test]).reshape(-1, 3, 32, 32),
        test_labels=np.array([lab for _, labels in test for lab in labels], dtype=np.int64),
        classes=classes,
    )


def make_cifar10(src: Path, corrupt: dict[str, Any] | None = None) -> Written:
    """20 train images in data_batch_1..5 and 10 test images, in cifar-10-python.tar.gz.

    ``corrupt`` overrides fields of data_batch_1 to test validation.
    """
    rng = np.random.default_rng(10)
    classes = [f"class{i}" for i in range(10)]
    train = [_batch(rng, 4, 10) for _ in range(5)]
    test = [_batch(rng, 10, 10)]
    files = {"cifar-10-batches-py/batches.meta": pickle.dumps({"label_names": classes})}
    for i, (data, labels) in enumerate(train, start=1):
        batch = {"batch_label": f"training batch {i} of 5", "data": data, "labels": labels}
        if i == 1 and corrupt:
            batch.update(corrupt)
        files[f"cifar-10-batches-py/data_batch_{i}"] = pickle.dumps(batch, protocol=2)
    files["cifar-10-batches-py/test_batch"] = pickle.dumps({"data": test[0][0], "labels": test[0][1]}, protocol=2)
    src.mkdir(parents=True, exist_ok=True)
    return _written(_make_tar_gz(src / "cifar-10-python.tar.gz", files), train, test, classes)


def make_cifar100(src: Path) -> Written:
    """12 train and 6 test images; bytes keys, as a pickle read with encoding='bytes' has."""
    rng = np.random.default_rng(100)
    classes = [f"fine{i}" for i in range(100)]
    train, test = [_batch(rng, 12, 100)], [_batch(rng, 6, 100)]

    def pickled(data: np.ndarray, labels: list[int]) -> bytes:
        coarse = [lab // 5 for lab in labels]
        return pickle.dumps({b"data": data, b"fine_labels": labels, b"coarse_labels": coarse})

    files = {
        "cifar-100-python/meta": pickle.dumps(
            {b"fine_label_names": [c.encode() for c in classes], b"coarse_label_names": []}
        ),
        "cifar-100-python/train": pickled(*train[0]),
        "cifar-100-python/test": pickled(*test[0]),
    }
    src.mkdir(parents=True, exist_ok=True)
    return _written(_make_tar_gz(src / "cifar-100-python.tar.gz", files), train, test, classes)


def assert_loaded(got, want: Written) -> None:
    for field in ("train_images", "test_images"):
        assert getattr(got, field).dtype == np.uint8
        assert getattr(got, field).shape[1:] == (3, 32, 32)
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    for field in ("train_labels", "test_labels"):
        assert getattr(got, field).dtype == np.int64
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert got.classes == want.classes


def no_network(*args, **kwargs):
    raise AssertionError("urlopen must not be called")


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- load_cifar ---------------------------------------------------------------------------


def test_cifar10_download_verify_extract_load(tmp_path: Path) -> None:
    want = make_cifar10(tmp_path / "server")
    data_dir = tmp_path / "data"

    got = load_cifar("cifar10", data_dir, url=want.archive.as_uri(), md5=want.md5)

    assert got.train_images.shape == (20, 3, 32, 32) and got.test_images.shape == (10, 3, 32, 32)
    assert_loaded(got, want)
    # Only the archive and its folder remain: no temporary download or extraction dirs.
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert md5_file(data_dir / "cifar-10-python.tar.gz") == want.md5


def test_cifar100_download_verify_extract_load(tmp_path: Path) -> None:
    want = make_cifar100(tmp_path / "server")
    got = load_cifar("cifar100", tmp_path / "data", url=want.archive.as_uri(), md5=want.md5)
    assert got.train_images.shape == (12, 3, 32, 32) and len(got.classes) == 100
    assert_loaded(got, want)


def test_download_on_a_terminal(tmp_path: Path, monkeypatch) -> None:
    # The progress-bar branch (tqdm, or no bar if it is missing) must not change the result.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    want = make_cifar10(tmp_path / "server")
    assert_loaded(load_cifar("cifar10", tmp_path / "data", url=want.archive.as_uri(), md5=want.md5), want)


def test_second_call_reuses_files_without_network(tmp_path: Path, monkeypatch) -> None:
    want = make_cifar10(tmp_path / "server")
    data_dir = tmp_path / "data"
    load_cifar("cifar10", data_dir, url=want.archive.as_uri(), md5=want.md5)

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert_loaded(load_cifar("cifar10", data_dir, url=want.archive.as_uri(), md5=want.md5), want)
    assert_loaded(load_cifar("cifar10", data_dir, download=False, md5=want.md5), want)


def test_present_archive_is_verified_and_extracted_without_network(tmp_path: Path, monkeypatch) -> None:
    want = make_cifar10(tmp_path / "data")  # the archive is already in data_dir
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert_loaded(load_cifar("cifar10", tmp_path / "data", download=False, md5=want.md5), want)

    # A present archive that fails its checksum is never unpickled.
    other = tmp_path / "other"
    make_cifar10(other)
    with pytest.raises(DataError, match="md5"):
        load_cifar("cifar10", other, md5="0" * 32)
    assert not (other / "cifar-10-batches-py").exists()


def test_wrong_checksum_raises_and_leaves_no_archive(tmp_path: Path) -> None:
    want = make_cifar10(tmp_path / "server")
    data_dir = tmp_path / "data"
    url = want.archive.as_uri()

    with pytest.raises(DataError, match="md5") as excinfo:
        load_cifar("cifar10", data_dir, url=url, md5="0" * 32)

    message = str(excinfo.value)
    assert url in message and "0" * 32 in message and want.md5 in message
    assert os.listdir(data_dir) == []


def test_download_false_with_nothing_present(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataError, match="download"):
        load_cifar("cifar10", tmp_path / "empty", download=False)


def test_network_failure_names_the_url(tmp_path: Path) -> None:
    url = (tmp_path / "missing.tar.gz").as_uri()
    with pytest.raises(DataError, match="cannot download") as excinfo:
        load_cifar("cifar10", tmp_path / "data", url=url, md5="0" * 32)
    assert url in str(excinfo.value)
    assert os.listdir(tmp_path / "data") == []


def test_unknown_name_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar100"):
        load_cifar("cifar1000", tmp_path, download=False)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        ({"data": np.zeros((4, 3000), dtype=np.uint8)}, "expected uint8"),
        ({"data": np.zeros((4, 3072), dtype=np.float32)}, "expected uint8"),
        ({"labels": [0, 1, 2]}, "to match 'data'"),
        ({"labels": [0, 1, 2, 10]}, r"expected \[0, 9\]"),
        ({"labels": [0.5, 1, 2, 3]}, "expected integers"),
    ],
)
def test_invalid_batch_names_the_file(tmp_path: Path, corrupt: dict, expected: str) -> None:
    want = make_cifar10(tmp_path / "server", corrupt=corrupt)
    with pytest.raises(DataError, match=expected) as excinfo:
        load_cifar("cifar10", tmp_path / "data", url=want.archive.as_uri(), md5=want.md5)
    assert "data_batch_1" in str(excinfo.value)


# --- safe_extract -------------------------------------------------------------------------


@pytest.fixture(params=["with_filter", "without_filter"])
def tar_filter(request, monkeypatch) -> str:
    """Run tar tests with tarfile's data filter and as on Pythons that lack it."""
    if request.param == "without_filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
        if hasattr(tarfile, "fully_trusted_filter"):
            # Make tarfile's own default "no filter" (as on old Pythons), so neither 3.14's
            # default data filter nor 3.12's warning hides what our checks alone do.
            trusted = staticmethod(tarfile.fully_trusted_filter)
            monkeypatch.setattr(tarfile.TarFile, "extraction_filter", trusted)
    elif not hasattr(tarfile, "data_filter"):
        return "without_filter"  # an old Python: our own checks are all there is to test
    return request.param


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _file(name: str, payload: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), payload


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_safe_extract_tar_round_trip(tmp_path: Path, tar_filter: str) -> None:
    archive = _tar(
        tmp_path / "ok.tar.gz",
        _file("top/a.txt", b"alpha"),
        _file("top/b.txt", b"beta"),
        _link("top/up", "../top/b.txt"),  # '..' that stays inside is fine
        _link("top/link", "a.txt"),  # symlink inside dest is fine
        _link("top/hard", "top/a.txt", tarfile.LNKTYPE),
    )
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/b.txt").read_bytes() == b"beta"
    assert os.readlink(dest / "top/link") == "a.txt"
    assert (dest / "top/up").read_bytes() == b"beta"
    assert (dest / "top/hard").read_bytes() == b"alpha"
    assert {p for p in snapshot(tmp_path) if not p.startswith("out/")} == {"ok.tar.gz", "out"}


def test_safe_extract_plain_tar_and_zip(tmp_path: Path) -> None:
    tar_path = _tar(tmp_path / "plain.tar", _file("x/y.bin", b"\x00\x01"))
    safe_extract(tar_path, tmp_path / "from_tar")
    assert (tmp_path / "from_tar/x/y.bin").read_bytes() == b"\x00\x01"

    zip_path = tmp_path / "data.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("x/y.bin", b"\x02\x03")
    safe_extract(zip_path, tmp_path / "from_zip")
    assert (tmp_path / "from_zip/x/y.bin").read_bytes() == b"\x02\x03"


def _unsafe_tars(outside: Path) -> dict[str, tuple]:
    dev = tarfile.TarInfo("dev/null")
    dev.type = tarfile.CHRTYPE
    return {
        "absolute path": (_file(str(outside / "abs.txt")),),
        "dotdot escape": (_file("ok/../../dotdot.txt"),),
        "symlink outside": (_link("evil", "../"),),
        "absolute symlink": (_link("evil", str(outside)),),
        "file through symlink": (_link("evil", "."), _file("evil/../through.txt")),
        "symlink through symlink": (_link("here", "."), _link("evil", "here/..")),
        "hardlink outside": (_link("evil", "../secret.txt", tarfile.LNKTYPE),),
        "device file": ((dev, None),),
    }


@pytest.mark.parametrize("case", list(_unsafe_tars(Path("/x"))))
def test_safe_extract_refuses_unsafe_tar(tmp_path: Path, tar_filter: str, case: str) -> None:
    # The archive lives in tmp_path/work, so "outside dest" is a folder we can watch.
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_text("keep")
    members = _unsafe_tars(work)[case]
    archive = _tar(work / "evil.tar.gz", _file("harmless.txt", b"fine"), *members)
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match="refusing to extract") as excinfo:
        safe_extract(archive, work / "sub" / "dest")

    message = str(excinfo.value)
    assert str(archive) in message and repr(members[-1][0].name) in message
    # Nothing was written anywhere, not even the parent of dest (beyond creating it).
    assert snapshot(tmp_path) - before <= {"work/sub"}
    assert not any((work / "sub").iterdir())
    assert (work / "secret.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "name, file_type",
    [
        ("../evil.txt", 0),
        ("a/../../evil.txt", 0),
        ("/abs/evil.txt", 0),
        ("link", stat.S_IFLNK),  # zipfile would write it as a regular file; refuse instead
    ],
)
def test_safe_extract_refuses_unsafe_zip(tmp_path: Path, name: str, file_type: int) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("harmless.txt", b"fine")
        info = zipfile.ZipInfo(name)
        info.external_attr = (file_type | 0o644) << 16
        zf.writestr(info, b"../../pwned")
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match="refusing to extract") as excinfo:
        safe_extract(archive, tmp_path / "dest")

    assert repr(name) in str(excinfo.value)
    assert snapshot(tmp_path) == before


def test_safe_extract_truncated_tar_gz(tmp_path: Path) -> None:
    payload = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    good = _tar(tmp_path / "good.tar.gz", _file("big.bin", payload))
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    before = snapshot(tmp_path)

    with pytest.raises(DataError, match="truncated"):
        safe_extract(truncated, tmp_path / "dest")
    assert snapshot(tmp_path) == before


def test_safe_extract_interrupted_leaves_no_dest(tmp_path: Path, monkeypatch) -> None:
    archive = _tar(tmp_path / "ok.tar.gz", _file("a.txt", b"a"))
    real_extractall = tarfile.TarFile.extractall

    def extract_then_die(self, path, *args, **kwargs):
        real_extractall(self, path, *args, **kwargs)
        raise KeyboardInterrupt  # as if Ctrl-C arrived just before the rename

    monkeypatch.setattr(tarfile.TarFile, "extractall", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        safe_extract(archive, tmp_path / "dest")
    assert snapshot(tmp_path) == {"ok.tar.gz"}


def test_safe_extract_refuses_existing_dest_and_unknown_type(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "ok.tar", _file("a.txt", b"a"))
    (tmp_path / "dest").mkdir()
    with pytest.raises(DataError, match="already exists"):
        safe_extract(archive, tmp_path / "dest")
    rar = tmp_path / "data.rar"
    rar.write_bytes(b"Rar!")
    with pytest.raises(DataError, match="unsupported"):
        safe_extract(rar, tmp_path / "other")


def test_checksums_match_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    blob = os.urandom(3 << 20)  # several read chunks
    path.write_bytes(blob)
    assert md5_file(path) == hashlib.md5(blob).hexdigest()
    assert sha256_file(path) == hashlib.sha256(blob).hexdigest()
