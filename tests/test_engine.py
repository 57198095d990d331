"""The training engine: learning-rate schedules, exact resume, divergence detection,
checkpoint safety, and what the optimizer trains."""

from __future__ import annotations

import json
import os
import pickle
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdistill
import kdistill.engine as engine
from kdistill.api import make_train_config
from kdistill.checkpoint import FORMAT, load_checkpoint, load_model, save_checkpoint
from kdistill.config import ScheduleConfig
from kdistill.data.dataset import ImageDataset
from kdistill.data.loader import Batch, Normalize, TrainLoader
from kdistill.errors import CheckpointError, TrainingError
from kdistill.methods import Method, MethodOptions
from kdistill.methods.kd import kd_loss
from kdistill.models import create_model
from kdistill.tasks import Distillation

TIMING = {"train_seconds", "images_per_second"}

# ------------------------------------------------------------------ learning-rate schedules


def _curve(s: ScheduleConfig, total: int, per_epoch: int) -> list[float]:
    return [engine.lr_factor(step, total, per_epoch, s) for step in range(total)]


def test_onecycle_shape() -> None:
    s = ScheduleConfig(name="onecycle", pct_start=0.25, warmup_start=0.1, final_lr_fraction=0.0)
    total, per_epoch = 1000, 100
    lr = _curve(s, total, per_epoch)
    assert lr[0] == pytest.approx(0.1)
    assert lr[250] == pytest.approx(1.0)
    assert max(lr) == pytest.approx(1.0) and lr.index(max(lr)) == 250
    assert all(a < b for a, b in zip(lr[:250], lr[1:251]))  # rises linearly to the peak
    assert all(a > b for a, b in zip(lr[250:], lr[251:]))  # then falls
    assert lr[125] == pytest.approx(0.1 + 0.9 * 0.5)  # linear rise
    assert lr[-1] == pytest.approx(0.0, abs=2 / 750)  # ends near the final fraction
    assert min(lr) >= 0


def test_onecycle_final_fraction() -> None:
    s = ScheduleConfig(name="onecycle", pct_start=0.3, warmup_start=0.04, final_lr_fraction=0.05)
    lr = _curve(s, 500, 50)
    assert lr[0] == pytest.approx(0.04)
    assert lr[150] == pytest.approx(1.0)
    assert lr[-1] == pytest.approx(0.05, abs=2 / 350)
    assert min(lr[150:]) >= 0.05  # the decay never goes below the final fraction


def test_cosine_with_warmup() -> None:
    s = ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start=0.1, final_lr_fraction=0.0)
    per_epoch, epochs = 10, 10
    lr = _curve(s, per_epoch * epochs, per_epoch)
    assert lr[0] == pytest.approx(0.1)
    assert lr[10] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the warm-up
    assert lr[20] == pytest.approx(1.0)  # warm-up done: the peak
    assert max(lr) == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lr[:20], lr[1:21]))
    assert all(a >= b for a, b in zip(lr[20:], lr[21:]))
    assert lr[60] == pytest.approx(0.5)  # (60-20)/(100-20) = half of the cosine
    assert lr[40] == pytest.approx(0.5 * (1 + 2**-0.5))  # a quarter: cos(pi/4)
    assert lr[-1] == pytest.approx(0.0, abs=1e-3)


def test_cosine_without_warmup_final_fraction() -> None:
    s = ScheduleConfig(name="cosine", final_lr_fraction=0.1)
    lr = _curve(s, 100, 10)
    assert lr[0] == pytest.approx(1.0)
    assert lr[50] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr[-1] == pytest.approx(0.1, abs=1e-3)
    assert min(lr) >= 0.1 - 1e-12


def test_step_milestones() -> None:
    s = ScheduleConfig(name="step", milestones=[3, 6], gamma=0.1)
    per_epoch = 10
    lr = _curve(s, 9 * per_epoch, per_epoch)
    assert all(v == pytest.approx(1.0) for v in lr[:30])
    assert all(v == pytest.approx(0.1) for v in lr[30:60])
    assert all(v == pytest.approx(0.01) for v in lr[60:])


