"""Each model at its own input (resolution, normalisation), adapted on the device; transfer
from weights for another label set (new head, frozen backbone, fine-tuning)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdistill
from kdistill.api import make_train_config, prepare_data
from kdistill.checkpoint import build_model
from kdistill.config import DataConfig, load_config
from kdistill.data.dataset import ImageDataset
from kdistill.errors import ConfigError
from kdistill.models import build
from kdistill.models.base import feature_shapes, forward_all
from kdistill.models.inputs import InputAdapter, adapter_from
from kdistill.models.transfer import freeze_backbone, head_path
from kdistill.runs import new_model, spec_for, teacher_to_train
from kdistill.teacher_cache import build_teacher_cache, fingerprint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> ImageDataset:
    keep = torch.arange(0, len(mini.train_labels), 20)[:250]
    return dataclasses.replace(mini, train_images=mini.train_images[keep], train_labels=mini.train_labels[keep])


class Shapes:
    """A forward pre-hook that records the shapes a model receives (registered after the
    input adapter: it sees what the model itself gets)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def __call__(self, module, args) -> None:
        self.seen.append(tuple(args[0].shape))


def test_adapter_renormalises_and_resizes_as_interpolate() -> None:
    pixels = torch.rand(3, 3, 32, 32)
    data_mean, data_std, mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    view = (pixels - torch.tensor(data_mean).view(1, 3, 1, 1)) / torch.tensor(data_std).view(1, 3, 1, 1)
    adapter = InputAdapter(64, tuple(mean), tuple(std), tuple(data_mean), tuple(data_std))
    expected = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = F.interpolate(expected, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter.adapt(view), expected, rtol=1e-5, atol=1e-5)
    # shrinking is antialiased; a record round-trips; token ids pass unchanged
    down = InputAdapter(16, None, None, tuple(data_mean), tuple(data_std))
    ref = F.interpolate(view, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(down.adapt(view), ref)
    assert adapter_from(adapter.record()) == adapter
    ids = torch.randint(0, 9, (2, 7))
    assert down.adapt(ids) is ids


def test_teacher_at_64_student_at_32_share_the_view_and_the_cache_replays(small: ImageDataset) -> None:
    cfg = load_config(overrides=["teacher.input_size=64"])
    tspec = spec_for(cfg.teacher, small.num_classes, small, cfg.data)
    teacher = new_model(tspec, 0)
    student = new_model(spec_for(cfg.student, small.num_classes, small, cfg.data), 1)
    # the seed teacher's linear layer is built for 64 px; the spec records the input for checkpoints
    assert tspec["kwargs"]["image_size"] == 64 and tspec["input"]["size"] == 64
    assert "image_size" not in spec_for(cfg.student, 10, small, cfg.data)["kwargs"]
    seen_t, seen_s = Shapes(), Shapes()
    teacher.register_forward_pre_hook(seen_t)
    student.register_forward_pre_hook(seen_s)
    loader = prepare_data(small, cfg=make_train_config(batch_size=50), device=CPU, data=DataConfig(), seed=0).loader
    batch = next(iter(loader.epoch(0)))
    assert tuple(batch.images.shape[-2:]) == (32, 32)
    logits = teacher(batch.images)
    student(batch.images)
    assert seen_t.seen == [(50, 3, 64, 64)] and seen_s.seen == [(50, 3, 32, 32)]
    # forward_all (feature methods) adapts too: stage features at the teacher's resolution
    out = forward_all(teacher, batch.images)
    assert out.features[0].shape[-1] == 32 and torch.allclose(out.logits, logits)
    # the cache stores the teacher's logits computed at 64 px, and says so in its fingerprint
    seen_t.seen.clear()
    cache = build_teacher_cache(teacher, loader, 1, batch_size=50, dtype="float32")
    assert seen_t.seen and all(s[-2:] == (64, 64) for s in seen_t.seen)
    torch.testing.assert_close(cache.lookup(0, batch.indices), logits.float(), rtol=1e-4, atol=1e-4)
    assert fingerprint(loader, teacher)["teacher_input"]["size"] == 64
    # a checkpoint's spec rebuilds the model at its own input
    rebuilt = build_model(tspec)
    assert rebuilt.kdistill_input == teacher.kdistill_input


def test_a_resolution_a_model_cannot_take_is_one_line(small: ImageDataset) -> None:
    cfg = load_config(overrides=["teacher.input_size=48", "teacher.kwargs={image_size: 32}"])
    teacher = new_model(spec_for(cfg.teacher, small.num_classes, small, cfg.data), 0)
    with pytest.raises(
        ConfigError,
        match=r"seed_teacher' cannot take the training inputs \(batch of shape \(3, 48, 48\), float32, at its input_size",
    ) as e:
        feature_shapes(teacher, (3, 32, 32))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("teacher.mean=[0.5, 0.5, 0.5]", "mean, std: give both"),
        ("teacher.input_size=0", "teacher.input_size"),
        ("teacher.finetune={epochs: 0}", "teacher.finetune.epochs"),
        ("teacher.finetune={lr_x: 1}", "teacher.finetune.lr_x"),
    ],
)
def test_bad_input_settings_are_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        load_config(overrides=[override])
    assert "\n" not in str(e.value)


