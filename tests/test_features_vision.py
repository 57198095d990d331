"""Feature methods and per-model inputs with torchvision and timm models (run where both
are installed: the vision environment). No test reaches the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import dataclasses
import math

import pytest
import torch

import kdistill
from kdistill.api import make_train_config, prepare_data
from kdistill.config import DataConfig, load_config
from kdistill.data.dataset import ImageDataset
from kdistill.errors import ConfigError
from kdistill.models import create_model, forward_all
from kdistill.models.base import feature_shapes
from kdistill.models.features import ensure_features
from kdistill.runs import new_model, spec_for
from kdistill.teacher_cache import build_teacher_cache

pytestmark = pytest.mark.vision

FEATURE_METHODS = ["fitnets", "at", "sp", "rkd", "pkt", "crd"]


def tiny_data(n: int = 16, size: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_default_stages_of_torchvision_and_timm_models() -> None:
    x = (3, 32, 32)
    resnet = create_model("torchvision:resnet18", num_classes=4).eval()
    ensure_features(resnet, x, "teacher")
    assert resnet.kdistill_features.stages == ["relu", "layer1", "layer2", "layer3", "layer4"]
    out = forward_all(resnet, torch.randn(2, *x))
    assert [f.shape[1] for f in out.features] == [64, 64, 128, 256, 512] and out.pre_logits.shape == (2, 512)
    torch.testing.assert_close(resnet.fc(out.pre_logits), out.logits)
    mobilenet = create_model("torchvision:mobilenet_v3_small", num_classes=4).eval()
    ensure_features(mobilenet, x, "teacher")
    assert all(s.startswith("features.") for s in mobilenet.kdistill_features.stages)
    timm_resnet = create_model("timm:test_resnet", num_classes=4).eval()
    ensure_features(timm_resnet, x, "student")  # timm's feature_info
    assert timm_resnet.kdistill_features.stages == [f["module"] for f in timm_resnet.feature_info]
    vit = create_model("timm:test_vit", num_classes=4, img_size=32).eval()
    ensure_features(vit, x, "student")
    shapes = feature_shapes(vit, x)
    assert all(f.dim() == 4 for f in shapes.features) and shapes.pre_logits.dim() == 2


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_methods_run_on_a_torchvision_teacher_and_a_timm_student(method: str) -> None:
    teacher = create_model("torchvision:resnet18", num_classes=4)
    student = create_model("timm:test_resnet", num_classes=4)
    result = kdistill.distill(teacher, student, tiny_data(), methods=method, epochs=1, batch_size=8, device="cpu")
    assert all(math.isfinite(v) for k, v in result.history[-1].items() if k.startswith("train_"))


def test_named_modules_of_a_torchvision_model_from_the_config() -> None:
    cfg = load_config(overrides=["teacher.name=torchvision:resnet18", "teacher.features=[layer2, layer3, layer4]"])
    teacher = new_model(spec_for(cfg.teacher, 4), 0)
    result = kdistill.distill(teacher, kdistill.create_model("seed_student", num_classes=4), tiny_data(),
                              methods="at", epochs=1, batch_size=8, device="cpu")  # fmt: skip
    assert math.isfinite(result.history[-1]["train_loss"])
    assert [f.shape[1] for f in feature_shapes(teacher, (3, 32, 32)).features] == [128, 256, 512]
    bad = load_config(overrides=["teacher.name=torchvision:resnet18", "teacher.features=[layer5]"])
    with pytest.raises(
        ConfigError, match=r"no module named 'layer5' \(did you mean layer4.*its modules are conv1, bn1"
    ):
        new_model(spec_for(bad.teacher, 4), 0)


@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> ImageDataset:
    keep = torch.arange(0, len(mini.train_labels), 40)[:120]
    return dataclasses.replace(mini, train_images=mini.train_images[keep], train_labels=mini.train_labels[keep])


def test_pretrained_torchvision_teacher_takes_its_weights_input(
    small: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageNet weights (made here, in torch hub's cache): the teacher takes what its weights
    expect (224 px, ImageNet mean/std) unless the config says otherwise (64 px)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    cfg = load_config(overrides=["teacher.name=torchvision:resnet18", "teacher.pretrained=true"])
    spec = spec_for(cfg.teacher, small.num_classes, small, cfg.data)
    new_model(spec, 0)
    assert spec["input"]["size"] == 224 and spec["input"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    cfg = load_config(
        overrides=["teacher.name=torchvision:resnet18", "teacher.pretrained=true", "teacher.input_size=64"]
    )
    spec = spec_for(cfg.teacher, small.num_classes, small, cfg.data)
    teacher = new_model(spec, 0).eval()
    assert spec["input"]["size"] == 64 and spec["input"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    seen = []
    teacher.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    loader = prepare_data(
        small, cfg=make_train_config(batch_size=40), device=torch.device("cpu"), data=DataConfig()
    ).loader
    cache = build_teacher_cache(teacher, loader, 1, batch_size=40, dtype="float32")
    assert seen and all(s[-2:] == (64, 64) for s in seen)
    batch = next(iter(loader.epoch(0)))
    assert batch.images.shape[-1] == 32
    with torch.no_grad():
        torch.testing.assert_close(cache.lookup(0, batch.indices), teacher(batch.images), rtol=1e-4, atol=1e-4)
