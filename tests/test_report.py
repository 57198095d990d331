"""Metrics (ECE, confusion), reports (Markdown + self-contained HTML, comparison of runs),
metrics.csv / TensorBoard logging and progress lines.

Report tests build run directories by hand from real metric functions (fast); the
end-to-end ``kdistill run`` -> report path is in test_report_e2e.py.
"""

from __future__ import annotations

import base64
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from kdistill.cli import build_parser, main
from kdistill.errors import ConfigError, ReportError
from kdistill.evaluate import (
    agreement,
    calibration,
    classification_metrics,
    confusion_matrix,
    profile_model,
)
from kdistill.logger import MetricsLog, scalar_tag, to_csv
from kdistill.models import create_model
from kdistill.progress import PlainProgress, progress
from kdistill.report import headline, pareto_front, write_report
from kdistill.report.leaderboard import write_leaderboard
from kdistill.stats import pack_outcomes, wilson_interval
from tests.html_check import check_html

CLASSES = ["cat", "dog", "ship"]


# ----------------------------------------------------------------------------- calibration


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log().float()  # softmax(log p) = p


def test_ece_matches_a_hand_computation() -> None:
    # confidences 0.9 (right), 0.95 (wrong), 0.7 (right), 0.7 (wrong); 15 bins of width 1/15
    logits = _logits([[0.9, 0.1], [0.95, 0.05], [0.7, 0.3], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 0, 0])
    c = calibration(logits, labels)
    # bins: 0.9 in (13/15, 14/15] -> 13; 0.95 in (14/15, 1] -> 14; 0.7 in (10/15, 11/15] -> 10
    # ECE = 1/4 |1 - 0.9| + 1/4 |0 - 0.95| + 2/4 |0.5 - 0.7| = 0.025 + 0.2375 + 0.1
    assert c["ece"] == pytest.approx(0.3625, abs=1e-6)
    assert c["bins"] == 15 and sum(c["bin_count"]) == 4
    assert [i for i, n in enumerate(c["bin_count"]) if n] == [10, 13, 14]
    assert c["bin_count"][10] == 2
    assert c["bin_accuracy"][10] == pytest.approx(0.5) and c["bin_confidence"][10] == pytest.approx(0.7)
    assert c["mean_confidence"] == pytest.approx((0.9 + 0.95 + 0.7 + 0.7) / 4)


def test_ece_against_a_loop_over_bin_edges() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = logits.softmax(1)
    conf, pred = probs.max(1)
    ece = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            acc = (pred[inside] == labels[inside]).float().mean()
            ece += inside.float().mean().item() * abs(acc.item() - conf[inside].mean().item())
    assert calibration(logits, labels)["ece"] == pytest.approx(ece, abs=1e-6)
    # a perfectly confident, always right model is perfectly calibrated
    assert calibration(torch.eye(7)[labels] * 100, labels)["ece"] == pytest.approx(0.0, abs=1e-6)


def test_confusion_matrix_and_classification_metrics() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    labels = torch.tensor([0, 1, 1, 2])
    assert confusion_matrix(logits, labels) == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    m = classification_metrics(logits, labels, CLASSES)
    assert m["top1"] == pytest.approx(75.0)
    assert m["per_class_top1"] == {"cat": 100.0, "dog": 50.0, "ship": 100.0}
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]] and m["classes"] == CLASSES
    assert m["ece"] == pytest.approx(m["calibration"]["ece"]) and m["nll"] > 0


def test_pareto_front() -> None:
    points = [(10.0, 70.0), (1.0, 60.0), (5.0, 55.0), (5.0, 65.0), (20.0, 69.0)]
    assert pareto_front(points) == [(1.0, 60.0), (5.0, 65.0), (10.0, 70.0)]


