"""Two runs writing to the same run directory are refused, not interleaved."""

import fcntl
import os
import subprocess
import sys

import pytest

from kdistill.cli import main
from kdistill.config import validate_config
from kdistill.runs import open_run_dir


def test_second_run_into_a_locked_run_dir_is_refused(tmp_path, capsys):
    cfg = validate_config({"name": "busy", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train") as run_dir:
        code = main(
            [
                "train",
                "--model",
                "seed_student",
                "--output-dir",
                str(tmp_path),
                "--name",
                "busy",
                "--resume",
                "--epochs",
                "1",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2
        assert "is in use by kdistill pid" in err and str(run_dir) in err
        assert len(err.strip().splitlines()) == 1  # one line, no traceback
    # once the first run is over, the directory can be resumed
    with open_run_dir(cfg, resume=True, kind="train"):
        pass


@pytest.mark.slow
def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    cfg = validate_config({"name": "dead", "output_dir": str(tmp_path)})
    code = f"""
import os, sys
from kdistill.config import validate_config
from kdistill.runs import open_run_dir
with open_run_dir(validate_config({{'name': 'dead', 'output_dir': {str(tmp_path)!r}}}), False, kind="train"):
    os.kill(os.getpid(), 9)
"""
    proc = subprocess.run([sys.executable, "-c", code], timeout=600)
    assert proc.returncode == -9
    with open_run_dir(cfg, resume=True, kind="train"):  # the kernel dropped the dead process's lock
        pass


def _held(lock_file):
    """Whether another process holds an flock on ``lock_file``."""
    code = (
        "import fcntl, sys\n"
        f"f = open({str(lock_file)!r})\n"
        "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 3


def test_the_lock_file_is_removed_when_the_run_ends(tmp_path):
    cfg = validate_config({"name": "done", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train") as run_dir:
        assert (run_dir / ".lock").read_text() == f"kdistill pid {os.getpid()}\n"
        assert _held(run_dir / ".lock")
    assert not (run_dir / ".lock").exists()
    with pytest.raises(RuntimeError), open_run_dir(cfg, resume=True, kind="train"):  # a run that fails ends too
        raise RuntimeError("boom")
    assert not (run_dir / ".lock").exists()
    assert ".lock" not in {p.name for p in run_dir.iterdir()} and (run_dir / "config.yaml").is_file()


def test_a_killed_runs_leftover_lock_file_is_harmless(tmp_path):
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("kdistill pid 4242\n")  # no process holds it
    cfg = validate_config({"name": "killed", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train"):  # not "already exists": the directory holds nothing else
        assert (run_dir / ".lock").read_text() == f"kdistill pid {os.getpid()}\n"
    assert not (run_dir / ".lock").exists()


def test_a_lock_file_removed_by_its_finishing_holder_is_not_trusted(tmp_path, monkeypatch):
    # the holder ends and removes .lock after this run opened it but before it locked it:
    # a lock on the removed file would lock nothing, so the run locks a fresh .lock
    real_flock = fcntl.flock
    calls = []

    def flock(f, op):
        if not calls and op & fcntl.LOCK_EX:
            os.unlink(f.name)
        calls.append(op)
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    cfg = validate_config({"name": "race", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train") as run_dir:
        monkeypatch.setattr(fcntl, "flock", real_flock)
        assert len(calls) == 2  # locked, found its file gone, locked again
        assert (run_dir / ".lock").read_text() == f"kdistill pid {os.getpid()}\n"
        assert _held(run_dir / ".lock")
