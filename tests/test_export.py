"""Deployment export: ONNX round trip, verification, int8 quantization, TorchScript, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from kdistill.checkpoint import save_checkpoint
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data.dataset import ImageDataset
from kdistill.data.loader import Normalize
from kdistill.errors import ExportError
from kdistill.export import (
    check_faithful,
    compare_logits,
    deploy,
    export_onnx,
    onnx_session,
    preprocessing,
    read_onnx_metadata,
    read_torchscript,
    run_session,
    run_torch,
)
from kdistill.models import create_model
from kdistill.study import deploy_student

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_onnx_round_trip_small_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("seed_student", num_classes=3)
    meta = {"kdistill": "1", "preprocessing": preprocessing(MEAN, STD, 32, ["a", "b", "c"])}
    path = export_onnx(model, (3, 32, 32), tmp_path / "m.onnx", meta)
    assert read_onnx_metadata(path)["preprocessing"]["mean"] == MEAN
    assert read_onnx_metadata(path)["preprocessing"]["classes"] == ["a", "b", "c"]
    session = onnx_session(path)
    normalize = Normalize(MEAN, STD, torch.device("cpu"), False)
    for n in (1, 7, 300):  # dynamic batch size
        images = _images(n, seed=n)
        exported = run_session(session, images, normalize, batch_size=128)
        with torch.no_grad():
            reference = model.eval()(normalize(images))
        assert exported.shape == (n, 3)
        assert (exported - reference).abs().max().item() <= 1e-4
        assert torch.equal(exported.argmax(1), reference.argmax(1))
    assert model.stage1[0].weight.device.type == "cpu"  # the caller's model is untouched


def test_verification_tolerances() -> None:
    reference = torch.randn(2000, 10)
    check_faithful(compare_logits(reference + 5e-5, reference), "ok")
    with pytest.raises(ExportError, match=r"max \|logit difference\| 2.00e-04 \(allowed 0.0001\)"):
        check_faithful(compare_logits(reference + 2e-4, reference), "too far")
    flipped = reference.clone()
    flipped[:3] = -flipped[:3]  # 3 of 2000 top-1 classes change: 99.85% < 99.9%
    with pytest.raises(ExportError, match=r"identical top-1 on 99.85% \(required 99.9%\)"):
        check_faithful(compare_logits(flipped, reference), "flipped")


def test_deploy_exports_verifies_and_quantizes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("seed_student", num_classes=3)
    test_images, test_labels = _images(200, 1), torch.arange(200) % 3
    result = deploy(
        model,
        tmp_path / "model.onnx",
        test_images=test_images,
        test_labels=test_labels,
        train_images=_images(300, 2),
        mean=MEAN,
        std=STD,
        classes=None,
        quantization="static",
        calibration_count=64,
    )
    onnx, int8 = result["onnx"], result["int8"]
    assert onnx["max_abs_diff"] <= 1e-4 and onnx["top1_agreement"] >= 99.9 and onnx["num_images"] == 200
    assert onnx["top1"] == pytest.approx(result["pytorch_top1"])
    assert int8["mode"] == "static" and int8["calibration_images"] == 64
    assert (tmp_path / "model.int8.onnx").is_file()
    assert int8["disk_bytes"] < 0.4 * onnx["disk_bytes"]  # int8 weights: about a quarter of float32
    for e in (onnx, int8):
        assert (
            e["latency_b1"]["median_ms"] > 0
            and e["throughput_b256"]["images_per_second"] > 0
            and e["latency_b1"]["repeats"] >= 5
        )
    # the int8 model is an approximation of the same model, not a different one
    normalize = Normalize(MEAN, STD, torch.device("cpu"), False)
    q = run_session(onnx_session(tmp_path / "model.int8.onnx"), test_images, normalize)
    assert compare_logits(q, run_torch(model, test_images, normalize))["top1_agreement"] > 80


@pytest.fixture
def checkpoint(tmp_path: Path, mini: ImageDataset) -> Path:
    """A checkpoint as kdistill writes one (an untrained seed_student on cifar10-mini)."""
    torch.manual_seed(0)
    model = create_model("seed_student", num_classes=10)
    mean, std = mini.mean_std()
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(
        {
            "model_spec": {"name": "seed_student", "kwargs": {"num_classes": 10}},
            "model": model.state_dict(),
            "data": {"dataset": "cifar10-mini", "classes": mini.classes, "mean": mean, "std": std, "image_size": 32},
        },
        path,
    )
    return path


@pytest.mark.slow
def test_export_command_onnx_with_int8(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(checkpoint), "--format", "onnx", "--quantize", "dynamic", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_images"] == 1000 and result["dataset"] == "cifar10-mini"
    assert result["onnx"]["path"] == str(checkpoint.with_name("model.onnx"))
    assert result["onnx"]["max_abs_diff"] <= 1e-4 and result["onnx"]["top1_agreement"] >= 99.9
    assert result["int8"]["mode"] == "dynamic" and checkpoint.with_name("model.int8.onnx").is_file()
    meta = read_onnx_metadata(checkpoint.with_name("model.onnx"))["preprocessing"]
    assert meta["classes"][0] == "airplane" and meta["image_size"] == 32 and len(meta["std"]) == 3

    # the human-readable form
    assert main(["export", str(checkpoint), "-o", str(checkpoint.parent / "s.onnx")]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith(f"onnx: {checkpoint.parent / 's.onnx'}")
        and "top-1 identical on 100.00% of 1000 test images" in out
    )


@pytest.mark.slow
def test_export_command_torchscript(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(checkpoint), "--format", "torchscript", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    path = checkpoint.with_name("model.torchscript.pt")
    assert result["torchscript"]["path"] == str(path) and result["torchscript"]["max_abs_diff"] <= 1e-4
    module, meta = read_torchscript(path)
    assert meta["preprocessing"]["classes"][1] == "automobile"
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_export_command_errors(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def error(*args: str) -> str:
        assert main(["export", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()  # progress lines (decoding) may come first
        assert lines[-1].startswith("kdistill: error:") and "Traceback" not in "".join(lines), lines
        return lines[-1]

    assert "use --format onnx" in error(str(checkpoint), "--format", "torchscript", "--quantize", "static")
    assert "does not exist" in error(str(tmp_path / "missing.pt"))
    assert "--calibration-images 0" in error(str(checkpoint), "--calibration-images", "0")
    assert "predicts 10 classes" in error(
        str(checkpoint), "--format", "torchscript", "--data", str(_three_class_folder(tmp_path))
    )
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra were not installed
    assert "pip install 'kdistill[export]'" in error(str(checkpoint))


def _three_class_folder(tmp_path: Path) -> Path:
    from PIL import Image

    root = tmp_path / "three"
    for split in ("train", "test"):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(root / split / cls / "0.png")
    return root


def test_study_deploy_setting(tmp_path: Path, mini: ImageDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    student = create_model("seed_student", num_classes=10)
    assert deploy_student(load_config(None, ["deploy.onnx=false"]), student, mini, tmp_path) is None
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert (
        deploy_student(load_config(None, []), student, mini, tmp_path) is None
    )  # automatic: skipped without the extra
    with pytest.raises(ExportError, match=r"pip install 'kdistill\[export\]'"):
        deploy_student(load_config(None, ["deploy.onnx=true"]), student, mini, tmp_path)
