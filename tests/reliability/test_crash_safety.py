"""Nothing finished is lost: a full disk or a read-only folder while writing a checkpoint
keeps the previous one and the run resumes from it to the same result; writes are atomic;
leftovers of killed writes are cleaned up; the first run on a data set equals later ones.
(SIGKILL at random moments: ``test_sigkill.py``; Ctrl-C: ``test_interrupt.py``.)"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.checkpoint import load_checkpoint, save_checkpoint
from kdistill.cli import main
from kdistill.config import validate_config
from kdistill.errors import CheckpointError
from kdistill.files import atomic_write, atomic_write_text
from kdistill.runs import open_run_dir

from .bad_inputs import fail_writes
from .conftest import PYTHON, REPO, cli_env

TIMING = ("train_seconds", "images_per_second")


def _train(tiny_tree: Path, output_dir: Path, name: str, *extra: str) -> int:
    args = [
        "train",
        "--model",
        "seed_student",
        "--data",
        str(tiny_tree),
        "--epochs",
        "3",
        "--set",
        "train.batch_size=50",
    ]
    return main([*args, "--device", "cpu", "--output-dir", str(output_dir), "--name", name, *extra])


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS], ids=["disk-full", "read-only"])
def test_failed_checkpoint_write_keeps_the_previous_one_and_resume_is_exact(
    code: int, tiny_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert _train(tiny_tree, tmp_path, "reference") == 0
    with monkeypatch.context() as mp:
        fail_writes(mp, code, epoch=2)  # the disk fails half-way through the checkpoint of epoch 2
        assert _train(tiny_tree, tmp_path, "cut") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "cut"
    assert f"cannot write checkpoint {run_dir / 'checkpoint.pt'}: {os.strerror(code)}" in err
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))

    assert _train(tiny_tree, tmp_path, "cut", "--resume") == 0  # once there is room again
    a, b = load_checkpoint(run_dir / "checkpoint.pt"), load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(run_dir) == _metrics(tmp_path / "reference")


@pytest.mark.slow
def test_real_write_failure_from_the_kernel(tiny_tree: Path, tmp_path: Path) -> None:
    """Not a simulation: the kernel refuses to grow any file past 200 kB (RLIMIT_FSIZE,
    EFBIG), so the run's small files are written but its 1 MB checkpoint is not."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write() instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    args = ["train", "--model", "seed_student", "--data", str(tiny_tree), "--epochs", "1", "--device", "cpu"]
    args += ["--output-dir", str(tmp_path), "--name", "x"]
    proc = subprocess.run(
        [PYTHON, "-m", "kdistill", *args],
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("kdistill: error: cannot write checkpoint") and "File too large" in last, last
    assert not (tmp_path / "x" / "checkpoint.pt").exists()
    assert not list((tmp_path / "x").glob(".*.tmp"))


def test_interrupted_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1}, path)

    class Boom(BaseException):
        pass

    def half_then_interrupt(f):
        f.write(b"x" * 1000)
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, half_then_interrupt)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_unwritable_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    blocked = f"{tmp_path / 'file'} is a file, not a folder"
    with pytest.raises(CheckpointError, match="cannot write checkpoint .*c.pt: " + blocked):
        save_checkpoint({"epoch": 1}, tmp_path / "file" / "c.pt")
    with pytest.raises(CheckpointError, match=blocked):
        atomic_write_text(tmp_path / "file" / "sub" / "metrics.jsonl", "x")


def test_stale_temporaries_are_removed_under_the_lock(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = validate_config({"name": "r", "output_dir": str(tmp_path)})
    run_dir = tmp_path / "r"
    (run_dir / "teacher").mkdir(parents=True)
    stale = [
        run_dir / ".checkpoint.pt.k2j3.tmp",
        run_dir / "teacher" / ".checkpoint.pt.a8x.tmp",
        run_dir / ".summary.json.zz.tmp",
    ]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = run_dir / "notes.tmp"  # not ours: not hidden
    keep.write_text("mine")
    with open_run_dir(cfg, resume=True, kind="train"):
        assert not any(p.exists() for p in stale)
        assert keep.exists()
    assert capsys.readouterr().err.count("an unfinished write of an earlier, killed run") == 3


def test_first_run_on_a_data_set_equals_later_runs(tiny_tree: Path, tmp_path: Path) -> None:
    """Freshly decoded images and the same images from the cache are the same tensors,
    down to the memory layout, so the normalisation (and everything after it) is
    bit-identical whether or not the cache existed (the SIGKILL harness found this)."""
    fresh = kdistill.load_dataset(tiny_tree, data_dir=tmp_path)
    cached = kdistill.load_dataset(tiny_tree, data_dir=tmp_path)
    for name in ("train_images", "test_images"):
        a, b = getattr(fresh, name), getattr(cached, name)
        # the same layout (the training images: a view of the store's packed pixels)
        assert torch.equal(a, b) and a.stride() == b.stride()
    assert fresh.mean_std() == cached.mean_std()
