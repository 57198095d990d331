"""What every command's run starts from and leaves behind, shared by the study, the
single-model commands and the sweep: the run directory (locked, its config and revision
recorded), the data set, models and teachers, the test set, time budgets, and the summary
of a single-model run.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdistill import distributed
from kdistill.checkpoint import load_model
from kdistill.config import RunConfig, TrainConfig, dump_config
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.data.loader import EvalData, Normalize
from kdistill.engine import Result, predict, select_device
from kdistill.errors import CheckpointError, ConfigError
from kdistill.evaluate import agreement, profile_model
from kdistill.files import atomic_write_text, remove_stale_temporaries
from kdistill.models import create_model
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.progress import log

LOCK_NAME = ".lock"


@contextlib.contextmanager
def job(cfg: RunConfig) -> Iterator[None]:
    """A command inside the torchrun job's process group, if torchrun started it."""
    with distributed.process_group(select_device(cfg.device), cfg.distributed.backend, cfg.distributed.timeout_s):
        yield


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


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        version = importlib.metadata.version("kdistill")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return f"kdistill {version} (not a git checkout)"


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
    """What a checkpoint records to rebuild a registry model: its name and arguments."""
    return {"name": name, "kwargs": {**kwargs, "num_classes": num_classes}}


def new_model(spec: dict[str, Any], seed: int) -> torch.nn.Module:
    """A freshly initialised registry model; the same ``seed`` gives the same weights."""
    torch.manual_seed(seed)
    return create_model(spec["name"], **spec["kwargs"])


def test_set(ds: ImageDataset, device: torch.device, mean: list[float] | None = None, std: list[float] | None = None) -> EvalData:
    """The data set's test split, batched for evaluation on ``device``, normalised with
    ``mean`` and ``std`` (default: the data set's own)."""
    mean, std = mean or ds.mean_std()[0], std or ds.mean_std()[1]
    return EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))


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
    accuracy is then optimistic (measured in benchmarks/results/design_notes.md)."""
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


def write_single_summary(run_dir: Path, model_name: str, result: Result, ds: ImageDataset, teacher=None, profile_max_seconds: float = 5.0) -> None:
    """summary.json of a ``kdistill train`` or ``distill`` run: test metrics, cost, and
    agreement with the teacher for a distillation. All ranks call it; rank 0 writes."""
    teacher_logits = None
    if teacher is not None and result.test_logits is not None:
        teacher_logits = predict(teacher, test_set(ds, next(teacher.parameters()).device))  # sharded over the ranks
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
