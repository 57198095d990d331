"""Bad numbers: a NaN/inf loss or gradient stops the run naming the step and the term and
keeps the last good checkpoint; nonsensical learning rates, temperatures and weights are
rejected before any work; a constant colour channel does not turn inputs into NaN.
(A NaN loss term at an epoch's first step: tests/test_engine.py::test_non_finite_loss_is_reported_with_its_term.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
import kdistill.engine as engine
from kdistill.api import make_train_config
from kdistill.checkpoint import load_checkpoint
from kdistill.data.loader import Batch, TrainLoader, epoch_views
from kdistill.errors import ConfigError, TrainingError

STEPS = 5  # steps per epoch: 40 samples, batch 8
# the sample whose batches get a bad term: in the third batch of epoch 1 (0-based)
CULPRIT = int(epoch_views(40, seed=0, epoch=1, padding=0, flip=False).order[2 * 8])


class _Toy(nn.Module):
    """A linear classifier with a cross-entropy term and a second term that goes bad, from
    epoch ``bad_from`` on, in the batch holding sample ``CULPRIT``: either its gradient
    (sqrt at 0: value 0, gradient NaN) or its value (inf)."""

    def __init__(self, bad: str, bad_from: int = 1):
        super().__init__()
        self.model = nn.Linear(12, 3)
        self.bad, self.bad_from = bad, bad_from

    def forward(self, batch: Batch, epoch: float):
        logits = self.model(batch.images)
        hit = epoch >= self.bad_from and bool((batch.indices == CULPRIT).any())
        deviation = ((logits - logits.detach()) ** 2).sum()  # always 0, gradient 0
        if self.bad == "gradient":
            extra = torch.sqrt(deviation) if hit else deviation  # sqrt'(0) = inf: NaN gradient
        else:
            extra = deviation + (float("inf") if hit else 0.0)
        return logits, {"ce": F.cross_entropy(logits, batch.labels), "spike": extra}


def _loader() -> TrainLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    return TrainLoader(x, y, 8, torch.device("cpu"), None, seed=0)


def _culprit_step(epoch: int) -> int:
    for i, batch in enumerate(_loader().epoch(epoch)):
        if (batch.indices == CULPRIT).any():
            return epoch * STEPS + i
    raise AssertionError


@pytest.mark.parametrize("bad", ["gradient", "value"])
def test_non_finite_term_names_step_and_term(bad: str, tmp_path: Path) -> None:
    cfg = make_train_config(epochs=4, batch_size=8, channels_last=False)
    with pytest.raises(TrainingError) as info:
        engine.fit(_Toy(bad), _loader(), cfg, device=torch.device("cpu"), run_dir=tmp_path)
    message = str(info.value)
    step = _culprit_step(1)
    assert step == STEPS + 2  # inside the epoch, not at its start
    if bad == "gradient":
        assert f"gradient became non-finite at step {step} (epoch 2; term(s): spike (gradient);" in message, message
        assert "loss terms were finite: ce=" in message and "ce (gradient)" not in message
    else:
        assert f"loss became non-finite at step {step} (epoch 2; term(s): spike)" in message, message
    assert f"the last good checkpoint is kept in {tmp_path / 'checkpoint.pt'}" in message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert len(message.splitlines()) == 1


def test_non_finite_gradient_without_a_run_dir() -> None:
    cfg = make_train_config(epochs=2, batch_size=8, channels_last=False, grad_clip=1.0)
    with pytest.raises(TrainingError, match=r"gradient became non-finite .* spike \(gradient\)") as info:
        engine.fit(_Toy("gradient"), _loader(), cfg, device=torch.device("cpu"))
    assert "kept in" not in str(info.value)


def test_gradient_check_does_not_change_training(tmp_path: Path) -> None:
    """Measuring the gradient norm (max_norm inf) scales by exactly 1: a healthy run is
    bit-identical to one that never measured it."""
    cfg = make_train_config(epochs=2, batch_size=8, channels_last=False)
    torch.manual_seed(0)
    task = _Toy("value", bad_from=99)
    engine.fit(task, _loader(), cfg, device=torch.device("cpu"))

    torch.manual_seed(0)
    plain = _Toy("value", bad_from=99)
    opt = engine.build_optimizer(plain.parameters(), cfg)
    base = [g["lr"] for g in opt.param_groups]
    loader = _loader()
    for epoch in range(2):
        for i, batch in enumerate(loader.epoch(epoch)):
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * engine.lr_factor(epoch * STEPS + i, 2 * STEPS, STEPS, cfg.schedule)
            _, losses = plain(batch, epoch + i / STEPS)
            opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            opt.step()
    for a, b in zip(task.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)


def test_constant_channel_trains(tmp_path: Path) -> None:
    """A colour channel that never varies has std 0; normalising by it gave NaN inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[:, 2] = 7  # the blue channel is constant
    y = torch.randint(0, 2, (64,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    result = kdistill.train(
        model, (x, y), (x, y), epochs=2, batch_size=16, device="cpu", channels_last=False, run_dir=tmp_path
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows)
    assert torch.isfinite(result.test_logits).all()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": float("nan")}, "optimizer.lr"),
        ({"lr": float("inf")}, "optimizer.lr"),
        ({"lr": 0.0}, "optimizer.lr"),
        ({"lr": 50.0}, "optimizer.lr"),
        ({"grad_clip": float("nan")}, "grad_clip"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_api_rejects_nonsense_training_numbers(kwargs: dict, key: str) -> None:
    model = nn.Linear(4, 2)
    with pytest.raises(ConfigError, match=key):
        kdistill.train(model, (torch.randn(8, 4), torch.randint(0, 2, (8,))), epochs=1, device="cpu", **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"temperature": float("inf")}, "finite"),
        ({"temperature": 0.0}, "greater than 0"),
        ({"temperature": 1e4}, "less than or equal to 100"),
        ({"alpha": 0.0, "ce_weight": 0.0}, "nothing would be learned"),
        ({"alpha": float("nan")}, "finite"),
    ],
)
def test_api_rejects_nonsense_distillation_numbers(kwargs: dict, fragment: str) -> None:
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(ConfigError, match=fragment):
        kdistill.distill(nn.Linear(4, 2), nn.Linear(4, 2), data, epochs=1, device="cpu", **kwargs)


def test_student_larger_than_teacher_is_allowed_but_warned(capsys: pytest.CaptureFixture) -> None:
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    small, large = nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
    result = kdistill.distill(small, large, data, epochs=1, batch_size=8, device="cpu", channels_last=False)
    assert len(result.history) == 1  # trained all the same
    err = capsys.readouterr().err
    assert "warning: the student (450 parameters) is larger than its teacher (10 parameters)" in err, err
    small, large = nn.Linear(4, 2), nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 2))
    kdistill.distill(large, small, data, epochs=1, batch_size=8, device="cpu", channels_last=False)
    assert "warning" not in capsys.readouterr().err