def test_profile_has_size_and_latency_with_repeats() -> None:
    model = create_model("seed_student", num_classes=3)
    p = profile_model(model, (3, 32, 32))
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert state_bytes < p["disk_bytes"] < state_bytes + 20_000  # the weights plus a little metadata
    for key in ("latency_b1", "throughput_b256"):
        lat = p[key]
        assert 0 < lat["median_ms"] <= lat["p90_ms"] and lat["repeats"] >= 5 and lat["warmup"] > 0
    assert p["throughput_b256"]["batch_size"] == 256
    assert ("gpu" in p) == torch.cuda.is_available()


# ----------------------------------------------------------------------------- run directories


def _history(epochs: int, kd: bool, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": e,
            "lr": 0.05 * (1 - e / (epochs + 1)),
            "train_loss": 2.0 / e + 0.1 * torch.rand(1, generator=g).item(),
            "train_top1": 30 + 10 * e,
            "train_seconds": 1.0,
            "train_images": 100,
            "images_per_second": 100.0,
            "test_top1": 25 + 9 * e,
            "test_loss": 2.0 / e,
        }
        if kd:
            row.update(train_ce=1.0 / e, train_kd=1.0 / e)
        rows.append(row)
    return rows


def fake_run(root: Path, name: str, temperature: float, seed: int = 0, deployment: bool = True) -> Path:
    """A finished study run directory, written the way study.py writes one, with real
    metrics of random logits and real profiles of real (untrained) models."""
    run = root / name
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(60) % 3
    models = {}
    for phase, arch, skill in (
        ("teacher", "seed_teacher", 3.0),
        ("baseline", "seed_student", 1.0),
        ("distilled", "seed_student", 1.5 + seed),
    ):
        logits = torch.randn(60, 3, generator=g) + skill * torch.nn.functional.one_hot(labels, 3)
        profile = profile_model(create_model(arch, num_classes=3), (3, 32, 32), latency=False)
        scale = 4.0 if phase == "teacher" else 1.0
        profile["latency_b1"] = {
            "median_ms": 0.5 * scale,
            "p90_ms": 0.7 * scale,
            "images_per_second": 2000 / scale,
            "repeats": 30,
            "warmup": 5,
            "batch_size": 1,
        }
        profile["throughput_b256"] = {
            "median_ms": 50 * scale,
            "p90_ms": 60 * scale,
            "images_per_second": 5000 / scale,
            "repeats": 10,
            "warmup": 2,
            "batch_size": 256,
        }
        models[phase] = {
            "model": arch,
            "test": classification_metrics(logits, labels, CLASSES),
            "profile": profile,
            "train_seconds": 10.0,
            "images_per_second": 100.0,
            "epochs": 3,
            "logits": logits,
        }
        (run / phase).mkdir(parents=True)
        (run / phase / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _history(3, phase == "distilled", seed))
        )
    for phase in ("baseline", "distilled"):
        models[phase]["agreement"] = agreement(models[phase]["logits"], models["teacher"]["logits"])
    for m in models.values():
        del m["logits"]
    summary = {
        "name": name,
        "seed": seed,
        "device": "cpu",
        "method": "kd",
        "platform": "test",
        "data": {"dataset": "fake", "train_size": 300, "test_size": 60, "num_classes": 3},
        "models": models,
        "wall_seconds": 1.0,
    }
    if deployment:
        lat = {"latency_b1": {"median_ms": 0.1, "p90_ms": 0.2}, "throughput_b256": {"images_per_second": 9000.0}}
        summary["deployment"] = {
            "pytorch_top1": models["distilled"]["test"]["top1"],
            "onnx": {
                "path": str(run / "distilled/model.onnx"),
                "top1": models["distilled"]["test"]["top1"],
                "disk_bytes": 1_000_000,
                "max_abs_diff": 2e-6,
                "mean_abs_diff": 1e-7,
                "top1_agreement": 100.0,
                "num_images": 60,
                **lat,
            },
            "int8": {
                "path": str(run / "distilled/model.int8.onnx"),
                "mode": "static",
                "calibration_images": 64,
                "top1": models["distilled"]["test"]["top1"] - 1.0,
                "disk_bytes": 270_000,
                "max_abs_diff": 0.3,
                "mean_abs_diff": 0.05,
                "top1_agreement": 97.0,
                "num_images": 60,
                **lat,
            },
        }
    summary["headline"] = headline(summary)
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(f"distill:\n  alpha: 0.9\n  methods:\n    kd: {{temperature: {temperature}}}\n")
    return run


