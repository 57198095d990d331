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
from kdistill.config import RunConfig, TrainConfig, dump_config
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.data.loader import EvalData, Normalize
from kdistill.engine import predict, select_device
from kdistill.errors import CheckpointError, ConfigError
from kdistill.evaluate import agreement, classification_metrics, profile_model
from kdistill.files import atomic_write, atomic_write_text, remove_stale_temporaries
from kdistill.models import create_model
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.progress import log, progress
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


# seconds kept back from a budget for what follows training (evaluation, profiling, report):
# this fraction of the budget, at most REPORT_RESERVE_MAX seconds
REPORT_RESERVE_FRACTION = 0.05
REPORT_RESERVE_MAX = 8.0


def profile_seconds(cfg: RunConfig) -> float:
    """Time cap of each latency measurement: 5 s, less under a short budget."""
    return min(5.0, max(0.2, 0.005 * cfg.budget)) if cfg.budget else 5.0


def budget_left(cfg: RunConfig, start: float, reserve: float | None = None) -> float | None:
    """Seconds of ``cfg.budget`` left for training, counted from ``start`` (perf_counter)
    and keeping ``reserve`` seconds for the evaluation and report at the end. In a torchrun
    job rank 0's clock decides, for every rank (all call it together)."""
    if not cfg.budget:
        return None
    return distributed.on_main(lambda: _budget_left(cfg, start, reserve), share=True)


def _budget_left(cfg: RunConfig, start: float, reserve: float | None) -> float:
    if reserve is None:
        reserve = min(REPORT_RESERVE_FRACTION * cfg.budget, REPORT_RESERVE_MAX)
    spent = time.perf_counter() - start
    left = cfg.budget - spent - reserve
    if left <= 0:
        raise ConfigError(f"budget: {cfg.budget:.0f} s were spent before training could start ({spent:.0f} s of loading); give a larger --budget")
    return left


def train_config(cfg: RunConfig, phase: str, budget: float | None = None) -> TrainConfig:
    """The phase's train settings, with a time budget (seconds) when given."""
    tcfg = cfg.train_for(phase)
    return tcfg.model_copy(update={"budget": budget}) if budget else tcfg


def load_data(cfg: RunConfig) -> ImageDataset:
    """The run's data set; in a torchrun job one process per machine downloads and decodes
    it first, the others then read its cache."""
    d = cfg.data
    return distributed.local_main_first(lambda: load_dataset(d.dataset, d.image_size, d.data_dir, d.download, d.val_size, cfg.seed))


def model_spec(name: str, kwargs: dict, num_classes: int) -> dict[str, Any]:
    return {"name": name, "kwargs": {**kwargs, "num_classes": num_classes}}


def load_teacher(path: Path, num_classes: int, device: torch.device, ds: ImageDataset | None = None) -> tuple[torch.nn.Module, dict]:
    """A trained teacher, checked against the data set (with ``ds``: warn when it was
    trained on the run's validation images)."""
    model, state = load_model(path, map_location="cpu")
    classes = state.get("data", {}).get("classes")
    got = state["model_spec"]["kwargs"].get("num_classes")
    if got is not None and got != num_classes:
        raise CheckpointError(f"teacher checkpoint {path} predicts {got} classes but the data set has {num_classes}")
    if classes is not None and len(classes) != num_classes:
        raise CheckpointError(f"teacher checkpoint {path} was trained on {len(classes)} classes but the data set has {num_classes}")
    if ds is not None:
        warn_if_teacher_saw_validation(path, state, ds)
    return model.to(device), state


def teacher_saw_validation(state: dict, ds: ImageDataset) -> bool:
    """Whether a teacher checkpoint was trained on this run's validation images: the same
    source data, split another way (or not at all). Distillation copies the teacher's
    function, including what it memorised of those images, so the student's validation
    accuracy is then optimistic (seed pair, full CIFAR-10, teacher trained on all 50,000
    images: the distillation gain read +2.7 points on a 5,000-image validation split and
    +0.1 on the test set)."""
    data = state.get("data") or {}
    if ds.val_split is None or data.get("checksum") != ds.checksum:
        return False
    return data.get("val_split") != ds.val_split


def warn_if_teacher_saw_validation(path: Path, state: dict, ds: ImageDataset) -> None:
    if teacher_saw_validation(state, ds):
        theirs = (state.get("data") or {}).get("val_split")
        held = f"held out {theirs['size']} images with seed {theirs['seed']}" if theirs else "held out no validation images"
        log(
            f"warning: teacher checkpoint {path} {held}, so it was trained on some of this run's "
            f"{ds.val_split['size']} validation images (seed {ds.val_split['seed']}): the distilled student's "
            "validation accuracy will be optimistic. For tuning, train the teacher with the same data.val_size and seed."
        )


