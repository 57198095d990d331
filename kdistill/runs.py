"""What every command's run starts from and leaves behind, shared by the study, the
single-model commands and the sweep: the run directory (locked, its config and revision
recorded), the data set, models and teachers, the test set, time budgets, and the summary
of a single-model run.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import importlib.metadata
import inspect
import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kdistill import api, distributed
from kdistill.budget import BudgetTooSmall, PhaseCost, format_seconds
from kdistill.checkpoint import load_checkpoint, load_model
from kdistill.config import DataConfig, ModelConfig, RunConfig, TrainConfig, dump_config
from kdistill.data.dataset import BUNDLED, DOWNLOADABLE, ImageDataset, load_dataset
from kdistill.data.loader import EvalData, Normalize
from kdistill.engine import Result, autocast_for, predict, select_device
from kdistill.errors import CheckpointError, ConfigError
from kdistill.evaluate import agreement, profile_model
from kdistill.files import atomic_write_text, remove_stale_temporaries
from kdistill.methods import check_run
from kdistill.models import MODELS, build, source_of
from kdistill.models.ensemble import TeacherEnsemble
from kdistill.models.features import attach_stages
from kdistill.models.inputs import adapter_from, attach
from kdistill.models.transfer import freeze_backbone
from kdistill.progress import log

LOCK_NAME = ".lock"


@contextlib.contextmanager
def job(cfg: RunConfig) -> Iterator[None]:
    """A command inside the torchrun job's process group, if torchrun started it."""
    with distributed.process_group(select_device(cfg.device), cfg.distributed.backend, cfg.distributed.timeout_s):
        yield


@contextlib.contextmanager
def open_run_dir(cfg: RunConfig, resume: bool, run_dir: Path | None = None, *, kind: str) -> Iterator[Path]:
    """Create (or, with ``resume``, reopen) the run directory of a ``kind`` run (one of
    KINDS), record the resolved config, git revision and what the run is (``run.json``), and
    hold an exclusive lock on it while the run lasts, so that two runs never write into the
    same directory. The lock (on ``.lock``, which names the holder's pid) is released when
    the process ends, even when it is killed; a run that ends removes the file.

    A resume that would change what the run is (another kind of command, or another value of
    an identity key: see :func:`run_identity`) is refused before anything is written. A run
    that fails before writing anything but these bookkeeping files leaves no directory
    behind, unless the directory existed before. In a torchrun job rank 0 does all this;
    every rank gets its errors."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {KINDS}")
    run_dir = Path(run_dir) if run_dir else cfg.output_dir / cfg.name
    stack = contextlib.ExitStack()
    distributed.on_main(lambda: stack.enter_context(_locked_run_dir(cfg, resume, run_dir, kind)))
    with stack:
        yield run_dir


@contextlib.contextmanager
def _locked_run_dir(cfg: RunConfig, resume: bool, run_dir: Path, kind: str) -> Iterator[Path]:
    if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not resume:
        raise ConfigError(
            f"run directory {run_dir} already exists; pass --resume to continue it or choose another --name"
        )
    created = _topmost_missing(run_dir)  # the folder this call creates (run_dir or a parent), if any
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
    lock = _lock(run_dir)
    try:
        # with the lock held no other kdistill process writes here: temporary files are
        # leftovers of a killed run's atomic writes
        for tmp in remove_stale_temporaries(run_dir):
            log(f"removed {tmp}, an unfinished write of an earlier, killed run")
        identity = run_identity(cfg, kind)
        record = _check_record(run_dir, kind, identity) if resume else {"kind": kind, "identity": identity}
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        atomic_write_text(run_dir / "git.txt", git_revision() + "\n")
        if record is not None:
            atomic_write_text(run_dir / RUN_FILE, json.dumps({"format": RUN_FORMAT, **record}, indent=2) + "\n")
        yield run_dir
    except BaseException:
        if created is not None:
            _remove_if_unused(run_dir, created)
        raise
    finally:
        with lock:  # the lock file goes while the lock is held; closing it releases the lock
            if _is_open_file(lock, run_dir / LOCK_NAME):
                (run_dir / LOCK_NAME).unlink(missing_ok=True)


def _lock(run_dir: Path):
    """The run directory's lock file, open and exclusively locked (``flock``: the kernel
    releases it when the process ends, however it ends, so a killed run's leftover file
    locks nothing). A run removes the file as it ends, so a lock taken on a file that has
    meanwhile been removed (or replaced) is a lock on nothing: take it again."""
    path = run_dir / LOCK_NAME
    for _ in range(100):
        try:
            lock = open(path, "a+")
        except OSError as e:
            raise ConfigError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        try:
            _acquire(lock, run_dir)
        except BaseException:
            lock.close()
            raise
        if _is_open_file(lock, path):
            return lock
        lock.close()  # its holder finished and removed it between our open and our lock
    raise ConfigError(
        f"run directory {run_dir}: cannot lock {path}, it keeps being removed; is another program deleting it?"
    )


def _is_open_file(f, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``f``."""
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(f.fileno())
    return (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino)