def test_finetune_overrides_the_teacher_phase_only() -> None:
    cfg = load_config(overrides=["teacher.finetune={epochs: 3, lr: 0.01}", "teacher.train={epochs: 7}"])
    tcfg = cfg.train_for("teacher")
    assert tcfg.epochs == 3 and tcfg.optimizer.lr == 0.01
    assert cfg.train_for("student").optimizer.lr == cfg.train.optimizer.lr


class Imagenetish(torch.nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
        )
        self.fc = torch.nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def make(num_classes: int = 1000) -> torch.nn.Module:
    return Imagenetish(num_classes)


def test_weights_for_1000_classes_load_with_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = Imagenetish(1000)
    torch.save(big.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="fine-tune them with a new head"):  # not unless asked
        build(f"{__name__}:make", 10, {}, weights=tmp_path / "w.pt")
    model, record = build(f"{__name__}:make", 10, {}, weights=tmp_path / "w.pt", new_head=True)
    assert model.fc.out_features == 10 and head_path(model) == "fc"
    torch.testing.assert_close(model.body[0].weight, big.body[0].weight)
    assert record["weights_sha256"]
    # anything but the head's class count still does not fit
    torch.save({**big.state_dict(), "body.0.weight": torch.zeros(8, 3, 5, 5)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not fit the model"):
        build(f"{__name__}:make", 10, {}, weights=tmp_path / "bad.pt", new_head=True)


def test_freeze_backbone_trains_the_head_only() -> None:
    model = Imagenetish(10)
    assert freeze_backbone(model, "teacher") == 32 * 10 + 10
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


@pytest.mark.slow
def test_finetuning_a_1000_class_teacher_learns_the_run_classes(small: ImageDataset, tmp_path: Path) -> None:
    """The transfer path of a real run: 1000-class weights, a new 10-class head, the teacher
    phase fine-tunes it (frozen backbone: only the head moves) above chance."""
    torch.manual_seed(0)
    # "pretrained" 1000-class weights: the backbone learns features (here from these images)
    pretrained = Imagenetish(1000)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in small.mean_std())
    x = (small.train_images.float() / 255 - mean) / std
    x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True)
    optimizer = torch.optim.Adam(pretrained.parameters(), lr=0.01)
    for _ in range(100):
        i = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(pretrained(x[i]), small.train_labels[i])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save(pretrained.state_dict(), tmp_path / "w.pt")
    cfg = load_config(
        overrides=[
            f"teacher.name={__name__}:make",
            f"teacher.weights_file={tmp_path / 'w.pt'}",
            "teacher.finetune={epochs: 4, lr: 0.2, freeze_backbone: true}",
            "teacher.input_size=16",
        ]
    )
    spec = spec_for(cfg.teacher, small.num_classes, small, cfg.data)
    teacher = teacher_to_train(cfg, spec)
    before = teacher.body[0].weight.clone()
    result = kdistill.train(teacher, small, config=cfg.train_for("teacher"), device="cpu", model_spec=spec)
    assert result.metrics["top1"] > 18.0  # chance is 10%
    torch.testing.assert_close(teacher.body[0].weight, before)
