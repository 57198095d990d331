"""Feature methods with models that are not kdistill's own: a user's module with its stage
modules named in the config (forward hooks), a Hugging Face model's hidden states, token
features reshaped onto their patch grid or pooled."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
from torch import nn

import kdistill
from kdistill.config import load_config
from kdistill.errors import ConfigError
from kdistill.models import create_model, forward_all
from kdistill.models.features import as_map, attach_features, default_stages
from kdistill.runs import new_model, spec_for

FEATURE_METHODS = ["fitnets", "at", "sp", "rkd", "pkt", "crd"]


class Net(nn.Module):
    """A user's classifier: three conv stages, pooled, a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer2(self.layer1(self.stem(x)))).flatten(1))


def make(num_classes: int = 10, width: int = 8) -> nn.Module:
    return Net(num_classes, width)


def tiny_data(n: int = 16, size: int = 32):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_named_modules_are_the_stages_and_the_head_input_the_pre_logits() -> None:
    model = make(4)
    attach_features(model, ["layer1", "layer2"], None, "student")
    x = torch.randn(2, 3, 32, 32)
    out = forward_all(model, x)
    assert [tuple(f.shape) for f in out.features] == [(2, 8, 16, 16), (2, 16, 8, 8)]
    assert out.pre_logits.shape == (2, 16)
    torch.testing.assert_close(out.logits, model(x))
    torch.testing.assert_close(model.fc(out.pre_logits), out.logits)
    # the default stages: the last block before each drop in resolution
    assert default_stages(make(4), x) == ["stem", "layer1", "layer2"]


def test_a_feature_name_that_does_not_exist_lists_the_modules() -> None:
    cfg = load_config(overrides=[f"student.name={__name__}:make", "student.features=[layer1, layer3]"])
    spec = spec_for(cfg.student, 4)
    with pytest.raises(ConfigError) as e:
        new_model(spec, 0)
    msg = str(e.value)
    assert "\n" not in msg and "no module named 'layer3'" in msg and "stem, layer1, layer2, pool, fc" in msg


def test_tokens_become_maps_on_their_grid_or_are_pooled() -> None:
    tokens = torch.randn(2, 1 + 16, 5)  # CLS + a 4x4 grid
    grid = as_map(tokens)
    assert grid.shape == (2, 5, 4, 4)
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 + 4 + 2])
    odd = torch.randn(2, 7, 5)  # no square: averaged over the tokens
    torch.testing.assert_close(as_map(odd), odd.mean(1)[:, :, None, None])


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_feature_methods_run_on_user_models_with_named_stages(method: str) -> None:
    cfg = load_config(overrides=[f"teacher.name={__name__}:make", "teacher.features=[layer1, layer2]"])
    teacher = new_model(spec_for(cfg.teacher, 4), 0)
    student = make(4, width=4)  # default stages, found by a probe
    result = kdistill.distill(teacher, student, tiny_data(), methods=method, epochs=1, batch_size=8, device="cpu")
    assert all(math.isfinite(v) for k, v in result.history[-1].items() if k.startswith("train_"))
    assert student.kdistill_features.stages == ["stem", "layer1", "layer2"]


def _hf_vit(tmp_path) -> str:
    import transformers

    config = transformers.ViTConfig(
        image_size=32, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=4,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    return f"hf:{tmp_path / 'vit'}"


def test_hugging_face_hidden_states_are_stages(tmp_path) -> None:
    model = create_model(_hf_vit(tmp_path), num_classes=4, pretrained=True)
    from kdistill.models.features import ensure_features

    ensure_features(model, (3, 32, 32), "teacher")
    out = forward_all(model.eval(), torch.randn(2, 3, 32, 32))
    # two layers' hidden states, CLS + 4x4 patches each, on their 4x4 grid; pre-logits: the classifier's input
    assert [tuple(f.shape) for f in out.features] == [(2, 16, 4, 4), (2, 16, 4, 4)]
    assert out.pre_logits.shape == (2, 16) and out.logits.shape == (2, 4)


@pytest.mark.parametrize("method", ["at", "rkd"])
def test_feature_methods_run_with_a_hugging_face_teacher(tmp_path, method: str) -> None:
    teacher = create_model(_hf_vit(tmp_path), num_classes=4, pretrained=True)
    result = kdistill.distill(teacher, make(4), tiny_data(), methods=method, epochs=1, batch_size=8, device="cpu")
    assert math.isfinite(result.history[-1]["train_loss"])


def test_hugging_face_processor_config_gives_the_input(tmp_path) -> None:
    """A pretrained Hugging Face model takes what its image processor config says."""
    import transformers

    name = _hf_vit(tmp_path)
    transformers.ViTImageProcessor(
        size={"height": 48, "width": 48}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(tmp_path / "vit")
    cfg = load_config(overrides=[f"teacher.name={name}", "teacher.pretrained=true"])
    small = _FakeData()
    spec = spec_for(cfg.teacher, 4, small, cfg.data)
    new_model(spec, 0)
    assert spec["input"] == {
        "size": 48, "mean": [0.5] * 3, "std": [0.5] * 3, "from_mean": [0.4] * 3, "from_std": [0.2] * 3,
    }  # fmt: skip


class _FakeData:
    """What spec_for reads of a data set: its image shape and statistics."""

    image_shape = (3, 32, 32)

    @staticmethod
    def mean_std():
        return [0.4] * 3, [0.2] * 3