def _embedded_images(html_text: str) -> list[bytes]:
    import re

    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)]


@pytest.mark.slow
def test_report_of_a_run(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "t4", 4.0)
    md = write_report(run)
    text = md.read_text()
    summary = json.loads((run / "summary.json").read_text())
    d = summary["models"]["distilled"]
    # the comparison table with the new columns, the headline and the deployment section
    for needle in (
        "ECE",
        "NLL",
        "size on disk",
        "p90",
        f"{d['test']['top1']:.2f}%",
        f"{d['test']['ece']:.3f}",
        "kd (temperature 4.0), alpha 0.9",
        "ONNX Runtime int8 (static)",
        "calibrated on 64 training images",
        "Which classes distillation helped",
        "reliability diagram",
    ):
        assert needle in text, needle
    gain = d["test"]["top1"] - summary["models"]["baseline"]["test"]["top1"]
    assert f"Distillation bought {gain:+.2f} points" in text
    for cls in CLASSES:
        assert f"| {cls} |" in text
    figures = [
        "curves.png",
        "figures/pareto.png",
        "figures/class_deltas.png",
        "figures/confusion.png",
        "figures/reliability.png",
    ]
    for fig in figures:
        assert f"]({fig})" in text and (run / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig

    # report.html: the same content, self-contained, every figure embedded
    page = (run / "report.html").read_text()
    counts = check_html(page)
    assert counts == {"tables": 3, "rows": 1 + 3 + 1 + 3 + 1 + 3, "images": len(figures)}
    assert [img for img in _embedded_images(page)] == [
        (run / f).read_bytes()
        for f in (
            "figures/pareto.png",
            "curves.png",
            "figures/class_deltas.png",
            "figures/confusion.png",
            "figures/reliability.png",
        )
    ]
    assert "<script" not in page and "http://" not in page and "https://" not in page

    # summary.csv: one row per model, the numbers of summary.json
    rows = (run / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,phase,model,top1") and len(rows) == 4
    assert rows[3].split(",")[1] == "distilled" and float(rows[3].split(",")[3]) == pytest.approx(d["test"]["top1"])


def test_report_without_deployment_or_new_metrics(tmp_path: Path) -> None:
    """A run written before calibration/confusion/ONNX existed still gets a report."""
    run = fake_run(tmp_path, "old", 2.0, deployment=False)
    summary = json.loads((run / "summary.json").read_text())
    for m in summary["models"].values():
        for key in ("ece", "calibration", "confusion", "classes"):
            del m["test"][key]
        del m["profile"]["disk_bytes"]
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "No ONNX export in this run" in text and "n/a" in text
    assert "Confusion matrices" not in text
    check_html((run / "report.html").read_text())


@pytest.mark.slow
def test_report_command_compares_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = fake_run(tmp_path / "runs", "t2", 2.0, seed=0), fake_run(tmp_path / "runs", "t4", 4.0, seed=1)
    shared = json.loads((b / "summary.json").read_text())  # b distilled from a's teacher: no teacher phase of its own
    shared["models"]["teacher"].update(train_seconds=0.0, images_per_second=None)
    shared["models"]["baseline"].update(train_seconds=12.5, images_per_second=250.0)
    shared["wall_seconds"] = 30.0
    shared["models"]["distilled"]["teacher_cache"] = {"path": "c.pt", "epochs": 12, "build_seconds": 6.4}
    (b / "summary.json").write_text(json.dumps(shared))
    out = tmp_path / "cmp"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    assert "comparison report" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "comparison of 2 runs" in text
    for run, t in ((a, "2.0"), (b, "4.0")):
        s = json.loads((run / "summary.json").read_text())
        gain = s["models"]["distilled"]["test"]["top1"] - s["models"]["baseline"]["test"]["top1"]
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.name} |"))
        assert f"kd (temperature {t}), alpha 0.9" in row and f"{gain:+.2f}" in row
    counts = check_html((out / "report.html").read_text())
    assert counts["images"] == 4 and counts["tables"] == 5  # runs, how sure (models, each run), cost
    assert "Over these runs the distillation gain is" in text
    # what each run cost: each phase's time and images/s, the run's wall time, the totals
    cost = text[text.index("## What each run cost") :]
    assert "| t2 | 10 s (100 img/s) | 10 s (100 img/s) | 10 s (100 img/s) | – | 1 s |" in cost
    # 12.5 rounds to even; the teacher cache b's student read, built once, beside its training
    assert "| t4 | – | 12 s (250 img/s) | 10 s (100 img/s) | 6 s (12 epochs of views) | 30 s |" in cost
    assert "| total | 10 s | 22 s | 20 s | 6 s | 31 s |" in cost
    written = json.loads((out / "summary.json").read_text())["cost"]
    assert written["total"] == {
        "teacher": 10.0,
        "baseline": 22.5,
        "distilled": 20.0,
        "wall_seconds": 31.0,
        "teacher_cache_seconds": 6.4,
    }
    assert written["runs"][1]["phases"]["teacher"] == {"train_seconds": None, "images_per_second": None}
    over = json.loads((out / "summary.json").read_text())["statistics"]
    assert over["gain"]["n"] == 2 and over["gain"]["low"] <= over["gain"]["mean"] <= over["gain"]["high"]
    csv_rows = (out / "comparison.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 6 and csv_rows[1].startswith("t2,teacher")

    # one run: (re)writes that run's own report
    assert not (a / "report.md").exists()
    assert main(["report", str(a)]) == 0
    assert (a / "report.md").is_file() and (a / "report.html").is_file()


def test_report_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: error:") and "summary.json does not exist" in err and len(err.splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{not json")
    assert main(["report", str(tmp_path / "bad")]) == 2
    assert "bad/summary.json is unreadable" in capsys.readouterr().err
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "summary.json").write_text(json.dumps({"model": "seed_student", "test": {}}))
    assert main(["report", str(tmp_path / "single")]) == 2
    assert "not the summary of a study run" in capsys.readouterr().err
    run = fake_run(tmp_path, "r", 2.0)
    assert main(["report", str(run), str(run), "-o", str(tmp_path / "o")]) == 2
    assert "given twice" in capsys.readouterr().err


