"""Sweeps: many students against one teacher, sharing one teacher cache (``kdistill sweep``).

The grid is the product of students x methods x temperatures x alphas. The teacher's
logits are computed once (``kdistill cache-teacher``, or here at the start into
``<run>/teacher_cache.pt``) and every logit-method configuration reads them; configurations
with feature methods (which need the live teacher's stages) run the teacher live. Each
configuration trains in its own folder with its checkpoint, metrics and ``summary.json``;
``--resume`` skips finished ones. The run directory gets ``leaderboard.md``,
``leaderboard.html``, ``leaderboard.csv`` and ``accuracy_vs_cost.png``
(:mod:`kdistill.report.leaderboard`).

``--jobs N`` trains N configurations at once, each in its own worker process: on a CPU
each with its share of the cores (a small student uses one core better than two; measured
in benchmarks/results/design_notes.md), on several GPUs one GPU each.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdistill import runs
from kdistill.config import DistillConfig, RunConfig, trainable_name
from kdistill.configbase import format_errors
from kdistill.engine import GracefulInterrupt, predict, select_device
from kdistill.errors import ConfigError, KDistillError
from kdistill.evaluate import agreement, count_macs
from kdistill.files import atomic_write_text
from kdistill.methods import METHODS, needs_features, set_option, taking
from kdistill.models import check_name, count_parameters
from kdistill.progress import log, plain_progress_only
from kdistill.report.leaderboard import write_leaderboard
from kdistill.stats import pack_outcomes
from kdistill.study import Phases
from kdistill.teacher_cache import TeacherCache


@dataclass(frozen=True)
class SweepPoint:
    student: str
    method: str  # "kd" or "kd+dist"
    temperature: float | None  # None: no method of the point has a temperature
    alpha: float

    @property
    def name(self) -> str:
        t = f"-T{self.temperature:g}" if self.temperature is not None else ""
        student = re.sub(r"[^\w.+-]+", "_", self.student)  # a folder name: torchscript:dir/m.pt -> torchscript_dir_m.pt
        return f"{student}-{self.method}{t}-a{self.alpha:g}"

    @property
    def methods(self) -> dict[str, dict[str, Any]]:
        plain = {m: {} for m in self.method.split("+")}
        return plain if self.temperature is None else set_option(plain, "temperature", self.temperature)

    @property
    def needs_features(self) -> bool:
        return needs_features(self.method.split("+"))


def expand_grid(
    students: list[str], methods: list[str], temperatures: list[float], alphas: list[float]
) -> list[SweepPoint]:
    """Every combination, once: a method without a temperature does not multiply by T."""
    for name in students:
        try:
            trainable_name(check_name(name), "a student")
        except ValueError as e:
            raise ConfigError(f"sweep: student {e}") from None
    points: dict[str, SweepPoint] = {}
    for student, method, t, alpha in itertools.product(students, methods, temperatures, alphas):
        parts = [m.strip() for m in method.split("+")]
        for m in parts:
            if m not in METHODS:
                raise ConfigError(f"sweep: unknown method {m!r}; expected one of: {', '.join(sorted(METHODS))}")
        point = SweepPoint(student, "+".join(parts), float(t) if taking("temperature", parts) else None, float(alpha))
        try:
            DistillConfig(alpha=point.alpha, methods=point.methods)
        except Exception as e:
            raise ConfigError(f"sweep {point.name}: {format_errors(e) if hasattr(e, 'errors') else e}") from None
        points.setdefault(point.name, point)
    return list(points.values())


MAX_AUTO_JOBS = 4  # --jobs auto on a CPU: at most this many configurations at once


def check_jobs(jobs: int | str) -> None:
    if jobs != "auto" and (not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1):
        raise ConfigError(f"sweep: --jobs {jobs!r}: expected a whole number >= 1 or 'auto'")


def resolve_jobs(jobs: int | str, device: torch.device, pending: int) -> int:
    """How many configurations to train at once: ``jobs``, or with "auto" one per GPU, or
    on a CPU one per core (at most MAX_AUTO_JOBS); never more than there are to train."""
    check_jobs(jobs)
    if jobs == "auto":
        if device.type == "cuda":
            jobs = torch.cuda.device_count() if device.index is None else 1
        else:
            jobs = min(torch.get_num_threads(), MAX_AUTO_JOBS)
    return max(1, min(jobs, pending))


@dataclass
class _Shared:
    """What every configuration of a sweep trains with (one per process)."""

    cfg: RunConfig
    run_dir: Path
    resume: bool
    device: torch.device
    ds: Any
    teacher: torch.nn.Module
    teacher_spec: dict
    cache: TeacherCache | None
    teacher_logits: torch.Tensor


def run_sweep(cfg: RunConfig, points: list[SweepPoint], resume: bool = False, jobs: int | str = 1) -> Path:
    check_jobs(jobs)
    runs.check_distillation(cfg)
    with runs.open_run_dir(cfg, resume, kind="sweep") as run_dir:
        return _run_sweep(cfg, points, resume, run_dir, jobs)


def _run_sweep(cfg: RunConfig, points: list[SweepPoint], resume: bool, run_dir: Path, jobs: int | str = 1) -> Path:
    start = time.perf_counter()
    device = select_device(cfg.device)
    ds = runs.load_data(cfg)
    loaded = runs.build_teacher(cfg, ds.num_classes, device, ds)
    if loaded is None:
        raise ConfigError("sweep: needs a trained teacher: --teacher checkpoint.pt (teacher.checkpoint)")
    teacher, teacher_spec = loaded
    temperatures = {p.temperature for p in points if p.temperature is not None}
    if cfg.teacher.checkpoints and len(temperatures) > 1:
        raise ConfigError(
            "sweep: an ensemble teacher averages its members at one temperature; sweep a single temperature with it"
        )

    # one teacher cache for every logit-method point
    cache, cache_path, cache_seconds = None, None, 0.0
    if any(not p.needs_features for p in points):
        cache_path = cfg.distill.teacher_cache or run_dir / "teacher_cache.pt"
        if cfg.distill.teacher_cache or cache_path.exists():
            cache = TeacherCache.load(cache_path)
            cache_seconds = cache.build_seconds or 0.0  # built earlier (recorded by caches of this version)
        else:
            t0 = time.perf_counter()
            cache = runs.cache_teacher(cfg, teacher, ds, device, cache_path)
            cache_seconds = time.perf_counter() - t0

    teacher_logits = predict(teacher, runs.test_set(ds, device, size=cfg.data.train_size)).cpu()
    shared = _Shared(cfg, run_dir, resume, device, ds, teacher, teacher_spec, cache, teacher_logits)
    done: dict[int, dict] = {}
    pending: list[int] = []
    for i, point in enumerate(points):
        summary_path = run_dir / point.name / "summary.json"
        if resume and summary_path.exists():
            done[i] = json.loads(summary_path.read_text())
        else:
            pending.append(i)
    jobs = resolve_jobs(jobs, device, len(pending))
    if jobs == 1:
        for k, i in enumerate(pending):
            left = runs.budget_left(cfg, start)  # with a budget, an equal share of what is left
            done[i] = _train_point(shared, points[i], i, len(points), left / (len(pending) - k) if left else None)
    else:
        left = runs.budget_left(cfg, start)
        share = left / math.ceil(len(pending) / jobs) if left else None  # jobs at a time, in rounds
        done.update(_train_in_parallel(shared, points, pending, jobs, cache_path, share))
    rows = sorted(done.values(), key=lambda r: -r["top1"])
    write_leaderboard(
        run_dir,
        rows,
        cache_seconds=cache_seconds,
        cache=cache.describe() if cache is not None else None,
        wall_seconds=time.perf_counter() - start,
    )
    log(
        f"sweep: {len(rows)} configurations; best {rows[0]['name']} {rows[0]['top1']:.2f}%; leaderboard: {run_dir / 'leaderboard.md'}"
    )
    return run_dir


def _train_point(shared: _Shared, point: SweepPoint, i: int, total: int, budget: float | None) -> dict:
    """Distill one configuration into its own folder; its leaderboard row (also written,
    atomically, as its summary.json)."""
    cfg, ds = shared.cfg, shared.ds
    out = shared.run_dir / point.name
    log(f"sweep {i + 1}/{total}: {point.name}")
    spec = runs.model_spec(point.student, {}, ds.num_classes)
    student = runs.new_model(spec, cfg.seed)  # every student of an architecture starts from the same weights
    use_cache = shared.cache if not point.needs_features else None
    run = Phases(cfg, ds, shared.device, shared.resume)
    r = run.distill(
        shared.teacher,
        shared.teacher_spec,
        student,
        spec,
        out,
        budget,
        point.name,
        teacher_cache=use_cache,
        methods=point.methods,
        alpha=point.alpha,
    )
    row = {
        "name": point.name,
        "student": point.student,
        "method": point.method,
        "temperature": point.temperature,
        "alpha": point.alpha,
        "teacher": "cache" if use_cache is not None else "live",
        "top1": r.metrics["top1"],
        "top5": r.metrics["top5"],
        "agreement": agreement(r.test_logits, shared.teacher_logits.to(r.test_logits.device))["agreement_top1"],
        "parameters": count_parameters(r.model),
        "macs": count_macs(r.model, runs.input_shape(ds, cfg.data.train_size)),
        "epochs": len(r.history),
        "train_seconds": r.train_seconds,
        "images_per_second": r.images_per_second,
        # which test images it got right: the leaderboard's paired tests against the best
        "test_correct": pack_outcomes((r.test_logits.argmax(1).cpu() == ds.test_labels).numpy()),
    }
    # atomic: --resume skips a configuration by its summary, which must never be half-written
    atomic_write_text(out / "summary.json", json.dumps(row, indent=2), "summary")
    return row


# ---------------------------------------------------------------- several configurations at once

_worker: _Shared | None = None  # a worker process's own copy of the shared state
_stop = None  # set by the main process: start no further configuration


def _worker_init(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool,
    device: str,
    slots,
    threads: int,
    cache_path: Path | None,
    teacher_logits: torch.Tensor,
    stop,
) -> None:
    """Start-up of a worker process: its signals, threads and device, then the data,
    teacher and cache (read from disk: the data from its decoded cache, in about a second).

    A worker leaves the terminal's process group, so a Ctrl-C reaches the main process
    only, which then stops the workers in order (:func:`_stop_workers`): during training
    the engine turns SIGINT into a checkpoint at the next step boundary; outside it (data,
    model, evaluation) the worker notes it and its next training stops at its first step."""
    global _worker, _stop
    os.setpgrp()
    signal.signal(signal.SIGINT, _note_interrupt)
    _stop = stop
    plain_progress_only()  # several processes' bars would overwrite each other
    torch.set_num_threads(threads)
    with slots.get_lock():
        slot = slots.value
        slots.value += 1
    if device == "cuda":  # "auto" found several GPUs: one each
        device = f"cuda:{slot % torch.cuda.device_count()}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # the engine's synchronisation and RNG state use the current device
    ds = runs.load_data(cfg)
    teacher, teacher_spec = runs.build_teacher(cfg, ds.num_classes, dev)
    cache = TeacherCache.load(cache_path) if cache_path else None
    _worker = _Shared(cfg, run_dir, resume, dev, ds, teacher, teacher_spec, cache, teacher_logits)


def _note_interrupt(signum, frame) -> None:
    GracefulInterrupt.pending = True


def _worker_train(point: SweepPoint, i: int, total: int, budget: float | None) -> dict | None:
    if _stop.is_set():
        return None  # the sweep is stopping
    return _train_point(_worker, point, i, total, budget)


def _stop_workers() -> None:
    for p in multiprocessing.active_children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGINT)


def _train_in_parallel(
    shared: _Shared,
    points: list[SweepPoint],
    pending: list[int],
    jobs: int,
    cache_path: Path | None,
    budget: float | None,
) -> dict[int, dict]:
    device = shared.device
    several_gpus = device.type == "cuda" and device.index is None and shared.cfg.device in ("auto", "cuda")
    threads = max(1, torch.get_num_threads() // jobs)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked thread pools or CUDA state
    log(f"sweep: {len(pending)} configurations, {jobs} at a time, {threads} CPU thread(s) each")
    if device.type == "cuda":  # the workers load their own teacher: free this one's GPU memory
        shared.teacher.cpu()
        torch.cuda.empty_cache()
    stop = ctx.Event()
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs,
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(
            shared.cfg,
            shared.run_dir,
            shared.resume,
            "cuda" if several_gpus else str(device),
            ctx.Value("i", 0),
            threads,
            cache_path,
            shared.teacher_logits,
            stop,
        ),
    )
    rows: dict[int, dict] = {}
    try:
        futures = {pool.submit(_worker_train, points[i], i, len(points), budget): i for i in pending}
        for future in concurrent.futures.as_completed(futures):
            rows[futures[future]] = future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise KDistillError(
            "sweep: a worker process failed to start or died (see its error above; out of memory?); the finished "
            "configurations are kept: rerun with --resume (and fewer --jobs) to train the others"
        ) from None
    except BaseException:
        # Ctrl-C, or a configuration failed: start no other, and let the running ones save
        # resumable checkpoints at their next step
        stop.set()
        log(
            "sweep: stopping; the running configurations save resumable checkpoints (Ctrl-C again: at once); rerun with --resume"
        )
        _stop_workers()
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            _stop_workers()
            pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return rows
