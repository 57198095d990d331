"""Two runs writing to the same run directory are refused, not interleaved."""

import subprocess
import sys

import pytest

from kdistill.cli import main
from kdistill.config import validate_config
from kdistill.runs import open_run_dir


def test_second_run_into_a_locked_run_dir_is_refused(tmp_path, capsys):
    cfg = validate_config({"name": "busy", "output_dir": str(tmp_path)})
    with open_run_dir(cfg, resume=False, kind="train") as run_dir:
        code = main(["train", "--model", "seed_student", "--output-dir", str(tmp_path), "--name", "busy", "--resume", "--epochs", "1"])
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