def test_leaderboard_of_a_sweep(tmp_path: Path) -> None:
    """leaderboard.csv (every column), leaderboard.md and the self-contained leaderboard.html."""
    common = {"student": "seed_student", "parameters": 267747, "macs": 1884544, "epochs": 2, "top5": 90.0}
    rows = [
        {
            **common,
            "name": "seed_student-at-a0.5",
            "method": "at",
            "temperature": None,
            "alpha": 0.5,
            "teacher": "live",
            "top1": 41.25,
            "agreement": 60.5,
            "train_seconds": 9.4,
            "images_per_second": 539.2,
        },
        {
            **common,
            "name": "seed_student-kd-T4-a0.9",
            "method": "kd",
            "temperature": 4.0,
            "alpha": 0.9,
            "teacher": "cache",
            "top1": 40.0,
            "agreement": 58.0,
            "train_seconds": 4.0,
            "images_per_second": 1216.0,
        },
    ]
    # per-image outcomes on 400 test images: the best gets 165 right, the second 160; they
    # disagree on 30 images (the best alone right on 17, the second alone on 12)
    best = np.zeros(400, dtype=bool)
    best[:165] = True
    second = best.copy()
    second[148:165] = False
    second[165:177] = True
    rows[0]["test_correct"], rows[1]["test_correct"] = pack_outcomes(best), pack_outcomes(second)
    cache = "2 epochs x 100 samples"  # the teacher cache, described
    write_leaderboard(tmp_path, rows, cache_seconds=3.2, cache=cache, wall_seconds=20.4)
    table = list(csv.DictReader((tmp_path / "leaderboard.csv").open()))
    assert list(table[0]) == [
        "rank",
        "name",
        "student",
        "method",
        "temperature",
        "alpha",
        "teacher",
        "top1",
        "top5",
        "agreement",
        "parameters",
        "macs",
        "epochs",
        "train_seconds",
        "images_per_second",
        "top1_low",
        "top1_high",
        "vs_best",
        "vs_best_low",
        "vs_best_high",
        "vs_best_p",
    ]
    p = scipy_stats.binomtest(12, 29, 0.5).pvalue
    assert float(table[1]["vs_best"]) == pytest.approx(-1.25) and float(table[1]["vs_best_p"]) == pytest.approx(p)
    assert float(table[0]["top1_low"]) == pytest.approx(wilson_interval(165, 400)["low"])
    assert table[0]["vs_best"] == "" and float(table[1]["vs_best_low"]) < -1.25 < float(table[1]["vs_best_high"])
    assert [(r["rank"], r["name"], r["temperature"], r["top1"]) for r in table] == [
        ("1", "seed_student-at-a0.5", "", "41.25"),
        ("2", "seed_student-kd-T4-a0.9", "4.0", "40.0"),
    ]
    md = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert md[0] == f"# Sweep leaderboard: {tmp_path.name}"
    assert md[2] == (
        "2 configurations, sorted by test top-1 (last epoch). Wall time of this invocation 20 s; the teacher cache "
        "(2 epochs x 100 samples) took 3 s to build and served every 'cache' row (3.2 s per run over the 1 that read "
        "it, not in their training time)."
    )
    assert md[4] == (
        "Intervals: 95% Wilson interval of each top-1 over the 400 test images; 'vs best' is the paired difference "
        "to the best configuration on the same images (percentile bootstrap 95% CI) and McNemar's exact p. 1 of the "
        "other 1 configurations are not distinguishable from the best (p >= 0.05): seed_student-kd-T4-a0.9."
    )
    low, high = (float(table[1][k]) for k in ("vs_best_low", "vs_best_high"))
    ci, ci2 = wilson_interval(165, 400), wilson_interval(160, 400)
    assert md[7:10] == [
        "| ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| 1 | seed_student | at | – | 0.5 | live | 41.25% | {ci['low']:.1f}–{ci['high']:.1f} | – | – | 90.00% | 60.50% | "
        "0.27 M | 1.9 M | 2 | 9 s | 539 |",
        f"| 2 | seed_student | kd | 4 | 0.9 | cache | 40.00% | {ci2['low']:.1f}–{ci2['high']:.1f} | -1.25 ({low:+.2f} to {high:+.2f}) | {p:.3g} | "
        "90.00% | 58.00% | 0.27 M | 1.9 M | 2 | 4 s | 1216 |",
    ]
    assert md[-1] == "![accuracy vs cost](accuracy_vs_cost.png)"
    assert check_html((tmp_path / "leaderboard.html").read_text()) == {"tables": 1, "rows": 3, "images": 1}
    assert _embedded_images((tmp_path / "leaderboard.html").read_text()) == [
        (tmp_path / "accuracy_vs_cost.png").read_bytes()
    ]
    # an existing cache, and none: said so, or nothing said
    write_leaderboard(tmp_path, rows, cache_seconds=0.0, cache=cache, wall_seconds=20.4)
    assert (
        "Wall time of this invocation 20 s; teacher cache: 2 epochs x 100 samples."
        in (tmp_path / "leaderboard.md").read_text()
    )
    write_leaderboard(tmp_path, rows, cache_seconds=0.0, cache=None, wall_seconds=20.4)
    assert "Wall time of this invocation 20 s.\n" in (tmp_path / "leaderboard.md").read_text()