def test_step_with_warmup_and_constant() -> None:
    s = ScheduleConfig(name="step", milestones=[5], gamma=0.5, warmup_epochs=1, warmup_start=0.2)
    lr = _curve(s, 80, 10)
    assert lr[0] == pytest.approx(0.2) and lr[5] == pytest.approx(0.6)
    assert lr[10] == pytest.approx(1.0) and lr[49] == pytest.approx(1.0) and lr[50] == pytest.approx(0.5)
    assert _curve(ScheduleConfig(name="constant"), 30, 10) == [1.0] * 30


# ------------------------------------------------------------------ exact resume


def _subset(mini: ImageDataset) -> dict:
    """256 training and 100 test images of every class (the sample is sorted by class)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randperm(len(mini.train_labels), generator=g)[:256]
    test = torch.randperm(len(mini.test_labels), generator=g)[:100]
    return {
        "train_data": (mini.train_images[train], mini.train_labels[train]),
        "test_data": (mini.test_images[test], mini.test_labels[test]),
    }


SETTINGS = {"epochs": 4, "batch_size": 64, "device": "cpu", "seed": 0, "grad_clip": 5.0}
SPEC = {"name": "seed_student", "kwargs": {"num_classes": 10}}


def _student() -> nn.Module:
    torch.manual_seed(0)
    return create_model("seed_student", num_classes=10)


def _teacher() -> nn.Module:
    """An untrained teacher is enough to test the engine; the student's architecture keeps
    it cheap."""
    torch.manual_seed(1)
    return create_model("seed_student", num_classes=10)


class Interrupted(Exception):
    pass


def _interrupt_after_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> list[int]:
    """Make the engine stop right after writing the checkpoint of ``epoch``."""
    original = engine.save_checkpoint
    saved: list[int] = []

    def save_then_stop(state, path):
        original(state, path)
        saved.append(state["epoch"])
        if state["epoch"] == epoch:
            raise Interrupted

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    return saved


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# trains 4 epochs: the tests that use it are marked slow
@pytest.fixture(scope="module")
def uninterrupted(mini: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, kdistill.Result]:
    run_dir = tmp_path_factory.mktemp("run_a")
    result = kdistill.train(_student(), **_subset(mini), run_dir=run_dir, model_spec=SPEC, **SETTINGS)
    return run_dir, result


@pytest.mark.slow
def test_train_writes_run_dir(uninterrupted) -> None:
    run_dir, result = uninterrupted
    rows = _metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert len(result.history) == 4
    for row in rows:
        assert {
            "lr",
            "train_loss",
            "train_ce",
            "train_top1",
            "test_top1",
            "test_loss",
            "train_images",
        } <= set(row)
        assert row["train_images"] == 256
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["format"] == FORMAT and state["epoch"] == 4 and state["epochs"] == 4
    assert state["model_spec"] == SPEC
    assert state["kind"] == "train"
    _assert_same_weights(result.model, _load_weights(state))
    assert result.metrics["num_samples"] == 100
    assert result.test_logits.shape == (100, 10)


def _load_weights(state: dict) -> nn.Module:
    model = create_model("seed_student", num_classes=10)
    model.load_state_dict(state["model"])
    return model


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(
    uninterrupted, mini: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_a, result_a = uninterrupted
    run_b = tmp_path / "run_b"
    with monkeypatch.context() as m:
        saved = _interrupt_after_epoch(m, 2)
        with pytest.raises(Interrupted):
            kdistill.train(_student(), **_subset(mini), run_dir=run_b, model_spec=SPEC, **SETTINGS)
    assert saved == [1, 2]
    assert load_checkpoint(run_b / "checkpoint.pt")["epoch"] == 2
    assert len(_metrics(run_b)) == 2

    torch.manual_seed(12345)  # a different global RNG state: resume must restore its own
    result_b = kdistill.train(_student(), **_subset(mini), run_dir=run_b, resume=True, model_spec=SPEC, **SETTINGS)

    _assert_same_weights(result_b.model, result_a.model)
    state_a, state_b = (
        load_checkpoint(run_a / "checkpoint.pt"),
        load_checkpoint(run_b / "checkpoint.pt"),
    )
    for k in state_a["model"]:
        assert torch.equal(state_a["model"][k], state_b["model"][k]), k
    assert _metrics(run_b) == _metrics(run_a)
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in result_b.history] == _metrics(run_a)
    assert result_b.metrics["top1"] == result_a.metrics["top1"]
    assert torch.equal(result_b.test_logits, result_a.test_logits)


@pytest.mark.slow
def test_resume_of_a_finished_run_trains_nothing(
    uninterrupted, mini: ImageDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_a, result_a = uninterrupted
    before = (run_a / "checkpoint.pt").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engine, "lr_factor", no_training)
    monkeypatch.setattr(engine, "save_checkpoint", no_training)
    result = kdistill.train(_student(), **_subset(mini), run_dir=run_a, resume=True, model_spec=SPEC, **SETTINGS)
    _assert_same_weights(result.model, result_a.model)
    assert (run_a / "checkpoint.pt").read_bytes() == before
    assert len(_metrics(run_a)) == 4


@pytest.mark.slow
def test_resume_into_another_model_is_refused(uninterrupted, mini: ImageDataset) -> None:
    run_a, _ = uninterrupted
    torch.manual_seed(0)
    other = create_model("seed_teacher", num_classes=10)
    with pytest.raises(CheckpointError, match="does not match"):
        kdistill.train(other, **_subset(mini), run_dir=run_a, resume=True, **SETTINGS)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [({"epochs": 6}, r"train.epochs=4 \(this run: 6\)"), ({"lr": 0.2}, r"train.optimizer.lr=0.05 \(this run: 0.2\)")],
)
def test_resume_with_other_settings_is_refused(uninterrupted, mini: ImageDataset, change: dict, named: str) -> None:
    """Resuming continues the same run: a changed schedule would silently make another one."""
    run_a, _ = uninterrupted
    before = (run_a / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=named):
        kdistill.train(
            _student(), **_subset(mini), run_dir=run_a, resume=True, model_spec=SPEC, **{**SETTINGS, **change}
        )
    assert (run_a / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow
def test_distill_resume_equals_uninterrupted_run(
    mini: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = {**_subset(mini), **SETTINGS, "alpha": 0.9, "temperature": 4.0, "model_spec": SPEC}
    result_a = kdistill.distill(_teacher(), _student(), run_dir=tmp_path / "a", **kwargs)

    with monkeypatch.context() as m:
        _interrupt_after_epoch(m, 2)
        with pytest.raises(Interrupted):
            kdistill.distill(_teacher(), _student(), run_dir=tmp_path / "b", **kwargs)
    result_b = kdistill.distill(_teacher(), _student(), run_dir=tmp_path / "b", resume=True, **kwargs)

    _assert_same_weights(result_b.model, result_a.model)
    assert _metrics(tmp_path / "b") == _metrics(tmp_path / "a")
    rows = _metrics(tmp_path / "a")
    assert {"train_ce", "train_kd"} <= set(rows[0])
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["kind"] == "distill" and state["epoch"] == 4
    assert not any(k.startswith("teacher") for k in state["model"])


# ------------------------------------------------------------------ divergence


class _ToyTask(nn.Module):
    """A linear classifier whose loss gains a NaN term from epoch ``bad_from`` on."""

    def __init__(self, bad_from: int):
        super().__init__()
        self.model = nn.Linear(12, 3)
        self.bad_from = bad_from

    def forward(self, batch: Batch, epoch: float):
        logits = self.model(batch.images)
        losses = {"ce": F.cross_entropy(logits, batch.labels)}
        if epoch >= self.bad_from:
            losses["boom"] = logits.sum() * float("nan")
        return logits, losses


def _toy_loader() -> TrainLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    return TrainLoader(x, y, 8, torch.device("cpu"), None, seed=0)


def test_non_finite_loss_is_reported_with_its_term(tmp_path: Path) -> None:
    task = _ToyTask(bad_from=1)
    cfg = make_train_config(epochs=3, batch_size=8, channels_last=False)
    with pytest.raises(TrainingError, match="non-finite") as info:
        engine.fit(task, _toy_loader(), cfg, device=torch.device("cpu"), run_dir=tmp_path)
    message = str(info.value)
    assert "boom" in message
    assert "step 5" in message and "epoch 2" in message  # 5 steps per epoch: first of epoch 2
    assert str(tmp_path / "checkpoint.pt") in message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # the last good one is kept
    assert len(_metrics(tmp_path)) == 1


def test_the_bar_ends_an_epoch_showing_the_epochs_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    # on a terminal the bar's loss and accuracy are refreshed by time and at the epoch's last
    # step: a 5-step epoch must not end showing its first step's numbers
    shown: list[dict] = []

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, refresh: bool = False, **values) -> None:
            shown.append(values)

    monkeypatch.setattr(engine, "interactive", lambda: True)
    monkeypatch.setattr(engine, "progress", Bar)
    torch.manual_seed(0)
    result = engine.fit(
        _ToyTask(bad_from=99),
        _toy_loader(),
        make_train_config(epochs=1, batch_size=8, channels_last=False),
        device=torch.device("cpu"),
    )
    record = result.history[-1]
    assert shown[-1]["loss"] == f"{record['train_loss']:.3f}" and shown[-1]["acc"] == f"{record['train_top1']:.1f}"


def test_bar_refresh_is_rationed_by_time() -> None:
    from kdistill.progress import Refresh

    now = [0.0]
    refresh = Refresh(0.5, clock=lambda: now[0])
    due = []
    for step in range(10):  # 0.2 s per step, 10 steps
        due.append(refresh.due(last=step == 9))
        now[0] += 0.2
    assert [i for i, d in enumerate(due) if d] == [0, 3, 6, 9]  # the first, every >= 0.5 s, the last


def test_nan_inputs_raise_training_error() -> None:
    x = torch.randn(32, 3, 32, 32)
    x[3, 0, 0, 0] = float("nan")
    y = torch.randint(0, 10, (32,))
    with pytest.raises(TrainingError, match="non-finite"):
        kdistill.train(_student(), (x, y), epochs=1, batch_size=32, device="cpu")


# ------------------------------------------------------------------ checkpoints


def _valid_checkpoint(path: Path) -> Path:
    save_checkpoint({"model": {"w": torch.arange(1000.0)}, "epoch": 1}, path)
    return path


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    path = _valid_checkpoint(tmp_path / "c.pt")
    state = load_checkpoint(path)
    assert state["format"] == FORMAT and state["epoch"] == 1
    assert torch.equal(state["model"]["w"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, plain)
    with pytest.raises(CheckpointError, match="not a kdistill checkpoint"):
        load_checkpoint(plain)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not a kdistill checkpoint"):
        load_checkpoint(tensor)


def test_text_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "text.pt"
    text.write_text("hello, I am not a checkpoint\n")
    with pytest.raises(CheckpointError, match="text.pt"):
        load_checkpoint(text)


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    """Whatever the garbage, the user gets a CheckpointError, never a raw KeyError/IndexError
    from inside the unpickler (which the CLI would show as a traceback)."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "garbage.pt"
    for i in range(20):
        path.write_bytes(bytes(torch.randint(0, 256, (200 + 37 * i,), generator=g, dtype=torch.uint8).tolist()))
        with pytest.raises(CheckpointError, match="garbage.pt"):
            load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_truncated_checkpoint(tmp_path: Path, keep: float) -> None:
    data = _valid_checkpoint(tmp_path / "full.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_checkpoint(cut)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("container", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path: Path, container: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"format": FORMAT, "model": {}, "x": _Evil(marker)}
    if container == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(CheckpointError, match="refused|unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists(), "loading the checkpoint ran code"

    # control: the payload is real, an unsafe load does run it
    if container == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.slow
def test_load_model_rebuilds_the_model(uninterrupted) -> None:
    run_dir, result = uninterrupted
    model, state = load_model(run_dir / "checkpoint.pt")
    assert type(model) is type(result.model)
    _assert_same_weights(model, result.model)
    assert state["data"]["dataset"] == "tensors"
    model.eval()
    result.model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model.cpu()(x))


@pytest.mark.slow
def test_load_model_without_spec(mini: ImageDataset, tmp_path: Path) -> None:
    kdistill.train(_student(), **_subset(mini), run_dir=tmp_path, **{**SETTINGS, "epochs": 1})
    with pytest.raises(CheckpointError, match="names no model"):
        load_model(tmp_path / "checkpoint.pt")


def test_load_model_with_wrong_weights(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"model_spec": SPEC, "model": create_model("seed_teacher").state_dict()}, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(path)


# ------------------------------------------------------------------ what gets trained


class _Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.optimizers: list[torch.optim.Optimizer] = []
        original = engine.build_optimizer

        def build(params, cfg):
            opt = original(params, cfg)
            self.optimizers.append(opt)
            return opt

        monkeypatch.setattr(engine, "build_optimizer", build)

    def param_ids(self) -> set[int]:
        (opt,) = self.optimizers
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "a parameter is in two groups"
        return set(ids)


@pytest.mark.slow
def test_distill_optimizes_only_the_student(mini: ImageDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = _Recorder(monkeypatch)
    teacher, student = _teacher(), _student()
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    modes = []  # the teacher's mode at every training step
    forward = teacher.forward
    monkeypatch.setattr(teacher, "forward", lambda x: modes.append(teacher.training) or forward(x))
    kdistill.distill(teacher, student, **_subset(mini), **{**SETTINGS, "epochs": 1})
    assert recorder.param_ids() == {id(p) for p in student.parameters()}
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert modes and not any(modes)  # eval mode during the run...
    assert teacher.training  # ...and given back in the mode it came in
    assert all(p.grad is None for p in teacher.parameters())


class _LearnedScale(Method):
    """A toy method with a parameter of its own: KD on the student's logits times exp(a)."""

    name = "learned_scale"

    def __init__(self):
        super().__init__(MethodOptions(), None)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, student, teacher, labels, indices, epoch):
        return {"scaled_kd": kd_loss(student.logits * self.log_scale.exp(), teacher.logits, 4.0)}


def test_method_parameters_are_trained_with_the_student(
    mini: ImageDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = _Recorder(monkeypatch)
    teacher, student = _teacher(), _student()
    method = _LearnedScale()
    task = Distillation(student, teacher, {"learned_scale": method}, alpha=0.9, ce_weight=0.1)
    norm = Normalize(*mini.mean_std(), torch.device("cpu"), channels_last=False)
    loader = TrainLoader(mini.train_images[:128], mini.train_labels[:128], 64, torch.device("cpu"), norm, seed=0)
    cfg = make_train_config(epochs=1, batch_size=64)
    engine.fit(task, loader, cfg, device=torch.device("cpu"), run_dir=tmp_path)
    expected = {id(p) for p in student.parameters()} | {id(method.log_scale)}
    assert recorder.param_ids() == expected
    assert method.log_scale.item() != 0.0  # it was trained
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state["task_state"]) == {"methods.learned_scale.log_scale"}
    assert not any(k.startswith("teacher") for k in state["model"])


def test_teacher_is_given_back_as_it_came() -> None:
    """distill freezes its teacher for the run only: afterwards the same module trains."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    teacher, student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), nn.Linear(8, 3)
    teacher[0].requires_grad_(False)  # the user's own choice (a frozen first layer) is kept too
    teacher.train()
    kdistill.distill(teacher, student, (x, y), epochs=1, batch_size=32, device="cpu")
    assert teacher.training
    assert [p.requires_grad for p in teacher.parameters()] == [False, False, True, True]
    before = teacher[2].weight.detach().clone()
    kdistill.train(teacher, (x, y), epochs=1, batch_size=32, device="cpu")
    assert not torch.equal(before, teacher[2].weight)


def test_nothing_to_train_is_a_clear_error() -> None:
    model = nn.Linear(8, 3).requires_grad_(False)
    with pytest.raises(TrainingError, match="Linear has no trainable parameters"):
        kdistill.train(model, (torch.randn(64, 8), torch.randint(0, 3, (64,))), epochs=1, batch_size=32, device="cpu")


def test_gradient_norm_is_the_clipping_norm_and_changes_nothing() -> None:
    from kdistill.engine import gradient_norm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    model(torch.randn(8, 5)).sum().backward()
    params = list(model.parameters()) + [nn.Parameter(torch.ones(2))]  # one without a gradient
    before = [p.grad.clone() for p in params if p.grad is not None]
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None))
    assert torch.allclose(gradient_norm(params).double(), expected)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))
    params[0].grad[0, 0] = float("nan")
    assert not torch.isfinite(gradient_norm(params))
    assert gradient_norm([nn.Parameter(torch.ones(2))]) == 0
