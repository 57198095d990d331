"""The speed commands end to end on the bundled sample: cache-teacher + distill
--teacher-cache, sweep (leaderboard, CSV, plot), run --budget. The throughput harness
(benchmarks/throughput.py) is tested in test_benchmark_scripts.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.checkpoint import save_checkpoint
from kdistill.cli import main
from kdistill.data.dataset import ImageDataset
from kdistill.teacher_cache import TeacherCache
from tests.html_check import check_html

FAST = ["--device", "cpu", "--epochs", "1", "--set", "train.batch_size=250"]


@pytest.fixture(scope="module")
def teacher_ckpt(mini: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) seed teacher saved as a kdistill checkpoint."""
    torch.manual_seed(0)
    model = kdistill.create_model("seed_teacher")
    path = tmp_path_factory.mktemp("teacher") / "checkpoint.pt"
    save_checkpoint(
        {
            "model_spec": {"name": "seed_teacher", "kwargs": {"num_classes": 10}},
            "model": model.state_dict(),
            "data": {"classes": mini.classes},
        },
        path,
    )
    return path


@pytest.mark.slow
def test_cache_teacher_then_distill_from_it(teacher_ckpt: Path, tmp_path: Path, capsys) -> None:
    cache = tmp_path / "cache.pt"
    assert main(["cache-teacher", "--teacher", str(teacher_ckpt), "--out", str(cache), *FAST]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = TeacherCache.load(cache)
    assert loaded.epochs == 1 and loaded.num_samples == 5000 and loaded.logits.dtype == torch.float16
    args = [
        "distill",
        "--teacher",
        str(teacher_ckpt),
        "--teacher-cache",
        str(cache),
        "--output-dir",
        str(tmp_path),
        *FAST,
    ]
    assert main([*args, "--name", "d"]) == 0
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["epochs"] == 1 and "agreement" in summary
    # another seed means other views: refused, one line, naming what differs
    assert main([*args, "--name", "e", "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the run's log lines come first
    assert err.startswith("kdistill: error: teacher cache") and "seed (cache 0, this run 3)" in err
    # more epochs than cached
    assert main([*args, "--name", "f", "--epochs", "2"]) == 2
    assert "holds 1 epochs of teacher outputs but this run trains 2" in capsys.readouterr().err


@pytest.mark.slow
def test_sweep_writes_leaderboard_csv_and_plot(teacher_ckpt: Path, tmp_path: Path) -> None:
    code = main(
        [
            "sweep",
            "--teacher",
            str(teacher_ckpt),
            "--students",
            "seed_student",
            "--methods",
            "kd",
            "dist",
            "--temperatures",
            "2",
            "4",
            "--alphas",
            "0.9",
            "--output-dir",
            str(tmp_path),
            "--name",
            "s",
            *FAST,
        ]
    )
    assert code == 0
    run = tmp_path / "s"
    rows = list(csv.DictReader((run / "leaderboard.csv").open()))
    names = {r["name"] for r in rows}
    assert names == {
        "seed_student-kd-T2-a0.9",
        "seed_student-kd-T4-a0.9",
        "seed_student-dist-T2-a0.9",
        "seed_student-dist-T4-a0.9",
    }
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    top1 = [float(r["top1"]) for r in rows]
    assert top1 == sorted(top1, reverse=True)
    # every row's interval, and each row's paired test against the best (from its summary's outcomes)
    assert all(float(r["top1_low"]) <= float(r["top1"]) <= float(r["top1_high"]) for r in rows)
    assert rows[0]["vs_best_p"] == "" and all(0 < float(r["vs_best_p"]) <= 1 for r in rows[1:])
    assert all(float(r["vs_best"]) == pytest.approx(float(r["top1"]) - top1[0], abs=1e-4) for r in rows[1:])
    assert {r["teacher"] for r in rows} == {"cache"}
    assert (run / "teacher_cache.pt").is_file()
    md = (run / "leaderboard.md").read_text()
    assert "| 1 | seed_student |" in md and "took" in md
    assert (run / "accuracy_vs_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert check_html((run / "leaderboard.html").read_text())["rows"] == 1 + 4
    for name in names:
        assert (run / name / "checkpoint.pt").is_file()
    # resume: every configuration is finished, nothing is retrained (no checkpoint rewritten)
    stamps = {name: (run / name / "checkpoint.pt").stat().st_mtime_ns for name in names}
    assert (
        main(
            [
                "sweep",
                "--teacher",
                str(teacher_ckpt),
                "--students",
                "seed_student",
                "--methods",
                "kd",
                "dist",
                "--temperatures",
                "2",
                "4",
                "--output-dir",
                str(tmp_path),
                "--name",
                "s",
                "--resume",
                *FAST,
            ]
        )
        == 0
    )
    assert {name: (run / name / "checkpoint.pt").stat().st_mtime_ns for name in names} == stamps


@pytest.mark.slow
def test_sweep_trains_configurations_in_parallel_processes(teacher_ckpt: Path, tmp_path: Path, capsys) -> None:
    grid = [
        "sweep",
        "--teacher",
        str(teacher_ckpt),
        "--methods",
        "kd",
        "at",
        "--temperatures",
        "2",
        "4",
        "--alphas",
        "0.5",
        "--output-dir",
        str(tmp_path),
    ]
    assert main([*grid, "--name", "par", "--jobs", "2", *FAST]) == 0
    assert "3 configurations, 2 at a time, " in capsys.readouterr().err
    assert main([*grid, "--name", "seq", *FAST]) == 0
    par = {r["name"]: r for r in csv.DictReader((tmp_path / "par" / "leaderboard.csv").open())}
    seq = {r["name"]: r for r in csv.DictReader((tmp_path / "seq" / "leaderboard.csv").open())}
    assert par.keys() == seq.keys() == {"seed_student-kd-T2-a0.5", "seed_student-kd-T4-a0.5", "seed_student-at-a0.5"}
    assert par["seed_student-at-a0.5"]["teacher"] == "live" and par["seed_student-kd-T2-a0.5"]["teacher"] == "cache"
    for name in par:  # the same training, one thread instead of two: equal up to summation order
        assert abs(float(par[name]["top1"]) - float(seq[name]["top1"])) <= 1.0, name
        assert json.loads((tmp_path / "par" / name / "summary.json").read_text())["name"] == name
    for bad in ("0", "x"):
        assert main([*grid, "--name", "bad", "--jobs", bad, *FAST]) == 2
        err = capsys.readouterr().err
        assert "sweep: --jobs" in err and bad in err and "expected a whole number >= 1 or 'auto'" in err


@pytest.mark.slow
def test_ctrl_c_stops_a_parallel_sweep_resumably(teacher_ckpt: Path, tmp_path: Path) -> None:
    """SIGINT to the sweep's main process (a Ctrl-C reaches only it: the workers leave the
    terminal's process group): no further configuration starts, the running ones save
    resumable checkpoints, and --resume finishes the grid."""
    grid = [
        "-m",
        "kdistill",
        "sweep",
        "--teacher",
        str(teacher_ckpt),
        "--methods",
        "kd",
        "--temperatures",
        "2",
        "4",
        "8",
        "--alphas",
        "0.5",
        "--output-dir",
        str(tmp_path),
        "--name",
        "s",
        "--device",
        "cpu",
        "--epochs",
        "3",
        "--set",
        "train.batch_size=50",
    ]
    env = {**os.environ, "KDISTILL_LOG_INTERVAL": "0"}  # a log line every step
    proc = subprocess.Popen([sys.executable, *grid, "--jobs", "2"], stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:  # wait until both workers train
        seen.append(line)
        if len({m for m in ("kd-T2-a0.5 1/3: 3/", "kd-T4-a0.5 1/3: 3/") if m in "".join(seen)}) == 2:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "interrupted; rerun with --resume" in rest
    run = tmp_path / "s"
    assert not (run / "seed_student-kd-T8-a0.5").exists()  # never started
    for name in ("seed_student-kd-T2-a0.5", "seed_student-kd-T4-a0.5"):
        assert (run / name / "checkpoint.pt").is_file() and not (run / name / "summary.json").exists()
    done = subprocess.run(
        [sys.executable, *grid, "--jobs", "2", "--resume"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader((run / "leaderboard.csv").open()))
    assert len(rows) == 3 and all(int(r["epochs"]) == 3 for r in rows)


@pytest.mark.slow
def test_sweep_runs_feature_methods_live(teacher_ckpt: Path, tmp_path: Path, capsys) -> None:
    assert (
        main(
            [
                "sweep",
                "--teacher",
                str(teacher_ckpt),
                "--methods",
                "at",
                "--output-dir",
                str(tmp_path),
                "--name",
                "f",
                *FAST,
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((tmp_path / "f" / "leaderboard.csv").open()))
    assert [(r["name"], r["teacher"]) for r in rows] == [("seed_student-at-a0.5", "live")]
    assert not (tmp_path / "f" / "teacher_cache.pt").exists()
    assert (
        main(
            [
                "sweep",
                "--teacher",
                str(teacher_ckpt),
                "--methods",
                "nope",
                "--output-dir",
                str(tmp_path),
                "--name",
                "g",
                *FAST,
            ]
        )
        == 2
    )
    assert "unknown method 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_run_with_budget_plans_every_phase(mini: ImageDataset, tmp_path: Path) -> None:
    # Behaviour only: how close a run ends to its budget depends on the machine's load and is
    # measured by benchmarks/budget_curve.py, not asserted here.
    assert main(["run", "--budget", "40s", "--device", "cpu", "--output-dir", str(tmp_path), "--name", "r"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["budget_seconds"] == 40
    steps = {p: summary["models"][p]["budget"]["steps"] for p in ("teacher", "baseline", "distilled")}
    assert all(s > 0 for s in steps.values())
    assert "Time budget: 40 s" in (tmp_path / "r" / "report.md").read_text()
