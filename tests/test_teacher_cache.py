"""Teacher cache: cached and live distillation agree step by step; mismatches are refused."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.api import make_train_config, prepare_data
from kdistill.config import DataConfig
from kdistill.data.dataset import ImageDataset
from kdistill.errors import CacheError, ConfigError
from kdistill.methods import build_methods
from kdistill.methods.base import MethodContext
from kdistill.models.base import feature_shapes
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.tasks import Distillation
from kdistill.teacher_cache import TeacherCache, build_teacher_cache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> ImageDataset:
    """384 training images of every class (a strided subset of the sorted sample)."""
    keep = torch.arange(0, len(mini.train_labels), 13)[:384]
    return dataclasses.replace(mini, train_images=mini.train_images[keep], train_labels=mini.train_labels[keep])


def _model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return kdistill.create_model(name)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return _model("seed_teacher", 0)


@pytest.fixture(scope="module")
def cache32(small: ImageDataset, teacher) -> TeacherCache:
    return kdistill.cache_teacher(teacher, small, epochs=2, device="cpu", dtype="float32")


def _task(student, teacher, small, cache=None, methods=None) -> Distillation:
    context = MethodContext(
        feature_shapes(student, (3, 32, 32)), feature_shapes(teacher, (3, 32, 32)), 10, len(small.train_labels), 2
    )
    built = build_methods(methods or {"kd": {"temperature": 4.0}}, context)
    return Distillation(student, teacher, built, alpha=0.9, ce_weight=0.1, teacher_cache=cache)


def test_cached_and_live_losses_match_step_by_step(small, teacher, cache32) -> None:
    """Same batch, same student: every loss term equal whether the teacher runs or is read."""
    cfg = make_train_config(batch_size=64)
    loader = prepare_data(small, cfg=cfg, device=CPU, data=DataConfig(), seed=0).loader
    student = _model("seed_student", 1)
    live, cached = _task(student, teacher, small), _task(student, teacher, small, cache32)
    steps = len(loader)
    compared = 0
    for epoch in range(2):
        for i, batch in enumerate(loader.epoch(epoch)):
            _, a = live(batch, epoch + i / steps)
            _, b = cached(batch, epoch + i / steps)
            assert a.keys() == b.keys() == {"ce", "kd"}
            for term in a:
                torch.testing.assert_close(a[term], b[term], rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == 2 * steps
    # a float16 cache agrees to fp16 precision
    cache16 = build_teacher_cache(teacher, loader, 1, batch_size=100)
    assert cache16.logits.dtype == torch.float16
    batch = next(iter(loader.epoch(0)))
    _, a = live(batch, 0.0)
    _, b = _task(student, teacher, small, cache16)(batch, 0.0)
    torch.testing.assert_close(a["kd"], b["kd"], rtol=2e-3, atol=1e-4)


@pytest.mark.slow
def test_cached_distillation_trains_like_live(small, teacher, cache32, tmp_path: Path) -> None:
    kw = dict(epochs=2, batch_size=64, device="cpu", lr=0.02)
    live = kdistill.distill(teacher, _model("seed_student", 1), small, **kw)
    path = cache32.save(tmp_path / "cache.pt")
    cached = kdistill.distill(
        teacher, _model("seed_student", 1), small, teacher_cache=path, run_dir=tmp_path / "run", **kw
    )
    for a, b in zip(live.history, cached.history):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["train_kd"] == pytest.approx(a["train_kd"], rel=1e-4)
    for (name, p), q in zip(live.model.state_dict().items(), cached.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-5, msg=name)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["teacher_cache"]["path"] == str(path) and state["teacher_cache"]["epochs"] == 2


def test_cache_file_round_trip_and_size(small, teacher, cache32, tmp_path: Path) -> None:
    path = cache32.save(tmp_path / "c.pt")
    loaded = TeacherCache.load(path)
    assert loaded.fingerprint == cache32.fingerprint and loaded.epochs == 2
    torch.testing.assert_close(loaded.logits, cache32.logits)
    # float16 storage: E x N x K x 2 bytes, nothing more than a small header
    cache16 = kdistill.cache_teacher(teacher, small, epochs=3, device="cpu", path=tmp_path / "c16.pt")
    assert cache16.nbytes == 3 * 384 * 10 * 2
    assert (tmp_path / "c16.pt").stat().st_size < cache16.nbytes + 8_000


@pytest.mark.parametrize(
    "change, key",
    [
        ({"seed": 1}, "seed"),
        ({"data": DataConfig(flip=False)}, "data.flip"),
        ({"data": DataConfig(crop_padding=2)}, "data.crop_padding"),
        ({"teacher": "other"}, "teacher weights"),
        ({"train": "other"}, "training images and labels"),
        ({"epochs": 3}, "holds 2 epochs"),
    ],
)
def test_fingerprint_mismatch_is_refused(small, teacher, cache32, change, key) -> None:
    kw = dict(
        epochs=change.get("epochs", 1), batch_size=64, device="cpu", seed=change.get("seed", 0), data=change.get("data")
    )
    t = _model("seed_teacher", 5) if change.get("teacher") else teacher
    data = dataclasses.replace(small, train_labels=small.train_labels.roll(1)) if change.get("train") else small
    with pytest.raises(CacheError, match=key) as err:
        kdistill.distill(t, _model("seed_student", 1), data, teacher_cache=cache32, **kw)
    assert "\n" not in str(err.value)


def test_feature_methods_refuse_a_logit_cache(small, teacher, cache32) -> None:
    with pytest.raises(ConfigError, match="at need the teacher's stage features"):
        kdistill.distill(
            teacher, _model("seed_student", 1), small, methods="at", teacher_cache=cache32, epochs=1, device="cpu"
        )


def test_unreadable_caches_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="does not exist"):
        TeacherCache.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a cache at all")
    with pytest.raises(CacheError, match="unreadable"):
        TeacherCache.load(tmp_path / "garbage.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CacheError, match="not a kdistill teacher cache"):
        TeacherCache.load(tmp_path / "other.pt")


def test_top_k_cache_keeps_the_largest_logits(small, teacher, cache32) -> None:
    cfg = make_train_config()
    loader = prepare_data(small, cfg=cfg, device=CPU, data=DataConfig(), seed=0).loader
    topk = build_teacher_cache(teacher, loader, 2, top_k=3)
    assert topk.top_k == 3 and topk.logits is None and topk.classes.dtype == torch.uint8
    idx = torch.arange(40)
    full, approx = cache32.lookup(1, idx), topk.lookup(1, idx)
    top = full.topk(3, dim=1).indices
    torch.testing.assert_close(approx.gather(1, top), full.gather(1, top), rtol=2e-3, atol=2e-3)
    rest = torch.ones_like(full, dtype=torch.bool).scatter_(1, top, False)
    tail_mean = (full * rest).sum(1) / 7  # every other logit is the mean of the others
    torch.testing.assert_close(approx[rest].view(40, 7), tail_mean[:, None].expand(40, 7), rtol=2e-3, atol=2e-3)


def test_ensemble_caches_its_combined_logits(small) -> None:
    members = [_model("seed_student", 2), _model("seed_student", 3)]
    ensemble = TeacherEnsemble(members, [2.0, 1.0], temperature=4.0)
    cache = kdistill.cache_teacher(ensemble, small, epochs=1, device="cpu", dtype="float32")
    loader = prepare_data(small, cfg=make_train_config(), device=CPU, data=DataConfig(), seed=0).loader
    views = loader.device_views(0)
    idx = torch.arange(50)
    with torch.no_grad():
        torch.testing.assert_close(
            cache.lookup(0, idx), ensemble(loader.batch(idx, views).images), rtol=1e-5, atol=1e-5
        )
    assert cache.fingerprint["teacher_temperature"] == 4.0
    other_t = TeacherEnsemble(members, [2.0, 1.0], temperature=2.0)
    with pytest.raises(CacheError, match="ensemble temperature"):
        kdistill.distill(other_t, _model("seed_student", 1), small, teacher_cache=cache, epochs=1, device="cpu")


# ------------------------------------------------------------------ repeated views (train.view_period)


def _loader(small, **settings):
    return prepare_data(
        small, cfg=make_train_config(batch_size=64, **settings), device=CPU, data=DataConfig(), seed=0
    ).loader


def test_view_period_repeats_the_crops_and_flips_in_each_epochs_own_order(small) -> None:
    repeated, fresh = _loader(small, view_period=2), _loader(small)
    for epoch in range(5):
        v, own, first = repeated.views(epoch), fresh.views(epoch), fresh.views(epoch % 2)
        assert torch.equal(v.order, own.order)  # shuffled as the epoch's own
        assert torch.equal(v.offsets, first.offsets) and torch.equal(v.flips, first.flips)
    assert not torch.equal(fresh.views(2).offsets, fresh.views(0).offsets)
    assert not torch.equal(repeated.views(2).order, repeated.views(0).order)
    # without augmentation every epoch shows the same inputs: one epoch of teacher outputs serves all
    assert (
        prepare_data(
            small, cfg=make_train_config(view_period=4), device=CPU, data=DataConfig(augment=False), seed=0
        ).loader.view_period
        == 1
    )


def test_view_period_lookups_are_the_live_teachers_logits_on_the_repeated_views(small, teacher) -> None:
    """Epochs 2 and 3 read the logits of epochs 0 and 1; every loss term as with the teacher
    run live on the very batch the student sees (float32 storage: to rounding)."""
    loader = _loader(small, view_period=2)
    memo = build_teacher_cache(teacher, loader, 2, dtype="float32")
    assert memo.period == 2 and memo.epochs == 2
    student = _model("seed_student", 1)
    live, read = _task(student, teacher, small), _task(student, teacher, small, memo)
    for epoch in (2, 3):
        for batch in loader.epoch(epoch):
            _, a = live(batch, float(epoch))
            _, b = read(batch, float(epoch))
            for term in a:
                torch.testing.assert_close(a[term], b[term], rtol=1e-5, atol=1e-6)


def test_view_period_runs_the_teacher_once_over_the_first_views(small, teacher, tmp_path: Path) -> None:
    seen: list[int] = []
    hook = teacher.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    try:
        result = kdistill.distill(
            teacher,
            _model("seed_student", 1),
            small,
            epochs=4,
            batch_size=64,
            lr=0.02,
            device="cpu",
            view_period=2,
            run_dir=tmp_path / "run",
        )
    finally:
        hook.remove()
    # two epochs of views, 384 images each, in inference batches; the rest are shape probes
    assert [n for n in seen if n == 384] == [384, 384] and sum(n for n in seen if n != 384) < 8
    assert len(result.history) == 4 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    views = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["teacher_views"]
    assert views["period"] == 2 and views["build_seconds"] > 0
    # made for this run, the teacher's pass is part of its training time
    steps = sum(h["train_seconds"] for h in result.history)
    assert result.train_seconds == pytest.approx(steps + views["build_seconds"])
    # the budget pays for the teacher's pass, as it would pay for a live teacher
    budgeted = kdistill.distill(
        teacher,
        _model("seed_student", 1),
        small,
        budget=3.0,
        batch_size=64,
        device="cpu",
        view_period=2,
        run_dir=tmp_path / "b",
    )
    built = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["teacher_views"]["build_seconds"]
    assert budgeted.budget["budget_seconds"] == pytest.approx(3.0 - built)


def test_a_periodic_cache_file_serves_any_number_of_epochs(small, teacher, tmp_path: Path) -> None:
    cache = kdistill.cache_teacher(teacher, small, epochs=9, device="cpu", view_period=2, path=tmp_path / "c.pt")
    assert cache.epochs == 2 and cache.period == 2
    kw = dict(batch_size=64, device="cpu", lr=0.02, teacher_cache=tmp_path / "c.pt")
    assert len(kdistill.distill(teacher, _model("seed_student", 1), small, epochs=3, view_period=2, **kw).history) == 3
    with pytest.raises(CacheError, match="train.view_period"):  # fresh views need the cache of every epoch
        kdistill.distill(teacher, _model("seed_student", 1), small, epochs=1, **kw)


def test_view_period_refuses_feature_methods_in_one_line(small, teacher) -> None:
    with pytest.raises(ConfigError, match="train.view_period=2") as err:
        kdistill.distill(teacher, _model("seed_student", 1), small, methods="at", epochs=1, device="cpu", view_period=2)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_a_study_records_where_its_distilled_students_teacher_logits_came_from(tmp_path: Path) -> None:
    """`kdistill run` with repeated views, then with a teacher cache: summary.json and the
    report say so, with each pass's cost and whether it is in the student's training time."""
    from kdistill.cli import main

    common = ["--epochs", "1", "--device", "cpu", "--output-dir", str(tmp_path), "--set", "deploy.onnx=false"]
    assert main(["run", "--name", "views", "--set", "distill.train.view_period=2", *common]) == 0
    views = json.loads((tmp_path / "views" / "summary.json").read_text())["models"]["distilled"]
    assert views["teacher_views"]["period"] == 2 and views["teacher_views"]["build_seconds"] > 0
    assert "teacher_cache" not in views
    assert "its teacher ran over them once" in (tmp_path / "views" / "report.md").read_text()

    teacher = tmp_path / "views" / "teacher" / "checkpoint.pt"
    cache = tmp_path / "c.pt"
    run = ["run", "--name", "cached", "--teacher-checkpoint", str(teacher), "--set", f"distill.teacher_cache={cache}"]
    assert main([*run, *common]) == 2  # no cache yet: refused before any phase trains
    assert not (tmp_path / "cached" / "baseline" / "checkpoint.pt").exists()
    assert main(["cache-teacher", "--teacher", str(teacher), "--out", str(cache), "--epochs", "1"]) == 0
    assert main([*run, *common]) == 0
    cached = json.loads((tmp_path / "cached" / "summary.json").read_text())["models"]["distilled"]
    assert cached["teacher_cache"]["path"] == str(cache) and cached["teacher_cache"]["epochs"] == 1
    assert cached["teacher_cache"]["build_seconds"] == pytest.approx(TeacherCache.load(cache).build_seconds)
    assert "teacher_views" not in cached
    assert "from a teacher cache (1 epoch(s) of views)" in (tmp_path / "cached" / "report.md").read_text()
