"""The benchmark scripts' own logic (their measurements are run by hand, not here), and
the throughput harness end to end on a few steps of the bundled sample."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from kdistill.data.loader import Normalize, TrainLoader
from kdistill.stats import pack_outcomes, paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    """benchmarks/NAME.py as a module; its folder is on sys.path while it loads, as when
    it runs as a script (for ``from machine import ...``)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


methods_cifar10 = _script("methods_cifar10")
throughput = _script("throughput")


def test_row_names_carry_the_recipe_and_the_method_options():
    parse = methods_cifar10.parse_row
    assert parse("kd") == ("kd", False, {})
    assert parse("dkd:paper") == ("dkd", True, {})
    assert parse("dkd:beta=2") == ("dkd", False, {"beta": 2})
    assert parse("dkd:paper:beta=0.5,temperature=2") == ("dkd", True, {"beta": 0.5, "temperature": 2})
    for bad, message in [("nope", "unknown method 'nope'"), ("dkd:beta", "expected :paper or :KEY=VALUE")]:
        with pytest.raises(SystemExit, match=message):
            parse(bad)


def test_the_table_gives_each_method_its_mean_gain_over_the_same_seeds_baseline(tmp_path):
    base = methods_cifar10.BASELINE
    row = lambda seed, top1: {"seed": seed, "top1": top1, "agreement": 80.0, "seconds": 10.0}  # noqa: E731
    result = {
        "commands": ["python benchmarks/methods_cifar10.py ..."],
        "recipe": ["r", "r"],
        "seeds": [0, 1],
        "rows": {
            base: [row(0, 70.0), row(1, 68.0)],
            "dkd:beta=2": [row(1, 69.5), row(0, 70.5)],  # seed order does not matter
            "fitnets": [{"seed": 0, "top1": None, "failed": "training collapsed", "seconds": 5.0}],
        },
    }
    out = tmp_path / "t.md"
    methods_cifar10.write_table(result, out)
    table = out.read_text()
    # mean ± sample standard deviation; gains +0.5 (seed 0) and +1.5, their t-interval over the 2 seeds
    half = scipy_stats.t.ppf(0.975, 1) * statistics.stdev([1.5, 0.5]) / math.sqrt(2)
    assert (
        f"| dkd:beta=2 | 70.00 ± 0.71 | +0.50, +1.50 | +1.00 ({1 - half:+.2f} to {1 + half:+.2f}) | –, – "
        "| 80.00 ± 0.00 | 10 |"
    ) in table
    assert "| fitnets | seed 0: training collapsed |" in table
    assert json.loads(out.with_suffix(".json").read_text()) == result


def test_the_table_gives_mcnemar_per_seed_and_a_bootstrap_interval_for_one_seed(tmp_path):
    """With per-image outcomes recorded, each seed's McNemar p against its own baseline; one seed's
    interval is the paired bootstrap over the test images."""
    base_right = np.zeros(1000, dtype=bool)
    base_right[:600] = True
    kd_right = base_right.copy()
    kd_right[600:640] = True  # right on 40 more images, wrong on 10 the baseline got right
    kd_right[:10] = False
    row = lambda right: {  # noqa: E731
        "seed": 0,
        "top1": right.mean() * 100,
        "agreement": 80.0,
        "seconds": 1.0,
        "test_correct": pack_outcomes(right),
    }
    result = {
        "commands": ["c"],
        "recipe": ["r"],
        "seeds": [0],
        "rows": {methods_cifar10.BASELINE: [row(base_right)], "kd": [row(kd_right)]},
    }
    out = tmp_path / "t.md"
    methods_cifar10.write_table(result, out)
    line = next(line for line in out.read_text().splitlines() if line.startswith("| kd |"))
    gain = paired_bootstrap(base_right, kd_right)
    p = scipy_stats.binomtest(10, 50, 0.5).pvalue
    assert line == f"| kd | 63.00 | +3.00 | +3.00 ({gain['low']:+.2f} to {gain['high']:+.2f}) | {p:.2g} | 80.00 | 1 |"
    assert gain["low"] > 0