def _acquire(lock, run_dir: Path) -> None:
    """Take the run directory's lock (or say who holds it) and write our pid into it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise ConfigError(
            f"run directory {run_dir} is in use by {holder}; wait for it to finish or choose another --name"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"kdistill pid {os.getpid()}\n")
    lock.flush()


def _topmost_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet; None if ``path`` exists."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _remove_if_unused(run_dir: Path, created: Path) -> None:
    """After a failed start: remove the run directory this run created (with the empty
    parents it created for it) when it holds nothing but the run's own bookkeeping files and
    empty folders (a phase's, made before its first epoch). Anything else (a checkpoint,
    metrics, a teacher cache) is kept. The lock file goes last, so that no other process can
    take the directory while its files are being removed."""
    try:
        entries = list(run_dir.iterdir())
        if any(not (p.name in BOOKKEEPING and p.is_file() or p.is_dir() and _empty_tree(p)) for p in entries):
            return
        for p in sorted(entries, key=lambda p: p.name == LOCK_NAME):  # the lock file last
            if p.is_dir():
                for folder in sorted((p, *p.rglob("*")), key=lambda f: -len(f.parts)):
                    folder.rmdir()
            else:
                p.unlink(missing_ok=True)
        folder = run_dir
        while True:
            folder.rmdir()  # only ever an empty folder
            if folder == created or folder.parent == folder:
                return
            folder = folder.parent
    except OSError:
        return  # a folder someone else put something in meanwhile: theirs to keep


def _empty_tree(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but (possibly nested) empty folders."""
    return all(p.is_dir() for p in folder.rglob("*"))


# ---------------------------------------------------------------- what a run directory is

RUN_FILE = "run.json"
RUN_FORMAT = "kdistill-run/1"
# the commands that own a run directory
KINDS = ("run", "train", "distill", "mutual", "sweep")
# the files a run directory gets before any work: a run that failed with nothing else in it did nothing
BOOKKEEPING = (LOCK_NAME, "config.yaml", "git.txt", RUN_FILE)


def default_run_name(cfg: RunConfig, kind: str) -> str:
    """The run name of a command given no ``--name``: the config's name for ``run``, and for
    the other commands one that says what they train, so that they never collide with the
    study's directory or each other's: ``<name>-train-<model>``, ``<name>-distill-<student>``,
    ``<name>-mutual-<model>-<model>...``, ``<name>-sweep``, ``<name>-seeds``."""
    if kind == "train":
        return f"{cfg.name}-train-{cfg.teacher.name}"
    if kind == "distill":
        return f"{cfg.name}-distill-{cfg.student.name}"
    if kind == "mutual":
        return f"{cfg.name}-mutual-" + "-".join(cfg.mutual.models)
    if kind in ("sweep", "seeds"):  # seeds: `run --seeds`, a folder of one run per seed
        return f"{cfg.name}-{kind}"
    return cfg.name