def write_single_summary(run_dir: Path, model_name: str, result: api.Result, ds: ImageDataset, teacher=None, profile_max_seconds: float = 5.0) -> None:
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
        "profile": profile_model(result.model, ds.image_shape, max_seconds=profile_max_seconds),
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "epochs": len(result.history),
    }
    if result.budget:
        summary["budget"] = result.budget
    if teacher_logits is not None:
        summary["agreement"] = agreement(result.test_logits, teacher_logits)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    log(f"{model_name}: test top-1 {result.metrics.get('top1', float('nan')):.2f}% after {len(result.history)} epochs; outputs in {run_dir}")


def build_teacher(cfg: RunConfig, num_classes: int, device: torch.device, ds: ImageDataset | None = None) -> tuple[torch.nn.Module, dict] | None:
    """The teacher from ``teacher.checkpoint`` or the ensemble of ``teacher.checkpoints``;
    None when the teacher must be trained in this run. With ``ds``, warn when a teacher
    was trained on its validation images."""
    if cfg.teacher.checkpoint:
        teacher, _ = load_teacher(cfg.teacher.checkpoint, num_classes, device, ds)
        return teacher, {"checkpoint": str(cfg.teacher.checkpoint)}
    if cfg.teacher.checkpoints:
        members = [load_teacher(p, num_classes, device, ds)[0] for p in cfg.teacher.checkpoints]
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
        # with the lock held no other kdistill process writes here: temporary files are
        # leftovers of a killed run's atomic writes
        for tmp in remove_stale_temporaries(run_dir):
            log(f"removed {tmp}, an unfinished write of an earlier, killed run")
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_text(run_dir / "git.txt", git_revision() + "\n")
        yield run_dir


def _phase_budgets(cfg: RunConfig, start: float, teacher, student, image_shape, train_teacher: bool):
    """With ``cfg.budget``: a function phase -> seconds. The time left (less a reserve for
    the final evaluation and profiling) is split over the phases still to train in
    proportion to their compute per step, estimated from MACs (a training step costs about
    three forward passes; distillation adds one teacher forward), so that every phase
    trains for about the same number of steps. Without a budget: phase -> None."""
    if not cfg.budget:
        return lambda phase: None
    from kdistill.evaluate import count_macs

    mt, ms = count_macs(teacher, image_shape), count_macs(student(), image_shape)
    costs = {"teacher": 3 * mt} if train_teacher else {}
    costs.update(baseline=3 * ms, distilled=mt + 3 * ms)
    costs.update({f"generation{g}": 4 * ms for g in range(2, cfg.born_again + 2)})
    reserve = min(0.15 * cfg.budget, 30.0)  # evaluation, profiling and report of 3+ models
    remaining = list(costs)

    def budget(phase: str) -> float:
        left = budget_left(cfg, start, reserve)
        share = costs[phase] / sum(costs[p] for p in remaining)
        remaining.remove(phase)
        return left * share

    return budget