@pytest.mark.slow
def test_throughput_quick_writes_a_table(tmp_path: Path) -> None:
    out = tmp_path / "throughput.md"
    args = ["--quick", "--device", "cpu", "--steps", "2", "--batch-size", "32", "--workers", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert text == done.stdout
    assert (
        "Command: `python benchmarks/throughput.py --quick" in text
        and f"torch {torch.__version__}" in text
        and "threads" in text
    )
    live = next(line for line in text.splitlines() if line.startswith("| seed_teacher → seed_student | live |"))
    cells = [c.strip() for c in live.strip("|").split("|")]
    assert all(c[0].isdigit() for c in cells[2:])  # three rates and two ratios
    assert "| seed_teacher → seed_student | cache |" in text


@pytest.mark.slow
def test_compile_teacher_quick_writes_a_table(tmp_path: Path) -> None:
    """Eager and compiled frozen forward of a tiny airnet, bf16 autocast and float32."""
    out = tmp_path / "compile_teacher.md"
    args = ["--quick", "--steps", "2", "--repeats", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "benchmarks/compile_teacher.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "Command: `python benchmarks/compile_teacher.py --quick" in text and f"torch {torch.__version__}" in text
    rows = [line for line in text.splitlines() if line.startswith("| airnet (4, 8, 8) |")]
    assert [r.split("|")[2].strip() for r in rows] == ["bf16 autocast", "float32"]
    assert all(r.rstrip(" |").endswith("x") for r in rows)


def test_throughput_rejects_a_pair_without_a_student(capsys) -> None:
    assert throughput.main(["--pair", "seed_teacher", "--quick"]) == 2
    assert "expected TEACHER:STUDENT" in capsys.readouterr().err


def test_throughput_ratios_are_the_median_of_each_rounds_ratio(capsys) -> None:
    ratio = throughput.ratio
    # a machine whose speed changed between rounds: every round says 0.9
    rounds = [
        {"pipeline": 900.0, "ceiling": 1000.0},
        {"pipeline": 90.0, "ceiling": 100.0},
        {"pipeline": 450.0, "ceiling": 500.0},
    ]
    result = {"rounds": rounds, "median": {"pipeline": 450.0, "ceiling": 110.0}}  # pooled medians: not used
    assert ratio(result, "pipeline", "ceiling") == pytest.approx(0.9)
    assert ratio(result, "pipeline", "reference") is None
    assert throughput.main(["--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_data_scale_compares_the_store_with_the_packed_in_memory_path(mini, tmp_path):
    """The benchmark's in-memory path (kdistill's path before the store: the set packed
    whole) yields the very batches of the store-backed loader it is compared with."""
    data_scale = _script("data_scale")
    ds = mini.with_validation(1000, seed=1)
    norm = Normalize(*ds.mean_std(), torch.device("cpu"), channels_last=True)
    cpu = torch.device("cpu")
    loader = TrainLoader(ds.train_images, ds.train_labels, 128, cpu, norm, rows=ds.train_rows, pixels=ds.train_pixels)
    per_batch = TrainLoader(ds.train_images, ds.train_labels, 128, cpu, norm, rows=ds.train_rows)
    memory = data_scale.PackedInMemory(loader)
    for (x, y), b, c in zip(memory.epoch(2), loader.epoch(2), per_batch.epoch(2), strict=True):
        assert torch.equal(x, b.images) and torch.equal(y, b.labels) and torch.equal(x, c.images)
    assert data_scale.rss_anon_mib() > 0
    row = {
        "size": 32,
        "build": {"seconds": 20.0, "peak_anon_mib": 300.0, "bytes": 2**30, "train": 50000},
        "speed": {
            **{f"{k}_{p}": 1000.0 for k in ("pipeline", "train") for p in ("store", "memory")},
            "pipeline_per_batch": 500.0,
            "ratio_pipeline": 1.0,
            "ratio_per_batch": 0.5,
            "ratio_train": 1.0,
            "compared_images": 50000,
        },
        "rss": {"store": {"peak_mib": 200.0}, "memory": {"peak_mib": 900.0}},
        "ddp": [{"peak_mib": 210.0}, {"peak_mib": 220.0}],
    }
    args = data_scale.parse(["--data", "x.tar.gz"])
    table = data_scale.write_table([row], args, "python benchmarks/data_scale.py --data x.tar.gz")
    assert (
        "| 32 px | 1.00 | 20 | 300 | 1,000 / 1,000 (1.00) | 500 (0.50) | 1,000 / 1,000 (1.00) | 200 / 900 | 210 / 220 |"
        in table
    )


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith(first_cell)
    ]


@pytest.mark.slow
def test_time_to_accuracy_alternates_the_studies_and_compares_their_wall_time(tmp_path: Path) -> None:
    one = ["train.epochs=1", "teacher.train.epochs=1", "student.train.epochs=1", "distill.train.epochs=1"]
    args = ["--data", "cifar10-mini", "--seeds", "0", "1", "--output-dir", str(tmp_path / "runs")]
    args += ["--out", str(tmp_path / "tta.md")]
    for item in [*one, "deploy.onnx=false"]:
        args += ["--fast-set", item, "--reference-set", item]
    done = subprocess.run(
        [sys.executable, "benchmarks/time_to_accuracy.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "tta.md").read_text()
    # the reference study of the first seed, then the fast study of both seeds, in the order they ran
    reference, fast = _table_rows(text, "| reference"), _table_rows(text, "| fast")
    assert [r[1] for r in reference] == ["0"] and [r[1] for r in fast] == ["0", "1"]
    ran = [
        line.split("--name ")[1].split()[0] for line in done.stdout.splitlines() if line.startswith("$ kdistill run")
    ]
    assert ran == ["fast_s0", "reference_s0", "fast_s1"]
    for r in reference + fast:
        assert r[2].endswith(" s") and all(c.endswith("%") or "%" in c for c in r[6:9])
    summary = json.loads((tmp_path / "runs" / "fast_s1" / "summary.json").read_text())
    assert f"{summary['models']['distilled']['test']['top1']:.2f}%" in fast[1][8]
    assert "x the reference's" in text and "configs/cifar10_seed_fast.yaml" in text


@pytest.mark.slow
def test_budget_curve_compares_alone_live_and_cached_per_seed_and_prices_the_cache(tmp_path: Path) -> None:
    teach = ["train", "-m", "seed_teacher", "--epochs", "1", "--output-dir", str(tmp_path), "--name", "teacher"]
    done = subprocess.run(
        [sys.executable, "-m", "kdistill", *teach], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "budget.md"
    args = ["--data", "cifar10-mini", "--teacher-checkpoint", str(tmp_path / "teacher" / "checkpoint.pt")]
    args += ["--budgets", "2s", "3s", "--seeds", "0", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "benchmarks/budget_curve.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    rows = _table_rows(text, "| 0 |") + _table_rows(text, "| 1 |")
    assert [(r[0], r[1]) for r in rows] == [("0", "2s"), ("0", "3s"), ("1", "2s"), ("1", "3s")]
    assert all(len(r) == 8 and all(c.endswith("%") for c in r[3::2]) for r in rows)  # alone, live, cached
    assert "| seed | budget | alone: epochs | alone: top-1 | live: epochs | live: top-1 | cached: epochs |" in text
    # one cache per seed, its cost stated and amortised over the budgets that share it
    assert text.count("Teacher cache, seed") == 2 and "once for the 2 budgets" in text
