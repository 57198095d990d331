"""The single-model commands: ``train``, ``distill``, ``mutual``, ``cache-teacher`` and
``evaluate``. Each takes a validated config (or a checkpoint) and does the work; the CLI
only parses, calls these and prints. They train with the study's phase functions, so a
``kdistill train`` is the teacher phase of a ``kdistill run``, alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kdistill import api, runs
from kdistill.checkpoint import load_model
from kdistill.config import RunConfig
from kdistill.data.dataset import load_recorded
from kdistill.engine import predict, predict_views, select_device
from kdistill.errors import CheckpointError
from kdistill.evaluate import agreement, metrics_with_tta, profile_model
from kdistill.study import Phases
from kdistill.teacher_cache import TeacherCache


def train_model(cfg: RunConfig, resume: bool) -> Path:
    """``kdistill train``: the config's teacher model trained with cross-entropy."""
    start = time.perf_counter()
    with runs.job(cfg), runs.open_run_dir(cfg, resume, kind="train") as run_dir:
        ds = runs.load_data(cfg)
        spec = runs.spec_for(cfg.teacher, ds.num_classes, ds, cfg.data)
        model = runs.teacher_to_train(cfg, spec)
        with runs.whole_budget(cfg):
            run = Phases(cfg, ds, select_device(cfg.device), resume)
            result = run.train(model, spec, "teacher", run_dir, runs.budget_left(cfg, start), cfg.teacher.name)
        runs.write_single_summary(
            run_dir,
            cfg.teacher.name,
            result,
            ds,
            profile_max_seconds=runs.profile_seconds(cfg),
            size=cfg.data.train_size,
        )
        return run_dir


def distill_model(cfg: RunConfig, resume: bool) -> Path:
    """``kdistill distill``: the config's student distilled from a trained teacher."""
    start = time.perf_counter()
    runs.check_distillation(cfg)
    with runs.job(cfg), runs.open_run_dir(cfg, resume, kind="distill") as run_dir:
        ds = runs.load_data(cfg)
        device = select_device(cfg.device)
        teacher, teacher_spec = runs.build_teacher(cfg, ds.num_classes, device, ds)
        spec = runs.spec_for(cfg.student, ds.num_classes, ds, cfg.data)
        student = runs.new_model(spec, cfg.seed)
        with runs.whole_budget(cfg):
            run = Phases(cfg, ds, device, resume)
            result = run.distill(teacher, teacher_spec, student, spec, run_dir, runs.budget_left(cfg, start), "distill")
        runs.write_single_summary(
            run_dir,
            cfg.student.name,
            result,
            ds,
            teacher=teacher,
            profile_max_seconds=runs.profile_seconds(cfg),
            size=cfg.data.train_size,
        )
        return run_dir


def mutual_models(cfg: RunConfig, resume: bool) -> Path:
    """``kdistill mutual``: the config's ``mutual.models`` trained together (deep mutual learning)."""
    start = time.perf_counter()
    with runs.job(cfg), runs.open_run_dir(cfg, resume, kind="mutual") as run_dir:
        ds = runs.load_data(cfg)
        specs = [runs.model_spec(name, {}, ds.num_classes) for name in cfg.mutual.models]
        models = [
            runs.new_model(spec, cfg.seed + i) for i, spec in enumerate(specs)
        ]  # peers of one architecture must not start identical
        with runs.whole_budget(cfg):
            results = api.mutual(
                models,
                ds,
                temperature=cfg.mutual.temperature,
                weight=cfg.mutual.weight,
                config=runs.train_config(cfg, "student", runs.budget_left(cfg, start)),
                data=cfg.data,
                device=select_device(cfg.device),
                run_dir=run_dir,
                resume=resume,
                seed=cfg.seed,
                model_specs=specs,
            )
        for i, (name, result) in enumerate(zip(cfg.mutual.models, results)):
            runs.write_single_summary(run_dir / f"model{i}", name, result, ds, size=cfg.data.train_size)
        return run_dir


def cache_teacher(cfg: RunConfig, out: Path, top_k: int = 0, dtype: str = "float16") -> TeacherCache:
    """``kdistill cache-teacher``: the trained teacher's logits on every augmented view of
    the distillation's epochs, written to ``out``. Under torchrun the ranks share the work;
    rank 0 writes the file."""
    with runs.job(cfg):
        ds = runs.load_data(cfg)
        device = select_device(cfg.device)
        teacher, _ = runs.build_teacher(cfg, ds.num_classes, device, ds)
        return runs.cache_teacher(cfg, teacher, ds, device, out, top_k, dtype)


def evaluate_checkpoint(
    path: Path,
    dataset: str | None = None,
    data_dir: Path | None = None,
    device: str = "auto",
    teacher: Path | None = None,
    tta: str = "off",
) -> dict[str, Any]:
    """``kdistill evaluate``: a checkpoint's test metrics (on its own data set unless
    ``dataset`` names another; with ``tta="flip"`` also flip test-time augmentation's, beside
    the plain ones), its agreement with ``teacher``, and its profile."""
    device = select_device(device)
    model, state = load_model(path)
    if state.get("model_spec") is None:
        raise CheckpointError(
            f"{path} holds a model trained through the Python API without a registry name; evaluate it from Python"
        )
    info = state.get("data", {})
    ds = load_recorded(info, dataset, data_dir)
    dataset = dataset or info.get("dataset")
    expected = state["model_spec"]["kwargs"].get("num_classes")
    if expected is not None and expected != ds.num_classes:
        raise CheckpointError(f"{path} predicts {expected} classes but data set {dataset!r} has {ds.num_classes}")
    size = info.get("train_size")  # the checkpoint's own normalisation and training size
    test = runs.test_set(ds, device, info.get("mean"), info.get("std"), size)
    logits, mirrored = predict_views(model.to(device), test, flip=tta == "flip", desc="evaluate")
    metrics = {
        "checkpoint": str(path),
        "dataset": dataset,
        "test": metrics_with_tta(logits, mirrored, ds.test_labels, ds.classes),
    }
    if teacher:
        teacher_model, _ = load_model(Path(teacher))
        metrics["agreement"] = agreement(logits, predict(teacher_model.to(device), test))
    metrics["profile"] = profile_model(model, runs.input_shape(ds, size))
    return metrics
