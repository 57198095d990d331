"""The command line end to end on the bundled real CIFAR-10 sample.

One finished ``kdistill run`` (4 epochs per phase) is shared by every test of the module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kdistill.engine as engine
from kdistill.checkpoint import load_checkpoint
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import ConfigError

pytestmark = pytest.mark.slow

PHASES = ("teacher", "baseline", "distilled")
CHANCE = 10.0


def _run_args(output_dir: Path, *extra: str) -> list[str]:
    return [
        "run",
        "--epochs",
        "4",
        "--output-dir",
        str(output_dir),
        "--name",
        "t",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(kdistill_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("runs")
    assert main(_run_args(output_dir)) == 0
    return output_dir / "t"


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_run_records_how_sure_its_gain_is(finished_run: Path) -> None:
    s = _summary(finished_run)["statistics"]
    gain = s["gain"]
    assert gain["low"] <= gain["mean"] <= gain["high"] and gain["n"] == 1000 and gain["confidence"] == 0.95
    models = _summary(finished_run)["models"]
    assert gain["mean"] == pytest.approx(
        models["distilled"]["test"]["top1"] - models["baseline"]["test"]["top1"], abs=1e-6
    )
    assert 0 <= s["mcnemar"]["p_value"] <= 1
    assert "How sure: the gain is" in (finished_run / "report.md").read_text()


def test_run_writes_a_self_explaining_run_dir(finished_run: Path) -> None:
    for name in ("report.md", "summary.json", "curves.png", "config.yaml", "git.txt"):
        assert (finished_run / name).is_file(), name
    assert (finished_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished_run / "git.txt").read_text().strip()

    cfg = load_config(finished_run / "config.yaml")
    assert cfg.train.epochs == 4 and cfg.name == "t" and cfg.device == "cpu"

    for phase in PHASES:
        rows = [json.loads(line) for line in (finished_run / phase / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2, 3, 4], phase
        state = load_checkpoint(finished_run / phase / "checkpoint.pt")
        assert state["epoch"] == 4 and state["model_spec"]["name"] == (
            "seed_teacher" if phase == "teacher" else "seed_student"
        )
        assert state["data"]["classes"][0] == "airplane"
    assert {"train_ce", "train_kd"} <= set(rows[0])  # the distilled phase logs each term


def test_summary_contents(finished_run: Path) -> None:
    summary = _summary(finished_run)
    assert summary["data"] == {
        "dataset": "cifar10-mini",
        "train_size": 5000,
        "test_size": 1000,
        "num_classes": 10,
    }
    assert summary["method"] == "kd"
    models = summary["models"]
    assert set(PHASES) <= set(models)
    for phase in PHASES:
        m = models[phase]
        test = m["test"]
        assert 0 <= test["top1"] <= test["top5"] <= 100
        assert test["num_samples"] == 1000
        assert len(test["per_class_top1"]) == 10
        p = m["profile"]
        assert p["parameters"] > 0 and p["macs"] > 0
        assert p["latency_b1"]["median_ms"] > 0 and p["throughput_b256"]["images_per_second"] > 0
        assert m["epochs"] == 4
    assert models["teacher"]["profile"]["parameters"] > models["distilled"]["profile"]["parameters"]
    assert models["baseline"]["profile"]["parameters"] == models["distilled"]["profile"]["parameters"]
    assert models["baseline"]["profile"]["macs"] == models["distilled"]["profile"]["macs"]
    for phase in ("baseline", "distilled"):
        agreement = models[phase]["agreement"]
        assert 0 <= agreement["agreement_top1"] <= 100 and agreement["mean_kl"] >= 0
    # real learning on real images, well above chance (10%)
    assert models["teacher"]["test"]["top1"] > 3 * CHANCE
    assert models["distilled"]["test"]["top1"] > 3 * CHANCE
    assert models["baseline"]["test"]["top1"] > 2 * CHANCE

    report = (finished_run / "report.md").read_text()
    assert "seed_teacher" in report and "seed_student" in report and "curves.png" in report
    assert f"{models['distilled']['test']['top1']:.2f}%" in report


def test_evaluate_matches_the_summary(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    ckpt = finished_run / "distilled" / "checkpoint.pt"
    teacher = finished_run / "teacher" / "checkpoint.pt"
    assert main(["evaluate", str(ckpt), "--json", "--device", "cpu", "--teacher", str(teacher)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    expected = _summary(finished_run)["models"]["distilled"]
    assert metrics["dataset"] == "cifar10-mini"
    assert metrics["test"]["num_samples"] == 1000
    # the same weights on the same images; at most one image of 1000 may flip between
    # memory formats (the study evaluates the channels-last model it trained)
    assert metrics["test"]["top1"] == pytest.approx(expected["test"]["top1"], abs=0.1)
    assert metrics["agreement"]["agreement_top1"] == pytest.approx(expected["agreement"]["agreement_top1"], abs=0.2)
    assert metrics["profile"]["parameters"] == expected["profile"]["parameters"]

    # the human-readable form of the same evaluation
    assert main(["evaluate", str(teacher), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    top1 = _summary(finished_run)["models"]["teacher"]["test"]["top1"]
    assert "top-1" in out and "parameters" in out and "1000 images" in out
    shown = re.search(r"top-1 ([0-9.]+)%", out)
    assert shown and float(shown.group(1)) == pytest.approx(top1, abs=0.1), out

    # flip test-time augmentation, beside the plain top-1, never in place of it
    assert main(["evaluate", str(ckpt), "--json", "--device", "cpu", "--tta", "flip"]) == 0
    flipped = json.loads(capsys.readouterr().out)["test"]
    assert flipped["top1"] == metrics["test"]["top1"] and 0 < flipped["top1_tta"] <= 100
    assert flipped["nll_tta"] != flipped["nll"]
    assert main(["evaluate", str(ckpt), "--device", "cpu", "--tta", "flip"]) == 0
    assert f"(flip TTA {flipped['top1_tta']:.2f}%)" in capsys.readouterr().out


def test_train_and_distill_commands(finished_run: Path, tmp_path: Path) -> None:
    assert (
        main(
            [
                "train",
                "--model",
                "seed_student",
                "--epochs",
                "1",
                "--output-dir",
                str(tmp_path),
                "--name",
                "tr",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    run = tmp_path / "tr"
    summary = _summary(run)
    assert summary["model"] == "seed_student" and summary["epochs"] == 1
    assert load_checkpoint(run / "checkpoint.pt")["kind"] == "train"
    assert (run / "config.yaml").is_file() and (run / "git.txt").is_file()

    teacher = finished_run / "teacher" / "checkpoint.pt"
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--epochs",
                "1",
                "--output-dir",
                str(tmp_path),
                "--name",
                "d",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    run = tmp_path / "d"
    summary = _summary(run)
    assert summary["model"] == "seed_student" and summary["epochs"] == 1
    assert 0 <= summary["agreement"]["agreement_top1"] <= 100
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["kind"] == "distill"
    assert not any(k.startswith("teacher") for k in state["model"])


def test_run_into_existing_dir_without_resume(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (finished_run / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(_run_args(finished_run.parent)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("kdistill: error:") and "already exists" in err and "--resume" in err
    assert (finished_run / "summary.json").read_bytes() == before


def test_bad_override_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["run", "--set", "train.epochs=0", "--output-dir", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="train.epochs"):  # --debug shows the exception itself
        main(
            [
                "run",
                "--set",
                "train.epochs=0",
                "--output-dir",
                str(tmp_path),
                "--name",
                "x",
                "--debug",
            ]
        )


def test_unknown_model_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", "--model", "resnet9000", "--output-dir", str(tmp_path), "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "resnet20" in err and "Traceback" not in err


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert "nope.pt" in err and len(err.strip().splitlines()) == 1


def test_resume_of_a_finished_run(finished_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _summary(finished_run)
    checkpoints = {p: (finished_run / p / "checkpoint.pt").read_bytes() for p in PHASES}
    for name in ("report.md", "curves.png", "summary.json"):
        (finished_run / name).unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished phase was trained again")

    monkeypatch.setattr(engine, "lr_factor", no_training)
    monkeypatch.setattr(engine, "save_checkpoint", no_training)
    assert main(_run_args(finished_run.parent, "--resume")) == 0

    assert (finished_run / "report.md").is_file() and (finished_run / "curves.png").is_file()
    after = _summary(finished_run)
    for phase in PHASES:
        assert after["models"][phase]["test"]["top1"] == before["models"][phase]["test"]["top1"], phase
        assert (finished_run / phase / "checkpoint.pt").read_bytes() == checkpoints[phase]
        rows = (finished_run / phase / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 4


def test_resume_of_a_finished_run_with_other_distillation_settings_is_refused(
    finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """The study's distilled student was trained with kd at T 4, alpha 0.5: a resume with
    other settings would retrain nothing and report the new ones; it is refused instead."""
    files = ("summary.json", "config.yaml", "report.md", "run.json")
    before = {name: (finished_run / name).read_bytes() for name in files}
    capsys.readouterr()
    code = main(_run_args(finished_run.parent, "--resume", "-T", "8", "--alpha", "0.1", "--method", "dkd"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"cannot resume {finished_run}: distill.methods changed from {{kd: {{" in err
    assert "distill.alpha changed from 0.5 to 0.1" in err and "another --name" in err
    assert {name: (finished_run / name).read_bytes() for name in files} == before


def test_module_entry_point_lists_models(kdistill_cache: Path) -> None:
    env = {**os.environ, "KDISTILL_CACHE": str(kdistill_cache)}
    out = subprocess.run(
        [sys.executable, "-m", "kdistill", "models"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    names = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    assert {"resnet20", "seed_teacher", "seed_student"} <= names


def test_methods_command(capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert any(line.split()[:1] == ["kd"] for line in out.splitlines()), out
    assert "temperature" in out


def test_a_teacher_trained_on_the_validation_images_is_flagged(
    finished_run: Path, capsys: pytest.CaptureFixture
) -> None:
    from kdistill.data.dataset import load_dataset
    from kdistill.runs import build_teacher, teacher_saw_validation

    path = finished_run / "teacher" / "checkpoint.pt"
    state = load_checkpoint(path)
    assert state["data"]["val_split"] is None  # the run held out nothing
    held_out = load_dataset("cifar10-mini", val_size=200, seed=3)
    cfg = load_config("quickstart", [f"teacher.checkpoint={path}"])
    capsys.readouterr()
    build_teacher(cfg, 10, engine.select_device("cpu"), held_out)
    out = "".join(capsys.readouterr())
    assert f"warning: teacher checkpoint {path} held out no validation images" in out
    assert "200 validation images (seed 3)" in out

    # the same split, another data set, or no validation split: nothing to flag
    same = {**state, "data": {**state["data"], "val_split": {"size": 200, "seed": 3}}}
    assert not teacher_saw_validation(same, held_out)
    assert teacher_saw_validation({**state, "data": {**state["data"], "val_split": {"size": 200, "seed": 4}}}, held_out)
    assert not teacher_saw_validation({**state, "data": {**state["data"], "checksum": "other"}}, held_out)
    build_teacher(cfg, 10, engine.select_device("cpu"), load_dataset("cifar10-mini"))
    assert "warning" not in "".join(capsys.readouterr())


@pytest.mark.slow
def test_seeds_give_one_report_with_an_interval_and_resume_finishes_a_missing_seed(tmp_path: Path) -> None:
    argv = ["run", "--seeds", "0", "1", "2", "--share-teacher", "--epochs", "1", "--output-dir", str(tmp_path)]
    argv += ["--device", "cpu", "--set", "deploy.onnx=false"]
    assert main(argv) == 0
    root = tmp_path / "quickstart-seeds"
    over = json.loads((root / "summary.json").read_text())["statistics"]
    assert over["gain"]["n"] == 3 and over["gain"]["low"] <= over["gain"]["mean"] <= over["gain"]["high"]
    assert [r["seed"] for r in over["runs"]] == [0, 1, 2]
    assert "Over these runs the distillation gain is" in (root / "report.md").read_text()
    for seed in (0, 1, 2):  # each seed is a normal run
        assert (root / f"seed{seed}" / "report.md").exists() and (root / f"seed{seed}" / "run.json").exists()
    assert _summary(root / "seed1")["models"]["teacher"].get("from_checkpoint")  # the shared teacher
    kept = (root / "seed0" / "summary.json").stat().st_mtime_ns
    shutil.rmtree(root / "seed2")
    assert main([*argv, "--resume"]) == 0
    assert (root / "seed2" / "summary.json").exists() and (root / "seed0" / "summary.json").stat().st_mtime_ns == kept
    assert (
        main(["run", "--seeds", "0", "--output-dir", str(tmp_path), "--device", "cpu"]) == 2
    )  # one seed is no interval