def run_identity(cfg: RunConfig, kind: str) -> dict[str, Any]:
    """What a ``kind`` run is, by config key: the settings its results depend on that its
    checkpoints do not check themselves (the engine refuses a resume with other training
    settings): the data and the settings that change its images, the seed, the models and
    teachers, the distillation settings, the born-again or mutual-learning settings. Not:
    where files are (data.data_dir, output_dir, the teacher cache's path), the device,
    logging. Paths are absolute, so that a resume from another folder compares equal."""
    d = cfg.data
    identity: dict[str, Any] = {
        "data.dataset": _dataset_identity(d.dataset),
        "data.image_size": d.image_size,
        "data.val_size": d.val_size,
        "data.split": d.split.model_dump() if d.split else None,
        "data.augment": d.augment,
        "data.crop_padding": d.crop_padding,
        "data.flip": d.flip,
        "seed": cfg.seed,
    }
    # the image-size settings, where not their defaults (a run directory made before they
    # existed resumes as it was)
    defaults = DataConfig()
    for key in ("resize", "augmentation", "train_size", "crop_scale", "crop_ratio"):
        if getattr(d, key) != getattr(defaults, key):
            identity[f"data.{key}"] = getattr(d, key)
    if kind == "train":
        identity.update({"teacher.name": cfg.teacher.name, "teacher.kwargs": cfg.teacher.kwargs})
        identity.update(_source_identity(cfg.teacher, "teacher"))
    if kind in ("run", "distill", "sweep"):
        identity.update(_teacher_identity(cfg))
    if kind in ("run", "distill"):
        identity.update({"student.name": cfg.student.name, "student.kwargs": cfg.student.kwargs})
        identity.update(_source_identity(cfg.student, "student"))
        identity.update(
            {
                "distill.methods": {name: o.model_dump(mode="json") for name, o in cfg.distill.method_options.items()},
                "distill.alpha": cfg.distill.alpha,
                "distill.ce_weight": cfg.distill.ce_weight,
            }
        )
    if kind == "run":
        identity["born_again"] = cfg.born_again
    if kind == "mutual":
        identity.update(
            {
                "mutual.models": cfg.mutual.models,
                "mutual.temperature": cfg.mutual.temperature,
                "mutual.weight": cfg.mutual.weight,
            }
        )
    return json.loads(json.dumps(identity))  # as run.json will hold it


def _dataset_identity(dataset: str) -> str:
    return dataset if dataset in (*BUNDLED, *DOWNLOADABLE) else _absolute(dataset)


def _absolute(path: str | Path) -> str:
    return str(Path(path).expanduser().resolve())


def _teacher_identity(cfg: RunConfig) -> dict[str, Any]:
    t = cfg.teacher
    if t.checkpoints:
        return {"teacher.checkpoints": [_absolute(p) for p in t.checkpoints], "teacher.weights": t.weights}
    if t.checkpoint:
        return {"teacher.checkpoint": _absolute(t.checkpoint)}
    return {"teacher.name": t.name, "teacher.kwargs": t.kwargs, **_source_identity(t, "teacher")}


def _source_identity(model: ModelConfig, role: str) -> dict[str, Any]:
    """The source options set (none: the identity of a run from before they existed)."""
    found: dict[str, Any] = {}
    if model.pretrained:
        found[f"{role}.pretrained"] = True
    if model.weights_file:
        found[f"{role}.weights_file"] = _absolute(model.weights_file)
    if getattr(model, "trained", False):
        found[f"{role}.trained"] = True
    for key in ("input_size", "mean", "std", "features"):
        if getattr(model, key) is not None:
            found[f"{role}.{key}"] = getattr(model, key)
    if getattr(model, "finetune", None) is not None:
        found[f"{role}.finetune"] = model.finetune.model_dump()
    return found


