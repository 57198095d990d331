"""Files kdistill writes get the permissions of a plain ``open()``/``mkdir``: the umask
decides who may read a report, a checkpoint or a downloaded data set, not kdistill."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import save_checkpoint
from kdistill.config import validate_config
from kdistill.data.archive import safe_extract
from kdistill.data.cifar import load_cifar
from kdistill.files import atomic_write, atomic_write_text
from kdistill.runs import open_run_dir

from .test_cifar_download import make_cifar10


@pytest.fixture(params=[0o022, 0o027, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request: pytest.FixtureRequest) -> int:
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_honour_the_umask(tmp_path: Path, umask: int) -> None:
    atomic_write_text(tmp_path / "report.md", "# report\n")
    atomic_write(tmp_path / "summary.json", lambda f: f.write(b"{}"))
    atomic_write_text(tmp_path / "report.md", "# rewritten\n")  # a rewrite too
    save_checkpoint({"model": {"w": torch.zeros(2)}}, tmp_path / "checkpoint.pt")
    for name in ("report.md", "summary.json", "checkpoint.pt"):
        assert mode(tmp_path / name) == 0o666 & ~umask, f"{name}: {oct(mode(tmp_path / name))}"
    assert not list(tmp_path.glob(".*")), "temporary file left behind"


def test_run_directory_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    cfg = validate_config({"name": "shared", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train") as run_dir:
        pass
    for name in ("config.yaml", "git.txt"):
        assert mode(run_dir / name) == 0o666 & ~umask, name


def test_downloaded_and_extracted_data_honour_the_umask(tmp_path: Path, umask: int) -> None:
    want = make_cifar10(tmp_path / "server")
    data_dir = tmp_path / "data"
    load_cifar("cifar10", data_dir, url=want.archive.as_uri(), md5=want.md5)
    assert mode(data_dir / "cifar-10-python.tar.gz") == 0o666 & ~umask
    extracted = tmp_path / "extracted"
    safe_extract(want.archive, extracted)
    assert mode(extracted) == 0o777 & ~umask