def test_check_html_rejects_external_and_broken_content() -> None:
    ok = "<html><body><table><tr><th>a</th></tr></table></body></html>"
    assert check_html(ok)["tables"] == 1
    for bad, why in (
        ('<html><body><img src="x.png" alt="a"></body></html>', "not embedded"),
        ('<html><body><img src="data:image/png;base64,AAAA" alt="a"></body></html>', "does not decode"),
        ("<html><body><script>1</script></body></html>", "<script>"),
        ("<html><body><div></body></html>", "does not close"),
        ('<html><head><link rel="stylesheet" href="https://cdn/x.css"></head><body></body></html>', "<link>"),
        ('<html><body><p style="background: url(a.png)">x</p></body></html>', "url()"),
    ):
        with pytest.raises(ReportError, match=why.replace("(", r"\(").replace(")", r"\)")):
            check_html(bad)


# ----------------------------------------------------------------------------- logging


def test_metrics_csv_and_tensorboard(tmp_path: Path) -> None:
    import kdistill

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(64) % 2

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 8 * 8, 2)

        def forward(self, x):
            return self.fc(x.flatten(1))

    kdistill.train(
        Tiny(),
        (x, y),
        (x, y),
        epochs=2,
        batch_size=16,
        device="cpu",
        run_dir=tmp_path / "r",
        tensorboard=True,
        channels_last=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    csv_lines = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    header = csv_lines[0].split(",")
    assert header == list(rows[0]) and len(csv_lines) == 3
    assert float(csv_lines[2].split(",")[header.index("test_top1")]) == pytest.approx(rows[1]["test_top1"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/top1", "test/top1", "test/loss", "train/lr"} <= tags
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("test/top1")] == [
        (r["epoch"], round(r["test_top1"], 4)) for r in rows
    ]


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(
        ConfigError,
        match=r"tensorboard package is not installed; install it with: pip install 'kdistill\[tensorboard\]'",
    ):
        MetricsLog(tmp_path, [], tensorboard=True)


def test_tensorboard_flag_and_csv_helpers() -> None:
    from kdistill.cli import _config_from_args

    args = build_parser().parse_args(["run", "--tensorboard"])
    assert _config_from_args(args).train.tensorboard is True
    assert _config_from_args(build_parser().parse_args(["run"])).train.tensorboard is False
    assert (
        scalar_tag("train_kd") == "train/kd" and scalar_tag("val_top1") == "val/top1" and scalar_tag("lr") == "train/lr"
    )
    assert to_csv([{"a": 1}, {"a": 2, "b": 3}]) == "a,b\n1,\n2,3\n"


# ----------------------------------------------------------------------------- progress


def test_plain_progress_lines_with_eta(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("KDISTILL_LOG_INTERVAL", "0")
    bar = progress(range(4), desc="evaluate teacher")  # stderr is not a terminal under pytest
    assert isinstance(bar, PlainProgress)
    assert list(bar) == [0, 1, 2, 3]
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("evaluate teacher: 1/4 (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("evaluate teacher: done, 4 steps in")
    # the default interval keeps short phases quiet
    monkeypatch.delenv("KDISTILL_LOG_INTERVAL")
    assert list(progress(range(3), desc="quick")) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    assert list(progress(iter([1, 2]), total=2, desc="x", disable=True)) == [1, 2]
    assert not math.isnan(len(bar))


def _summary_with(teacher: float, baseline: float, distilled: float) -> dict:
    profile = {"parameters": 100, "macs": 1000, "latency_b1": {"median_ms": 1.0}}
    return {
        "models": {
            p: {"test": {"top1": v}, "profile": profile}
            for p, v in (("teacher", teacher), ("baseline", baseline), ("distilled", distilled))
        }
    }


@pytest.mark.parametrize(
    "teacher, baseline, distilled, says, never",
    [
        (70.0, 60.0, 65.0, ["bought +5.00 points", "50% of the teacher–student gap closed"], ["warning", "cost"]),
        (70.0, 60.0, 58.0, ["cost 2.00 points", "gap widened from 10.00 to 12.00 points"], ["bought", "closed"]),
        (70.0, 60.0, 60.0, ["left test top-1 unchanged"], ["bought", "closed", "cost"]),
        (70.0, 60.0, 72.0, ["bought +12.00 points", "beat its teacher"], ["closed"]),
        # issue 18's case: a 1-epoch teacher (28%) far below the student alone (55%)
        (
            28.0,
            55.0,
            46.8,
            ["cost 8.20 points", "warning: the teacher, 28.00%, is not better than the student alone, 55.00%"],
            ["closed", "bought"],
        ),
        (55.0, 55.0, 57.0, ["bought +2.00 points", "warning: the teacher"], ["closed"]),
    ],
)
def test_headline_is_true_in_every_sign_case(teacher, baseline, distilled, says, never) -> None:
    from kdistill.report.run_report import headline_sentence

    text = headline_sentence(_summary_with(teacher, baseline, distilled))
    for fragment in says:
        assert fragment in text, text
    for fragment in never:
        assert fragment not in text, text
    gap = headline(_summary_with(teacher, baseline, distilled))["gap_closed"]
    assert (gap is None) == (teacher <= baseline)  # null (valid JSON) exactly when there is no gap to close


def test_report_of_one_run_honours_output_folder(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "one", 4.0)
    out = tmp_path / "elsewhere"
    assert main(["report", str(run), "-o", str(out)]) == 0
    assert (out / "report.md").exists() and (out / "report.html").exists() and (out / "curves.png").exists()
    assert (out / "figures" / "pareto.png").exists() and (out / "summary.csv").exists()
    assert not (run / "report.md").exists()  # the run directory is left as it was
    check_html((out / "report.html").read_text())


def test_study_warns_when_the_teacher_is_not_better(capsys: pytest.CaptureFixture) -> None:
    from kdistill.study import warn_if_teacher_not_better

    warn_if_teacher_not_better(_summary_with(28.0, 55.0, 46.8)["models"])
    assert "warning: the teacher (28.00%) is not better than the student alone (55.00%)" in capsys.readouterr().err
    warn_if_teacher_not_better(_summary_with(70.0, 60.0, 65.0)["models"])
    assert "warning" not in capsys.readouterr().err


def test_report_states_how_sure_the_gain_is(tmp_path: Path) -> None:
    import numpy as np

    from kdistill.stats import mcnemar, paired_bootstrap

    run = fake_run(tmp_path, "sure", 4.0)
    summary = json.loads((run / "summary.json").read_text())
    a = np.array([True] * 30 + [False] * 30)
    b = np.array([True] * 40 + [False] * 20)
    summary["statistics"] = {"gain": paired_bootstrap(a, b, resamples=500), "mcnemar": mcnemar(a, b)}
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "How sure: the gain is +16.67 points (95% CI" in text and "paired bootstrap over 60 test images" in text
    assert "right and the baseline wrong on 10, the reverse on 0): p = 0.00195" in text


def test_report_states_what_the_gain_cost(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "cost", 4.0)  # every phase trained 10 s at 100 img/s; the study 1 s of wall time
    text = write_report(run).read_text()
    assert "What it cost: training teacher 10 s (100 img/s), student alone (baseline) 10 s (100 img/s)" in text
    assert "the whole study 1 s of wall time" in text
    assert "teacher cache" not in text and "views repeated" not in text

    # a distilled student that read a teacher cache: its cost named, outside the student's time
    summary = json.loads((run / "summary.json").read_text())
    summary["models"]["distilled"]["teacher_cache"] = {"path": "c.pt", "epochs": 12, "build_seconds": 42.4}
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "from a teacher cache (12 epoch(s) of views) built in 42 s once for every run that reads it" in text
    summary["models"]["distilled"]["teacher_cache"]["build_seconds"] = None  # a cache made before it was recorded
    (run / "summary.json").write_text(json.dumps(summary))
    assert "(12 epoch(s) of views) built once for every run" in write_report(run).read_text()
    # one whose views repeated (train.view_period): the teacher's one pass, inside its time
    del summary["models"]["distilled"]["teacher_cache"]
    summary["models"]["distilled"]["teacher_views"] = {"period": 4, "build_seconds": 7.6}
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    assert "views repeated every 4 epoch(s): its teacher ran over them once (8 s, in its training time)" in text