def _check_record(run_dir: Path, kind: str, identity: dict[str, Any]) -> dict[str, Any] | None:
    """For a resume: refuse one that would change what the run directory holds; the record
    to (re)write, or None for a directory of an older kdistill (it has results but no
    run.json: resumed as before, its kind unknown)."""
    path = run_dir / RUN_FILE
    if not path.exists():
        fresh = not any(p.name not in (LOCK_NAME, "config.yaml", "git.txt") for p in run_dir.iterdir())
        return {"kind": kind, "identity": identity} if fresh else None
    try:
        record = json.loads(path.read_text())
        old_kind, old = record["kind"], record["identity"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"cannot resume {run_dir}: {path} is unreadable ({e}); it records what the run is: restore it, or choose another --name"
        ) from None
    if old_kind != kind:
        raise ConfigError(
            f"cannot resume {run_dir}: it was made by kdistill {old_kind}, not by kdistill {kind}; "
            f"continue it with kdistill {old_kind} --resume, or choose another --name"
        )
    changes = _changes(old, identity)
    if changes:
        raise ConfigError(
            f"cannot resume {run_dir}: {', '.join(changes)}; a resume continues the same run: use the same settings or another --name"
        )
    return record


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key changed from A to B' for every key whose value differs; nested mappings with
    the same keys (one method's options) name the inner key."""
    out = []
    for key in dict.fromkeys([*old, *new]):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
            out += _changes(a, b, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key} changed from {_show(a)} to {_show(b)}")
    return out


def _show(value: Any) -> str:
    """A value as YAML flow style would write it: {kd: {temperature: 2.0}}, [a, b], none."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None or isinstance(value, bool):
        return {None: "none", True: "true", False: "false"}[value]
    return str(value)


def cache_teacher(
    cfg: RunConfig, teacher, ds: ImageDataset, device, path: Path, top_k: int = 0, dtype: str = "float16"
):
    """The teacher's logits on every augmented view of the config's distillation epochs,
    written to ``path`` (see :func:`kdistill.api.cache_teacher`)."""
    tcfg = cfg.train_for("distill")
    return api.cache_teacher(
        teacher,
        ds,
        epochs=tcfg.epochs,
        path=path,
        data=cfg.data,
        seed=cfg.seed,
        device=device,
        batch_size=tcfg.eval_batch_size,
        channels_last=tcfg.channels_last,
        amp=tcfg.amp,
        top_k=top_k,
        dtype=dtype,
        view_period=tcfg.view_period,
    )


def check_distillation(cfg: RunConfig) -> None:
    """Refuse, before any work, distillation settings that cannot take effect in the
    distillation phase (e.g. a DKD warm-up longer than the phase). A budget run's epochs are
    planned as it goes, so it is not checked."""
    distill = cfg.train_for("distill")
    if cfg.budget or distill.budget:
        return
    problems = check_run(cfg.distill.method_options, distill.epochs)
    if problems:
        raise ConfigError(
            f"distill.methods.{problems[0]} (the distillation phase: distill.train.epochs or train.epochs)"
        )


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        )
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"kdistill {kdistill_version()} (not a git checkout)"


def kdistill_version() -> str:
    """The installed package's version (``kdistill --version``)."""
    try:
        return importlib.metadata.version("kdistill")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


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
        raise ConfigError(
            f"budget: {cfg.budget:.0f} s were spent before training could start ({spent:.0f} s of loading); give a larger --budget"
        )
    return left


@contextlib.contextmanager
def whole_budget(cfg: RunConfig) -> Iterator[None]:
    """For a command whose one training run gets all of ``--budget`` that loading left: a
    budget too small for its first step and an evaluation is restated as the ``--budget``
    it would take (loading and the final evaluation keep their share)."""
    try:
        yield
    except BudgetTooSmall as e:
        if not cfg.budget or e.needed is None:
            raise
        enough = math.ceil((cfg.budget - e.seconds + e.needed) / (1 - REPORT_RESERVE_FRACTION))
        raise ConfigError(
            f"budget: --budget {format_seconds(cfg.budget)} leaves {format_seconds(e.seconds)} of training time for {e.desc}, which cannot "
            f"hold one training step and the evaluation after it ({e.detail}); give --budget {enough}s or more"
        ) from None


def train_config(cfg: RunConfig, phase: str, budget: float | None = None, max_steps: int | None = None) -> TrainConfig:
    """The phase's train settings, with a time budget (seconds) and a step cap when given."""
    tcfg = cfg.train_for(phase)
    update = {k: v for k, v in (("budget", budget), ("max_steps", max_steps)) if v}
    return tcfg.model_copy(update=update) if update else tcfg


# timed steps per model when a budgeted study measures what its phases cost (after one warm-up step)
MEASURE_STEPS = 3


def measure_phase_costs(
    cfg: RunConfig,
    ds: ImageDataset,
    device: torch.device,
    teacher: torch.nn.Module,
    student: torch.nn.Module,
    phases: list[str],
    live_teacher: bool,
) -> list[PhaseCost]:
    """What a step of each of ``phases`` (teacher, baseline, distilled, generationN) costs,
    timed on a few steps of copies of the models on a random batch of the phase's size (the
    models themselves are left untouched): a training step of the model, plus for a
    distillation phase the teacher's forward pass (``live_teacher``; a teacher cache costs
    a lookup, next to nothing) or the previous generation's. An epoch-end evaluation is
    taken to cost a third of a training step per batch (a forward pass without backward)."""
    world = distributed.world_size()
    eval_images = len(ds.test_labels) + (len(ds.val_labels) if ds.val_labels is not None else 0)
    settings = {"teacher": "teacher", "baseline": "student"}
    shape = input_shape(ds, cfg.data.train_size)  # what the models take: the training size
    timings: dict[tuple, float] = {}

    def timed(model: torch.nn.Module, tcfg: TrainConfig, train: bool) -> float:
        key = (id(model), tcfg.batch_size, tcfg.channels_last, tcfg.amp, train)
        if key not in timings:
            timings[key] = _step_seconds(model, tcfg, shape, device, max(1, tcfg.batch_size // world), train)
        return timings[key]

    costs = []
    for phase in phases:
        tcfg = cfg.train_for(settings.get(phase, "distill"))
        model = teacher if phase == "teacher" else student
        step = timed(model, tcfg, train=True)
        if phase == "distilled" and live_teacher:
            step += timed(teacher, tcfg, train=False)
        elif phase.startswith("generation"):
            step += timed(student, tcfg, train=False)
        steps_per_epoch = max(1, len(ds.train_labels) // tcfg.batch_size)
        evaluation = -(-eval_images // tcfg.batch_size) * timed(model, tcfg, train=True) / 3
        costs.append(PhaseCost(phase, step, evaluation, steps_per_epoch))
    return costs


def _step_seconds(
    model: torch.nn.Module, tcfg: TrainConfig, shape: tuple, device: torch.device, batch: int, train: bool
) -> float:
    """Seconds of one training step (forward, cross-entropy, backward, SGD step) of a copy
    of ``model`` on a random batch, or with ``train`` False of one forward pass in eval mode."""
    model = copy.deepcopy(model).to(device)
    memory = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory)
    model.train(train)
    x = torch.randn(batch, *shape, device=device).contiguous(memory_format=memory)  # (B, C, H, W)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.set_grad_enabled(train), autocast_for(device, tcfg.amp):
            z = model(x)
        if train:
            torch.nn.functional.cross_entropy(z.float(), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, caches, kernel selection
    sync()
    t0 = time.perf_counter()
    for _ in range(MEASURE_STEPS):
        step()
    sync()
    return (time.perf_counter() - t0) / MEASURE_STEPS


def load_data(cfg: RunConfig) -> ImageDataset:
    """The run's data set; in a torchrun job one process per machine downloads and decodes
    it first, the others then read its cache."""
    d = cfg.data
    return distributed.local_main_first(
        lambda: load_dataset(
            d.dataset, d.image_size, d.data_dir, d.download, d.val_size, cfg.seed, resize=d.resize, split=_split(d)
        )
    )


def _split(d) -> dict | None:
    return d.split.model_dump() if d.split else None


def model_spec(
    name: str, kwargs: dict, num_classes: int, pretrained: bool = False, weights_file: Path | None = None
) -> dict[str, Any]:
    """What a checkpoint records to rebuild a model: its name and arguments, and for a
    source (``timm:...``, ``hf:...``, a file, a factory) or loaded weights, where it came
    from (``new_model`` adds what the source itself records: a file's sha256, a config)."""
    spec: dict[str, Any] = {"name": name, "kwargs": {**kwargs, "num_classes": num_classes}}
    if source_of(name) or pretrained or weights_file:
        spec["source"] = {"pretrained": pretrained, "weights_file": str(weights_file) if weights_file else None}
    return spec


def spec_for(
    model: ModelConfig, num_classes: int, ds: ImageDataset | None = None, data: DataConfig | None = None
) -> dict[str, Any]:
    """The spec of the config's teacher or student (a teacher to fine-tune takes weights
    for another label set with a new head). With the data set ``ds`` (and its
    ``data`` settings), the model's own input too: :func:`new_model` resolves it (what the
    library says of pretrained weights) and attaches it (:mod:`kdistill.models.inputs`).
    A zoo model built for a fixed size (``image_size``: the seed CNNs' linear layer) is
    built for the size it will see."""
    kwargs = dict(model.kwargs)
    if ds is not None:
        data = data or DataConfig()
        view = data.train_size or ds.image_shape[-1]
        size = model.input_size or view
        if model.name in MODELS and "image_size" not in kwargs:
            default = inspect.signature(MODELS[model.name]).parameters.get("image_size")
            if default is not None and default.default != size:
                kwargs["image_size"] = size
    spec = model_spec(model.name, kwargs, num_classes, model.pretrained, model.weights_file)
    if getattr(model, "finetune", None) is not None and "source" in spec:
        spec["source"]["finetune"] = True
    if model.features is not None:
        spec["features"] = list(model.features)
    if ds is not None:
        mean, std = ds.mean_std()
        spec["input_request"] = {
            "size": model.input_size,
            "mean": model.mean,
            "std": model.std,
            "library": model.pretrained,  # what the library says its pretrained weights expect
            "from_size": view,
            "from_mean": list(mean),
            "from_std": list(std),
        }
    return spec


def teacher_to_train(cfg: RunConfig, spec: dict[str, Any]) -> torch.nn.Module:
    """The teacher the teacher phase trains: built from ``spec``; with ``teacher.finetune``
    its backbone frozen when asked (a new head for the run's classes it has already)."""
    teacher = new_model(spec, cfg.seed)
    finetune = cfg.teacher.finetune
    if finetune is not None and finetune.freeze_backbone:
        freeze_backbone(teacher, f"teacher {cfg.teacher.name!r}")
    return teacher


def resolve_input(request: dict[str, Any], model: torch.nn.Module, name: str) -> dict[str, Any] | None:
    """The input record of a model (size, mean, std and the data's view it is adapted from),
    from its config and, with pretrained weights, its library; None when it takes the view."""
    size, mean, std = request["size"], request["mean"], request["std"]
    source = source_of(name)
    if request.get("library") and source is not None:
        said = source.input_config(model)
        if size is None and said.get("input_size"):
            size = int(said["input_size"][-1])
        if mean is None and said.get("mean") is not None and said.get("std") is not None:
            mean, std = list(said["mean"]), list(said["std"])
    same_size = size is None or size == request["from_size"]
    same_norm = mean is None or (list(mean), list(std)) == (request["from_mean"], request["from_std"])
    if same_size and same_norm:
        return None
    return {
        "size": None if same_size else size,
        "mean": None if same_norm else list(mean),
        "std": None if same_norm else list(std),
        "from_mean": request["from_mean"],
        "from_std": request["from_std"],
    }


def new_model(spec: dict[str, Any], seed: int) -> torch.nn.Module:
    """A freshly built model (initialised from ``seed``: the same seed gives the same
    weights, pretrained or loaded weights aside); the source's record joins the spec."""
    torch.manual_seed(seed)
    kwargs = dict(spec["kwargs"])
    source = spec.get("source") or {}
    model, record = build(
        spec["name"],
        kwargs.pop("num_classes"),
        kwargs,
        source.get("pretrained", False),
        source.get("weights_file"),
        new_head=source.get("finetune", False),
    )
    if record:
        spec["source"] = {**source, **record}
    request = spec.pop("input_request", None)
    if request is not None:
        spec["input"] = resolve_input(request, model, spec["name"])
        if spec["input"] is None:
            del spec["input"]
    adapter = adapter_from(spec.get("input"))
    if adapter is not None:
        log(f"{spec['name']}: takes {adapter.describe()}, adapted from the data's view on the device")
    return attach_stages(attach(model, adapter, f"model {spec['name']!r}"), spec)


def test_set(
    ds: ImageDataset,
    device: torch.device,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    size: int | None = None,
) -> EvalData:
    """The data set's test split, batched for evaluation on ``device``, normalised with
    ``mean`` and ``std`` (default: the data set's own), centre-cropped to ``size`` (the
    training size, ``data.train_size``; default: the whole image)."""
    mean, std = mean or ds.mean_std()[0], std or ds.mean_std()[1]
    return EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False), size=size)


def load_teacher(
    path: Path, num_classes: int, device: torch.device, ds: ImageDataset | None = None
) -> tuple[torch.nn.Module, dict]:
    """A trained teacher, checked against the data set (with ``ds``: warn when it was
    trained on the run's validation images)."""
    model, state = load_model(path, map_location="cpu")
    classes = state.get("data", {}).get("classes")
    got = state["model_spec"]["kwargs"].get("num_classes")
    if got is not None and got != num_classes:
        raise CheckpointError(f"teacher checkpoint {path} predicts {got} classes but the data set has {num_classes}")
    if classes is not None and len(classes) != num_classes:
        raise CheckpointError(
            f"teacher checkpoint {path} was trained on {len(classes)} classes but the data set has {num_classes}"
        )
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
    return data.get("val_split") != ds.val_split or (data.get("split") or None) != ds.split


def teacher_split_differs(state: dict, ds: ImageDataset) -> bool:
    """Whether a teacher checkpoint was trained on another split kdistill made of this run's
    source data (other fractions, seed or files): then it has seen some of this run's
    validation and test images."""
    data = state.get("data") or {}
    if ds.split is None or data.get("checksum") != ds.checksum:
        return False
    return (data.get("split") or {}).get("fingerprint") != ds.split["fingerprint"]


def _split_words(split: dict | None) -> str:
    if not split:
        return "no split"
    return f"val {split.get('val')}, test {split.get('test')}, seed {split.get('seed')} ({split.get('fingerprint')})"


def warn_if_teacher_saw_validation(path: Path, state: dict, ds: ImageDataset) -> None:
    if teacher_split_differs(state, ds):
        log(
            f"warning: teacher checkpoint {path} was trained on another split of this data set "
            f"({_split_words((state.get('data') or {}).get('split'))}; this run: {_split_words(ds.split)}), so it has "
            "seen some of this run's validation and test images: the student's accuracy on them will be optimistic. "
            "Use the teacher's data.split."
        )
    elif teacher_saw_validation(state, ds):
        theirs = (state.get("data") or {}).get("val_split")
        held = (
            f"held out {theirs['size']} images with seed {theirs['seed']}"
            if theirs
            else "held out no validation images"
        )
        log(
            f"warning: teacher checkpoint {path} {held}, so it was trained on some of this run's "
            f"{ds.val_split['size']} validation images (seed {ds.val_split['seed']}): the distilled student's "
            "validation accuracy will be optimistic. For tuning, train the teacher with the same data.val_size and seed."
        )


def build_teacher(
    cfg: RunConfig, num_classes: int, device: torch.device, ds: ImageDataset | None = None
) -> tuple[torch.nn.Module, dict] | None:
    """The teacher from ``teacher.checkpoint``, the ensemble of ``teacher.checkpoints``, or
    the model ``teacher.name`` names when ``teacher.trained`` says it is trained already;
    None when the teacher must be trained in this run. With ``ds``, warn when a teacher
    was trained on its validation images."""
    if cfg.teacher.checkpoint:
        teacher, _ = load_teacher(cfg.teacher.checkpoint, num_classes, device, ds)
        return teacher, {"checkpoint": str(cfg.teacher.checkpoint)}
    if cfg.teacher.checkpoints:
        members = [load_teacher(p, num_classes, device, ds)[0] for p in cfg.teacher.checkpoints]
        ensemble = TeacherEnsemble(members, cfg.teacher.weights, cfg.distill.temperature).to(device)
        return ensemble, {"checkpoints": [str(p) for p in cfg.teacher.checkpoints], "weights": cfg.teacher.weights}
    if cfg.teacher.trained:
        spec = spec_for(cfg.teacher, num_classes, ds, cfg.data)
        teacher = new_model(spec, cfg.seed)
        if spec.get("source", {}).get("new_head") and not cfg.teacher.weights_file:
            raise ConfigError(
                f"teacher.trained: {cfg.teacher.name!r} was pretrained for other classes than the data's {num_classes}: its "
                "new head is untrained; drop trained to fine-tune it in the teacher phase, or give weights_file"
            )
        return teacher.to(device), spec
    return None


def input_shape(ds: ImageDataset, size: int | None = None) -> tuple[int, ...]:
    """What a model trained on ``ds`` at training size ``size`` (``data.train_size``) takes."""
    return (ds.image_shape[0], size, size) if size else ds.image_shape


def write_single_summary(
    run_dir: Path,
    model_name: str,
    result: Result,
    ds: ImageDataset,
    teacher=None,
    profile_max_seconds: float = 5.0,
    size: int | None = None,
) -> None:
    """summary.json of a ``kdistill train`` or ``distill`` run: test metrics, cost, and
    agreement with the teacher for a distillation; ``size``: the training size
    (``data.train_size``). All ranks call it; rank 0 writes."""
    teacher_logits = None
    if teacher is not None and result.test_logits is not None:
        device = next(teacher.parameters()).device
        teacher_logits = predict(teacher, test_set(ds, device, size=size))  # sharded over the ranks
    if not distributed.is_main():
        return
    summary: dict[str, Any] = {
        "model": model_name,
        "test": result.metrics,
        "profile": profile_model(result.model, input_shape(ds, size), max_seconds=profile_max_seconds),
        "train_seconds": result.train_seconds,
        "images_per_second": result.images_per_second,
        "epochs": len(result.history),
    }
    if result.budget:
        summary["budget"] = result.budget
    summary.update(teacher_source(result))
    if teacher_logits is not None:
        summary["agreement"] = agreement(result.test_logits, teacher_logits)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    m = result.metrics
    beside = [f"{what} {m[k]:.2f}%" for k, what in (("top1_tta", "flip TTA"), ("top1_raw", "without EMA")) if k in m]
    shown = f" ({', '.join(beside)})" if beside else ""
    log(
        f"{model_name}: test top-1 {m.get('top1', float('nan')):.2f}%{shown} "
        f"after {len(result.history)} epochs; outputs in {run_dir}"
    )


def teacher_source(result: Result) -> dict[str, Any]:
    """Where a distilled student's teacher logits came from, for its summary: a teacher cache
    (``teacher_cache``: path, epochs, build seconds: built once for every run that reads it,
    not in this run's training time) or the teacher run once over the repeated views of
    ``train.view_period`` (``teacher_views``: period, build seconds: in this run's training
    time); empty for a live teacher."""
    if result.checkpoint is None or not result.checkpoint.is_file():
        return {}
    state = load_checkpoint(result.checkpoint)
    source = {}
    if state.get("teacher_cache"):
        source["teacher_cache"] = {k: state["teacher_cache"].get(k) for k in ("path", "epochs", "build_seconds")}
    if state.get("teacher_views"):
        source["teacher_views"] = {k: state["teacher_views"].get(k) for k in ("period", "build_seconds")}
    return source
