"""From `kdistill run` on the bundled real images to the reports, end to end.

One 1-epoch study (with ONNX export and int8 quantization of the student), then a second
study reusing its teacher at another temperature, then `kdistill report` on both.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.cli import main
from tests.html_check import check_html

pytestmark = pytest.mark.slow


def _run(output_dir: Path, name: str, *extra: str) -> Path:
    args = [
        "run",
        "--epochs",
        "1",
        "--output-dir",
        str(output_dir),
        "--name",
        name,
        "--device",
        "cpu",
        "--set",
        "deploy.onnx=true",
        "--set",
        "deploy.calibration_images=128",
        *extra,
    ]
    assert main(args) == 0
    return output_dir / name


@pytest.fixture(scope="module")
def runs(kdistill_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("runs")
    first = _run(out, "t2", "-T", "2")
    second = _run(out, "t8", "-T", "8", "--teacher-checkpoint", str(first / "teacher" / "checkpoint.pt"))
    return first, second


def test_summary_has_every_metric(runs: tuple[Path, Path]) -> None:
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    for phase in ("teacher", "baseline", "distilled"):
        m = summary["models"][phase]
        t, p = m["test"], m["profile"]
        assert 0 <= t["ece"] <= 1 and t["nll"] > 0 and len(t["calibration"]["bin_count"]) == 15
        assert sum(map(sum, t["confusion"])) == 1000 and len(t["confusion"]) == 10
        assert sum(row[i] for i, row in enumerate(t["confusion"])) == round(t["top1"] * 10)
        assert p["disk_bytes"] > 4 * p["parameters"] and p["latency_b1"]["p90_ms"] >= p["latency_b1"]["median_ms"]
        rows = (run / phase / "metrics.csv").read_text().splitlines()
        assert rows[0].startswith("epoch,lr,train_loss") and len(rows) == 2
    dep = summary["deployment"]
    assert (
        dep["onnx"]["max_abs_diff"] <= 1e-4
        and dep["onnx"]["top1_agreement"] >= 99.9
        and dep["onnx"]["num_images"] == 1000
    )
    assert dep["int8"]["mode"] == "static" and dep["int8"]["calibration_images"] == 128
    assert abs(dep["int8"]["top1"] - dep["pytorch_top1"]) < 10  # quantized, not broken
    assert (run / "distilled" / "model.onnx").is_file() and (run / "distilled" / "model.int8.onnx").is_file()


def test_run_writes_a_self_contained_html_report(runs: tuple[Path, Path]) -> None:
    run = runs[0]
    md = (run / "report.md").read_text()
    counts = check_html((run / "report.html").read_text())
    assert counts["images"] == md.count("![") == 5
    assert counts["tables"] == 3  # models, deployment, per-class
    assert "ONNX Runtime int8 (static)" in md and "kd (temperature 2.0)" in md
    assert (run / "summary.csv").read_text().count("\n") == 4


def test_report_command_on_two_runs(runs: tuple[Path, Path], tmp_path: Path) -> None:
    first, second = runs
    assert main(["report", str(first), str(second), "-o", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| t2 |" in md and "| t8 |" in md and "temperature 8.0" in md
    check_html((tmp_path / "cmp" / "report.html").read_text())
    # the second run reused the first one's teacher
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in runs)
    assert s2["models"]["teacher"]["test"]["top1"] == pytest.approx(s1["models"]["teacher"]["test"]["top1"], abs=0.11)
