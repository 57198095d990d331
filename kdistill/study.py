"""The whole study: teacher -> student alone (baseline) -> distilled student -> report.

Each phase trains in its own folder of the run directory (``teacher/``, ``baseline/``,
``distilled/``) with its checkpoint and ``metrics.jsonl``; ``--resume`` skips finished
phases and continues an interrupted one. The baseline and the distilled student start from
the same initial weights and see the same batches, so the difference between them is the
distillation alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdistill import api, distributed
from kdistill.checkpoint import load_model
from kdistill.config import RunConfig, dump_config
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.data.loader import EvalData, Normalize
from kdistill.engine import predict, select_device
from kdistill.errors import CheckpointError, ConfigError
from kdistill.evaluate import agreement, classification_metrics, profile_model
from kdistill.models import create_model
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.progress import log
from kdistill.report import headline, write_report

LOCK_NAME = ".lock"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from kdistill import __version__

    return f"kdistill {__version__} (not a git checkout)"


def _teacher_name(cfg: RunConfig) -> str:
    if cfg.teacher.checkpoints:
        return f"ensemble of {len(cfg.teacher.checkpoints)} teachers"
    if cfg.teacher.checkpoint:
        return f"{cfg.teacher.checkpoint}"
    return cfg.teacher.name


def load_data(cfg: RunConfig) -> ImageDataset:
    """The run's data set; in a torchrun job one process per machine downloads and decodes
    it first, the others then read its cache."""
    d = cfg.data
    return distributed.local_main_first(lambda: load_dataset(d.dataset, d.image_size, d.data_dir, d.download, d.val_size, cfg.seed))


def model_spec(name: str, kwargs: dict, num_classes: int) -> dict[str, Any]:
    return {"name": name, "kwargs": {**kwargs, "num_classes": num_classes}}


def load_teacher(path: Path, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    model, state = load_model(path, map_location="cpu")
    classes = state.get("data", {}).get("classes")
    got = state["model_spec"]["kwargs"].get("num_classes")
    if got is not None and got != num_classes:
        raise CheckpointError(f"teacher checkpoint {path} predicts {got} classes but the data set has {num_classes}")
    if classes is not None and len(classes) != num_classes:
        raise CheckpointError(f"teacher checkpoint {path} was trained on {len(classes)} classes but the data set has {num_classes}")
    return model.to(device), state


def write_single_summary(run_dir: Path, model_name: str, result: api.Result, ds: ImageDataset, teacher=None) -> None:
    """summary.json of a ``kdistill train`` or ``distill`` run: test metrics, cost, and
    agreement with the teacher for a distillation. All ranks call it; rank 0 writes."""
    teacher_logits = None
    if teacher is not None and result.test_logits is not None:
        mean, std = ds.mean_std()
        device = next(teacher.parameters()).device
        test = EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))
        teacher_logits = predict(teacher, test)  # sharded over the ranks
    if not distributed.is_main():
        return
    summary: dict[str, Any] = {
        "model": model_name,
        "test": result.metrics,
        "profile": profile_model(result.model, ds.image_shape),
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "epochs": len(result.history),
    }
    if teacher_logits is not None:
        summary["agreement"] = agreement(result.test_logits, teacher_logits)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log(f"{model_name}: test top-1 {result.metrics.get('top1', float('nan')):.2f}% after {len(result.history)} epochs; outputs in {run_dir}")


def build_teacher(cfg: RunConfig, num_classes: int, device: torch.device) -> tuple[torch.nn.Module, dict] | None:
    """The teacher from ``teacher.checkpoint`` or the ensemble of ``teacher.checkpoints``;
    None when the teacher must be trained in this run."""
    if cfg.teacher.checkpoint:
        teacher, _ = load_teacher(cfg.teacher.checkpoint, num_classes, device)
        return teacher, {"checkpoint": str(cfg.teacher.checkpoint)}
    if cfg.teacher.checkpoints:
        members = [load_teacher(p, num_classes, device)[0] for p in cfg.teacher.checkpoints]
        ensemble = TeacherEnsemble(members, cfg.teacher.weights, cfg.distill.temperature).to(device)
        return ensemble, {"checkpoints": [str(p) for p in cfg.teacher.checkpoints], "weights": cfg.teacher.weights}
    return None


@contextlib.contextmanager
def open_run_dir(cfg: RunConfig, resume: bool, run_dir: Path | None = None) -> Iterator[Path]:
    """Create (or, with ``resume``, reopen) the run directory, record the resolved config and
    git revision, and hold an exclusive lock on it while the run lasts, so that two runs
    never write into the same directory. The lock is released when the process ends, even
    when it is killed. In a torchrun job rank 0 does all this; every rank gets its errors."""
    run_dir = Path(run_dir) if run_dir else cfg.output_dir / cfg.name
    stack = contextlib.ExitStack()
    distributed.on_main(lambda: stack.enter_context(_locked_run_dir(cfg, resume, run_dir)))
    with stack:
        yield run_dir


@contextlib.contextmanager
def _locked_run_dir(cfg: RunConfig, resume: bool, run_dir: Path) -> Iterator[Path]:
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not resume:
        raise ConfigError(f"run directory {run_dir} already exists; pass --resume to continue it or choose another --name")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / LOCK_NAME, "a+")
    except OSError as e:
        raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(f"run directory {run_dir} is in use by {holder}; wait for it to finish or choose another --name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"kdistill pid {os.getpid()}\n")
        lock.flush()
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "git.txt").write_text(git_revision() + "\n")
        yield run_dir


def run_study(cfg: RunConfig, resume: bool = False, run_dir: Path | None = None) -> Path:
    """Run teacher -> baseline -> distilled -> report. Returns the run directory."""
    with open_run_dir(cfg, resume, run_dir) as run_dir:
        return _run_study(cfg, resume, run_dir)


def _run_study(cfg: RunConfig, resume: bool, run_dir: Path) -> Path:
    device = select_device(cfg.device)
    start = time.perf_counter()
    ds = load_data(cfg)
    log(f"data: {ds.name}: {len(ds.train_labels)} train, {len(ds.test_labels)} test, {ds.num_classes} classes; device {device}")

    def student() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)  # baseline and distilled student start from the same weights
        return create_model(cfg.student.name, num_classes=ds.num_classes, **cfg.student.kwargs)

    phases: dict[str, api.Result] = {}
    # 1. teacher: from a checkpoint (or several), or trained here
    loaded = build_teacher(cfg, ds.num_classes, device)
    if loaded:
        teacher, teacher_spec = loaded
    else:
        teacher_spec = model_spec(cfg.teacher.name, cfg.teacher.kwargs, ds.num_classes)
        torch.manual_seed(cfg.seed)
        teacher = create_model(**{**teacher_spec["kwargs"], "name": cfg.teacher.name})
        phases["teacher"] = api.train(
            teacher, ds, config=cfg.train_for("teacher"), data=cfg.data, device=device, run_dir=run_dir / "teacher",
            resume=resume, seed=cfg.seed, model_spec=teacher_spec, desc="teacher",
        )
    # 2. the student alone
    sspec = model_spec(cfg.student.name, cfg.student.kwargs, ds.num_classes)
    phases["baseline"] = api.train(
        student(), ds, config=cfg.train_for("student"), data=cfg.data, device=device, run_dir=run_dir / "baseline",
        resume=resume, seed=cfg.seed, model_spec=sspec, desc="baseline",
    )
    # 3. the student distilled from the teacher
    d = cfg.distill
    phases["distilled"] = api.distill(
        teacher, student(), ds, methods=d.methods, alpha=d.alpha, ce_weight=d.ce_weight, config=cfg.train_for("distill"),
        data=cfg.data, device=device, run_dir=run_dir / "distilled", resume=resume, seed=cfg.seed,
        model_spec=sspec, teacher_spec=teacher_spec, desc="distill",
    )
    # 3b. born-again generations: each student distilled from the previous generation
    previous = phases["distilled"].model
    for generation in range(2, cfg.born_again + 2):
        phases[f"generation{generation}"] = api.distill(
            previous, student(), ds, methods=d.methods, alpha=d.alpha, ce_weight=d.ce_weight, config=cfg.train_for("distill"),
            data=cfg.data, device=device, run_dir=run_dir / f"generation{generation}", resume=resume, seed=cfg.seed,
            model_spec=sspec, teacher_spec={"generation": generation - 1, **sspec}, desc=f"generation {generation}",
        )
        previous = phases[f"generation{generation}"].model

    # 4. evaluate all three on the test set, the same way
    log("evaluating and profiling the three models")
    mean, std = ds.mean_std()
    test = EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))
    models = {"teacher": teacher, **{name: r.model for name, r in phases.items() if name != "teacher"}}
    logits = {name: predict(m, test) for name, m in models.items()}  # sharded over the ranks
    if not distributed.is_main():
        return run_dir  # rank 0 profiles and writes the report
    summary_models = {}
    for name, model in models.items():
        entry: dict[str, Any] = {
            "model": _teacher_name(cfg) if name == "teacher" else cfg.student.name,
            "test": classification_metrics(logits[name], ds.test_labels, ds.classes),
            "profile": profile_model(model, ds.image_shape),
        }
        if name != "teacher":
            entry["agreement"] = agreement(logits[name], logits["teacher"])
        if name in phases:
            r = phases[name]
            entry.update(train_seconds=r.train_seconds, images_per_second=r.images_per_second, epochs=len(r.history))
        else:
            entry.update(train_seconds=0.0, images_per_second=0.0, from_checkpoint=teacher_spec)
        summary_models[name] = entry
        model.to(device)
        (run_dir / name).mkdir(exist_ok=True)
        torch.save({"logits": logits[name].half(), "labels": ds.test_labels}, run_dir / name / "test_logits.pt")

    summary = {
        "name": cfg.name,
        "seed": cfg.seed,
        "device": str(device),
        "method": "+".join(d.methods),
        "platform": f"{platform.machine()} {platform.system()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "data": {"dataset": ds.name, "train_size": len(ds.train_labels), "test_size": len(ds.test_labels), "num_classes": ds.num_classes},
        "models": summary_models,
        "wall_seconds": time.perf_counter() - start,
    }
    summary["headline"] = headline(summary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_report(run_dir)
    h = summary["headline"]
    log(
        f"done in {summary['wall_seconds']:.0f} s: teacher {summary_models['teacher']['test']['top1']:.2f}%, "
        f"baseline {summary_models['baseline']['test']['top1']:.2f}%, distilled {summary_models['distilled']['test']['top1']:.2f}% "
        f"({h['gain_top1']:+.2f} points at {h['params_fraction'] * 100:.1f}% of the teacher's parameters); report: {report}"
    )
    return run_dir

