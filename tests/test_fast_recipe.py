"""The fast recipe's building blocks: the moving average of the weights (train.ema), flip
test-time augmentation (train.eval_tta) and evaluation on a subset (train.eval_subset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import kdistill
import kdistill.engine as engine
from kdistill.api import _distill_config, make_train_config
from kdistill.checkpoint import load_checkpoint
from kdistill.config import EmaConfig, load_config
from kdistill.data.loader import Batch, EvalData
from kdistill.ema import WeightAverage
from kdistill.errors import CheckpointError, ConfigError
from kdistill.methods import MethodContext, build_methods
from kdistill.models.base import forward_all
from kdistill.report.run_report import write_report
from kdistill.tasks import Distillation
from tests.test_distributed import _assert_close, _distill, _errors, _launch
from tests.test_engine import _subset
from tests.test_report import fake_run

TIMING = {"train_seconds", "images_per_second"}


def _tiny() -> nn.Module:
    """A linear classifier on 6 features with batch norm (running statistics to average)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _features(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _train_tiny(run_dir: Path | None = None, **settings) -> kdistill.Result:
    kwargs = {"epochs": 3, "batch_size": 16, "device": "cpu", "seed": 0, "lr": 0.1, "ema": {"decay": 0.8, "every": 2}}
    return kdistill.train(
        _tiny(), _features(), _features(40, seed=1), run_dir=run_dir, num_classes=3, **{**kwargs, **settings}
    )


# ------------------------------------------------------------------ the moving average


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_is_the_hand_computed_average_of_the_trained_weights(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, warmup: bool
) -> None:
    """Record the weights at every update and average them by hand: avg <- d avg + (1 - d) w,
    with d = min(0.8, (1 + n) / (10 + n)) under warm-up; integer buffers copied."""
    seen: list[dict[str, torch.Tensor]] = []
    original = WeightAverage.after_step

    def recording(self, steps_done: int) -> None:
        if steps_done % self.cfg.every == 0:
            seen.append({k: t.clone() for k, t in zip(self.keys, self.live)})
        original(self, steps_done)

    monkeypatch.setattr(WeightAverage, "after_step", recording)
    initial = _tiny().state_dict()
    result = _train_tiny(tmp_path, ema={"decay": 0.8, "every": 2, "warmup": warmup})
    assert len(seen) == 3 * 6 // 2  # 6 steps per epoch, an update every 2nd

    expected = {k: v.clone() for k, v in initial.items()}
    for n, weights in enumerate(seen):
        d = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        for k, w in weights.items():
            expected[k] = d * expected[k] + (1 - d) * w if w.is_floating_point() else w
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["ema"]["updates"] == len(seen)
    for k, v in expected.items():
        assert torch.allclose(state["model"][k], v, atol=1e-6, rtol=1e-5), k  # the checkpoint's model: the average
        assert torch.equal(result.model.state_dict()[k], state["model"][k]), k  # so is the trained model
        assert torch.equal(state["ema"]["raw"][k], seen[-1][k]), k  # the trained weights, kept for a resume
    assert not torch.equal(state["model"]["0.weight"], state["ema"]["raw"]["0.weight"])


def test_ema_evaluation_reports_the_average_and_the_raw_weights(tmp_path: Path) -> None:
    result = _train_tiny(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_top1", "test_loss", "test_top1_raw"} <= set(r) for r in rows)
    # the final metrics are the average's (the model returned), the raw weights' top-1 beside them
    x, y = _features(40, seed=1)
    result.model.eval()
    assert result.metrics["top1"] == pytest.approx((result.model(x).argmax(1) == y).float().mean().item() * 100)
    assert result.metrics["top1_raw"] == rows[-1]["test_top1_raw"]


def test_weight_average_lends_the_average_and_gives_the_weights_back() -> None:
    model = _tiny()
    own = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightAverage(model, EmaConfig(decay=0.5, warmup=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.after_step(1)
    with ema.applied():
        assert torch.allclose(model[0].weight, own["0.weight"] + 0.5)
    assert torch.equal(model[0].weight, own["0.weight"] + 1.0)  # bit for bit
    ema.copy_to()
    assert torch.allclose(model[0].weight, own["0.weight"] + 0.5)


@pytest.mark.slow
def test_ema_resume_equals_uninterrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _train_tiny(tmp_path / "a")
    original = engine.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(state, path):
        original(state, path)
        if state["epoch"] == 1:
            raise Stop

    with monkeypatch.context() as m:
        m.setattr(engine, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            _train_tiny(tmp_path / "b")
    torch.manual_seed(123)
    b = _train_tiny(tmp_path / "b", resume=True)
    sa, sb = load_checkpoint(tmp_path / "a" / "checkpoint.pt"), load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert sa["ema"]["updates"] == sb["ema"]["updates"]
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
        assert torch.equal(sa["ema"]["raw"][k], sb["ema"]["raw"][k]), k
        assert torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]), k
    strip = [{k: v for k, v in h.items() if k not in TIMING} for h in a.history]
    assert [{k: v for k, v in h.items() if k not in TIMING} for h in b.history] == strip
    assert a.metrics["top1"] == b.metrics["top1"]


def test_resume_with_ema_switched_is_refused(tmp_path: Path) -> None:
    _train_tiny(tmp_path, epochs=1)
    with pytest.raises(CheckpointError, match=r"train.ema.decay=0.8 \(this run: 0.9\)"):
        _train_tiny(tmp_path, epochs=1, resume=True, ema={"decay": 0.9, "every": 2})


def test_distillation_averages_the_student_only(tmp_path: Path) -> None:
    """The teacher is not touched; the distilled model returned is the student's average."""
    teacher = _tiny()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = kdistill.distill(
        teacher,
        _tiny(),
        _features(),
        _features(40, seed=1),
        epochs=1,
        batch_size=16,
        device="cpu",
        num_classes=3,
        ema={"decay": 0.5},
        run_dir=tmp_path,
    )
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert not any(k.startswith("teacher") for k in state["model"])
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in state["model"].items())


def test_mutual_learning_averages_the_first_model() -> None:
    x, y = _features()
    first, peer = kdistill.mutual(
        [_tiny(), _tiny()], (x, y), _features(40, seed=1), epochs=1, batch_size=16, device="cpu", num_classes=3, ema={}
    )
    assert "top1_raw" in first.metrics and "top1_raw" not in peer.metrics


# ------------------------------------------------------------------ flip test-time augmentation


class LeftHalf(nn.Module):
    """Logits from the left half of the image only: mirroring it changes the answer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3 * 4 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x[..., :2].flatten(1))


def test_flip_tta_is_the_mean_of_the_logits_of_the_image_and_its_mirror() -> None:
    x = torch.randn(10, 3, 4, 4)
    model = LeftHalf()
    data = EvalData(x, torch.zeros(10, dtype=torch.long), 4, torch.device("cpu"))
    plain, tta = engine.predict_views(model, data, flip=True)
    with torch.no_grad():
        assert torch.allclose(plain, model(x))
        assert torch.allclose(tta, 0.5 * (model(x) + model(x.flip(3))))
    assert not torch.allclose(tta, plain)
    assert engine.predict_views(model, data)[1] is None


def test_flip_tta_is_reported_beside_plain_top1(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)
    result = kdistill.train(
        LeftHalf(),
        (images, labels),
        (images[:40], labels[:40]),
        epochs=2,
        batch_size=16,
        device="cpu",
        augment=False,
        num_classes=3,
        eval_tta="flip",
        run_dir=tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_top1", "test_top1_tta"} <= set(r) for r in rows)
    assert "top1_tta" in result.metrics and "nll_tta" in result.metrics
    # the plain number is the plain evaluation's, never the augmented one
    normalized = result.test_logits
    assert result.metrics["top1"] == pytest.approx((normalized.argmax(1) == labels[:40]).float().mean().item() * 100)
    assert rows[-1]["test_top1"] == pytest.approx(result.metrics["top1"])
    assert rows[-1]["test_top1_tta"] == pytest.approx(result.metrics["top1_tta"])


def test_flip_tta_refuses_token_inputs() -> None:
    tokens = torch.randint(0, 10, (32, 5))
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 2))
    with pytest.raises(ConfigError, match=r"train.eval_tta=flip mirrors images .* int64 of shape \(32, 5\)") as e:
        kdistill.train(
            model, (tokens, tokens[:, 0] % 2), (tokens, tokens[:, 0] % 2), epochs=1, device="cpu", eval_tta="flip"
        )
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ evaluation on a subset


def test_eval_subset_is_fixed_and_the_last_epoch_is_full(tmp_path: Path) -> None:
    result = _train_tiny(tmp_path, ema=None, eval_subset=15)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("test_subset") for r in rows] == [15, 15, None]
    assert result.metrics["num_samples"] == 40
    assert rows[-1]["test_top1"] == pytest.approx(result.metrics["top1"])
    x, y = _features(40, seed=1)
    data = EvalData(x, y, 8, torch.device("cpu"))
    first, again = engine.eval_subsets({"test": data}, 15, "t"), engine.eval_subsets({"test": data}, 15, "t")
    seen, seen_again = (torch.cat([b.images for b in d["test"]]) for d in (first, again))
    assert torch.equal(seen, seen_again) and len(first["test"].labels) == len(seen) == 15
    assert len({tuple(r.tolist()) for r in seen}) == 15  # 15 different samples
    assert engine.eval_subsets({"test": data}, 40, "t")["test"] is data  # the whole set: no subset


def test_eval_subset_curve_is_on_the_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    original = engine.predict_views

    def counting(model, data, *args, **kwargs):
        sizes.append(len(data.labels))
        return original(model, data, *args, **kwargs)

    monkeypatch.setattr(engine, "predict_views", counting)
    _train_tiny(None, ema=None, eval_subset=15, epochs=3)
    assert sizes == [15, 15, 40]


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("train.ema.decay=1.5", "train.ema.decay"),
        ("train.ema.every=0", "train.ema.every"),
        ("train.ema.speed=2", "train.ema.speed: unknown key"),
        ("train.eval_tta=vertical", "train.eval_tta"),
        ("train.eval_subset=0", "train.eval_subset"),
    ],
)
def test_bad_settings_are_one_line(setting: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named) as e:
        load_config("quickstart", [setting])
    assert "\n" not in str(e.value)


def test_settings_parse() -> None:
    cfg = load_config("quickstart", ["train.ema.decay=0.99", "train.eval_tta=flip", "train.eval_subset=500"])
    assert cfg.train.ema == EmaConfig(decay=0.99) and cfg.train.eval_tta == "flip" and cfg.train.eval_subset == 500
    assert make_train_config(ema={}).ema == EmaConfig()
    assert make_train_config().ema is None and make_train_config().eval_tta == "off"
    teacher = load_config("quickstart", ["train.ema.decay=0.99", "teacher.train.ema=null"]).train_for("teacher")
    assert teacher.ema is None


# ------------------------------------------------------------------ report


@pytest.mark.slow
def test_report_shows_tta_and_raw_top1_beside_top1(tmp_path: Path) -> None:
    plain = write_report(fake_run(tmp_path, "plain", 4.0)).read_text()
    assert "flip TTA" not in plain and "without the weight average" not in plain
    run = fake_run(tmp_path, "fast", 4.0)
    summary = json.loads((run / "summary.json").read_text())
    for i, phase in enumerate(("baseline", "distilled")):
        summary["models"][phase]["test"].update(top1_tta=71.25 + i, top1_raw=60.5 + i)
    (run / "summary.json").write_text(json.dumps(summary))
    text = write_report(run).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert "| test top-1 | top-1 with flip TTA | top-1 without the weight average |" in header
    assert "| 71.25% | 60.50% |" in text and "| 72.25% | 61.50% |" in text
    rows = (run / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("run,phase,model,top1,top1_tta,top1_raw")


# ------------------------------------------------------------------ two ranks (torchrun)


@pytest.fixture(scope="module")
def small(mini) -> dict:
    """256 training and 100 test images of the bundled sample (the engine tests' subset)."""
    return _subset(mini)


def _scenario_fast(rank: int, out: Path, small: dict) -> None:
    result = _distill(small, out / "run", epochs=2, ema={"decay": 0.9}, eval_tta="flip", eval_subset=30)
    torch.save({"weights": result.model.state_dict(), "metrics": result.metrics}, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ranks_average_evaluate_and_subset_like_one_process(small: dict, tmp_path: Path) -> None:
    reference = _distill(small, tmp_path / "single", epochs=2, ema={"decay": 0.9}, eval_tta="flip", eval_subset=30)
    _launch(_scenario_fast, tmp_path, small)
    assert not _errors(tmp_path), _errors(tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    _assert_close(r0["weights"], r1["weights"], exact=True)  # every rank ends with the same average
    _assert_close(r0["weights"], reference.model.state_dict())
    for key in ("top1", "top1_tta", "top1_raw"):
        assert r0["metrics"][key] == pytest.approx(reference.metrics[key], abs=1.01), key  # one image of 100
    single = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    multi = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("test_subset") for r in multi] == [r.get("test_subset") for r in single] == [30, None]


# ------------------------------------------------------------------ bf16 on the CPU, airnet


def test_bf16_autocast_on_the_cpu_trains_airnet_in_bfloat16_and_keeps_float32_weights() -> None:
    """train.amp=bf16 (configs/cifar10_seed_fast.yaml) runs the forward in bfloat16 on the CPU
    too; the weights, gradients and the loss stay float32, and the model learns."""
    seen = []
    model = kdistill.create_model("airnet", num_classes=2, widths=(4, 8, 8))
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.zeros(128, dtype=torch.long)
    images[64:, 0] = 255  # class 1: a saturated red channel
    labels[64:] = 1
    result = kdistill.train(
        model,
        (images, labels),
        (images, labels),
        epochs=4,
        batch_size=32,
        lr=0.1,
        device="cpu",
        augment=False,
        amp="bf16",
        num_classes=2,
    )
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert result.metrics["top1"] > 90


# ------------------------------------------------------------------ the compiled teacher


@pytest.mark.slow
@pytest.mark.parametrize("methods", ["kd", "at"])  # logits only; stage features (attention transfer)
def test_compiled_teacher_gives_the_eager_teachers_losses_and_is_given_back_uncompiled(methods: str) -> None:
    """train.compile_teacher runs the frozen teacher through torch.compile: the distillation
    losses equal the eager teacher's, and the teacher module itself is not compiled."""

    teacher = kdistill.create_model("airnet", num_classes=3, widths=(4, 8, 8)).eval()
    student = kdistill.create_model("airnet", num_classes=3, widths=(4, 4, 8))
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g), torch.arange(8))
    dcfg = _distill_config(methods, 0.5, None, None)
    with torch.no_grad():
        shapes = {"student": forward_all(student, batch.images), "teacher": forward_all(teacher, batch.images)}
    losses = {}
    for compiled in (False, True):
        context = MethodContext(
            student=shapes["student"], teacher=shapes["teacher"], num_classes=3, num_samples=8, epochs=1
        )
        task = Distillation(
            student, teacher, build_methods(dcfg.method_options, context), 0.5, 0.5, compile_teacher=compiled
        )
        _, terms = task(batch, 0.0)
        losses[compiled] = {k: v.item() for k, v in terms.items()}
    assert losses[True].keys() == losses[False].keys()
    for term, value in losses[False].items():
        assert losses[True][term] == pytest.approx(value, rel=1e-4, abs=1e-6), term
    assert type(teacher).__call__ is nn.Module.__call__ and getattr(teacher, "_compiled_call_impl", None) is None


@pytest.mark.slow
def test_distillation_with_a_compiled_teacher_learns(tmp_path: Path) -> None:
    """End to end through kdistill.distill(..., compile_teacher=True): the run records the
    setting and the student learns from a trained teacher."""
    teacher = _train_tiny(epochs=6, ema=None).model
    result = kdistill.distill(
        teacher,
        _tiny(),
        _features(),
        _features(40, seed=1),
        epochs=6,
        batch_size=16,
        lr=0.1,
        device="cpu",
        num_classes=3,
        compile_teacher=True,
        run_dir=tmp_path,
    )
    assert result.metrics["top1"] > 50
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["compile_teacher"] is True