def deploy_student(cfg: RunConfig, student: torch.nn.Module, ds: ImageDataset, out_dir: Path) -> dict[str, Any] | None:
    """The distilled student as ONNX (verified) and int8 (``deploy`` config), measured; None
    when ONNX export is off, or automatic and the export extra is not installed."""
    from kdistill.export import EXPORT_HINT, deploy, onnx_available

    if cfg.deploy.onnx is False:
        return None
    if cfg.deploy.onnx is None and not onnx_available():
        log(f"skipping the ONNX export and int8 quantization of the student: {EXPORT_HINT}")
        return None
    log("exporting the distilled student to ONNX" + (f" and quantizing it to int8 ({cfg.deploy.quantization})" if cfg.deploy.quantization else ""))
    mean, std = ds.mean_std()
    device = next(student.parameters()).device
    try:
        return deploy(
            student, out_dir / "model.onnx", test_images=ds.test_images, test_labels=ds.test_labels, train_images=ds.train_images,
            mean=mean, std=std, classes=ds.classes, quantization=cfg.deploy.quantization,
            calibration_count=cfg.deploy.calibration_images, seed=cfg.seed,
        )
    finally:
        student.to(device)


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
    loaded = build_teacher(cfg, ds.num_classes, device, ds)
    if cfg.distill.teacher_cache and not loaded:
        raise ConfigError("distill.teacher_cache: a teacher cache needs a trained teacher (teacher.checkpoint or --teacher-checkpoint), not one trained in this run")
    if loaded:
        teacher, teacher_spec = loaded
    else:
        teacher_spec = model_spec(cfg.teacher.name, cfg.teacher.kwargs, ds.num_classes)
        torch.manual_seed(cfg.seed)
        teacher = create_model(**{**teacher_spec["kwargs"], "name": cfg.teacher.name})
    budgets = _phase_budgets(cfg, start, teacher, student, ds.image_shape, train_teacher=not loaded)
    if not loaded:
        phases["teacher"] = api.train(
            teacher, ds, config=train_config(cfg, "teacher", budgets("teacher")), data=cfg.data, device=device,
            run_dir=run_dir / "teacher", resume=resume, seed=cfg.seed, model_spec=teacher_spec, desc="teacher",
        )
    # 2. the student alone
    sspec = model_spec(cfg.student.name, cfg.student.kwargs, ds.num_classes)
    phases["baseline"] = api.train(
        student(), ds, config=train_config(cfg, "student", budgets("baseline")), data=cfg.data, device=device, run_dir=run_dir / "baseline",
        resume=resume, seed=cfg.seed, model_spec=sspec, desc="baseline",
    )
    # 3. the student distilled from the teacher
    d = cfg.distill
    phases["distilled"] = api.distill(
        teacher, student(), ds, methods=d.methods, alpha=d.alpha, ce_weight=d.ce_weight,
        config=train_config(cfg, "distill", budgets("distilled")), data=cfg.data, device=device, run_dir=run_dir / "distilled",
        resume=resume, seed=cfg.seed, model_spec=sspec, teacher_spec=teacher_spec, desc="distill", teacher_cache=d.teacher_cache,
    )
    # 3b. born-again generations: each student distilled from the previous generation
    previous = phases["distilled"].model
    for generation in range(2, cfg.born_again + 2):
        phases[f"generation{generation}"] = api.distill(
            previous, student(), ds, methods=d.methods, alpha=d.alpha, ce_weight=d.ce_weight,
            config=train_config(cfg, "distill", budgets(f"generation{generation}")),
            data=cfg.data, device=device, run_dir=run_dir / f"generation{generation}", resume=resume, seed=cfg.seed,
            model_spec=sspec, teacher_spec={"generation": generation - 1, **sspec}, desc=f"generation {generation}",
        )
        previous = phases[f"generation{generation}"].model

    # 4. evaluate all three on the test set, the same way
    log("evaluating and profiling the three models")
    mean, std = ds.mean_std()
    test = EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))
    models = {"teacher": teacher, **{name: r.model for name, r in phases.items() if name != "teacher"}}
    logits = {name: predict(m, test, desc=f"evaluate {name}") for name, m in models.items()}  # sharded over the ranks
    if not distributed.is_main():
        return run_dir  # rank 0 profiles and writes the report
    summary_models = {}
    for name, model in progress(models.items(), total=len(models), desc="profile (MACs, size, latency)"):
        entry: dict[str, Any] = {
            "model": _teacher_name(cfg) if name == "teacher" else cfg.student.name,
            "test": classification_metrics(logits[name], ds.test_labels, ds.classes),
            "profile": profile_model(model, ds.image_shape, max_seconds=profile_seconds(cfg)),
        }
        if name != "teacher":
            entry["agreement"] = agreement(logits[name], logits["teacher"])
        if name in phases:
            r = phases[name]
            entry.update(train_seconds=r.train_seconds, images_per_second=r.images_per_second, epochs=len(r.history))
            if r.budget:
                entry["budget"] = r.budget
        else:
            entry.update(train_seconds=0.0, images_per_second=0.0, from_checkpoint=teacher_spec)
        summary_models[name] = entry
        model.to(device)
        (run_dir / name).mkdir(exist_ok=True)
        saved = {"logits": logits[name].half(), "labels": ds.test_labels}
        atomic_write(run_dir / name / "test_logits.pt", lambda f, saved=saved: torch.save(saved, f))

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
    if cfg.budget:
        summary["budget_seconds"] = cfg.budget
    deployment = deploy_student(cfg, phases["distilled"].model, ds, run_dir / "distilled")
    if deployment:
        summary["deployment"] = deployment
    summary["headline"] = headline(summary)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    report = write_report(run_dir)
    h = summary["headline"]
    log(
        f"done in {summary['wall_seconds']:.0f} s: teacher {summary_models['teacher']['test']['top1']:.2f}%, "
        f"baseline {summary_models['baseline']['test']['top1']:.2f}%, distilled {summary_models['distilled']['test']['top1']:.2f}% "
        f"({h['gain_top1']:+.2f} points at {h['params_fraction'] * 100:.1f}% of the teacher's parameters); report: {report}"
    )
    return run_dir

