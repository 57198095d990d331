"""The one training loop: teacher, baseline student and distillation runs alike.

Read top to bottom: schedule -> forward (the task returns named losses) -> sum -> backward
-> clip -> step -> accumulate statistics on the device (no host sync per step) -> evaluate
at the end of each epoch -> checkpoint atomically. ``resume=True`` continues from the last
checkpoint and, because the batches of every epoch are a pure function of (seed, epoch) and
the RNG state is saved, ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.budget import BudgetPlan, format_seconds
from kdistill.checkpoint import load_checkpoint, save_checkpoint, state_dict_mismatch
from kdistill.config import ScheduleConfig, TrainConfig
from kdistill.data.loader import EvalData
from kdistill.errors import CheckpointError, TrainingError
from kdistill.logger import MetricsLog
from kdistill.perf import tune_allocator
from kdistill.progress import interactive, log, progress

CHECKPOINT_NAME = "checkpoint.pt"


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def autocast_for(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where it helps: on CUDA GPUs with bf16 support (auto), or when asked."""
    use = amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if not use:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    o = cfg.optimizer
    # no weight decay on biases and norm parameters (1-D tensors): standard practice
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, s: ScheduleConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based), a pure function."""
    t = step / max(total_steps, 1)  # progress through the run, [0, 1)
    epoch = step / steps_per_epoch
    if s.name == "onecycle":
        rise = s.pct_start
        if t < rise:  # linear warm-up from warmup_start to 1
            return s.warmup_start + (1 - s.warmup_start) * t / rise
        u = (t - rise) / (1 - rise)  # then linear decay to final_lr_fraction
        return 1 - (1 - s.final_lr_fraction) * u
    warm = s.warmup_epochs
    if warm > 0 and epoch < warm:
        return s.warmup_start + (1 - s.warmup_start) * epoch / warm
    if s.name == "cosine":
        u = (epoch - warm) / max(total_steps / steps_per_epoch - warm, 1e-9)
        return s.final_lr_fraction + (1 - s.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * min(u, 1.0)))
    if s.name == "step":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    return 1.0


class GracefulInterrupt:
    """Turns the first Ctrl-C (SIGINT) into a flag that the loop checks between steps, so a
    run stops at a step boundary (never halfway through an optimizer step) and can save a
    resumable checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupt: stopping after this step (Ctrl-C again to stop at once)")

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _to_cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def non_finite_terms(task: nn.Module, batch, epoch: float, amp: contextlib.AbstractContextManager) -> list[str]:
    """The loss terms of one batch whose value or gradient is NaN or infinite, found with
    one backward pass per term (only run to explain a failure, never while training)."""
    params = [p for p in task.parameters() if p.requires_grad]
    with amp:
        _, losses = task(batch, epoch)
    bad = []
    for name, value in losses.items():
        if not torch.isfinite(value).all():
            bad.append(f"{name} (value)")
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        if any(g is not None and not torch.isfinite(g).all() for g in grads):
            bad.append(f"{name} (gradient)")
    return bad


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    budget: dict[str, Any] | None = None  # with train.budget: what the run reached in it


@torch.no_grad()
def predict(model: nn.Module, data: EvalData, amp: str = "off", desc: str | None = None) -> torch.Tensor:
    """Logits (N, K) float32 on the CPU for every sample of ``data``, in eval mode. With
    ``desc``, shows the progress of this evaluation (a bar on a terminal)."""
    was_training = model.training
    model.eval()
    out = []
    batches = progress(data, total=len(data), desc=desc) if desc else data
    with autocast_for(data.device, amp):
        for batch in batches:
            out.append(model(batch.images).float())
    model.train(was_training)
    return torch.cat(out).cpu()


def quick_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "top1": (logits.argmax(1) == labels).float().mean().item() * 100,
        "loss": F.cross_entropy(logits, labels).item(),
    }


def fit(
    task: nn.Module,
    loader,
    cfg: TrainConfig,
    *,
    device: torch.device,
    eval_sets: dict[str, EvalData] | None = None,
    run_dir: Path | None = None,
    resume: bool = False,
    checkpoint_extra: dict[str, Any] | None = None,
    desc: str = "train",
    num_classes: int | None = None,
    max_epochs: int | None = None,
) -> FitResult:
    """Train ``task`` (see :mod:`kdistill.tasks`) for ``cfg.epochs`` epochs.

    ``loader`` yields the batches of an epoch from ``loader.epoch(e)`` (see
    :mod:`kdistill.data.loader`); ``eval_sets`` ({"val": ..., "test": ...}) are evaluated
    after every epoch. ``checkpoint_extra`` is stored in every checkpoint (model spec, preprocessing, config).
    With ``run_dir`` set, writes ``checkpoint.pt`` and ``metrics.jsonl`` there.
    With ``cfg.budget`` set, trains for as many steps as fit in that many seconds instead
    of ``cfg.epochs`` epochs (see :mod:`kdistill.budget`), at most ``max_epochs`` epochs.
    """
    tune_allocator()
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"{desc}: the training set yields no batch of {cfg.batch_size} samples; lower train.batch_size")
    eval_sets = eval_sets or {}
    budget = None
    if cfg.budget:
        budget = BudgetPlan(
            cfg.budget, steps_per_epoch, eval_images=sum(len(d.labels) for d in eval_sets.values()),
            batch_size=cfg.eval_batch_size, max_steps=max_epochs * steps_per_epoch if max_epochs else None,
            sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
        )
        total_steps = budget.total_steps
    else:
        total_steps = steps_per_epoch * cfg.epochs
    model = task.model
    task.to(device)
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task.parameters(), cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    ckpt_path = run_dir / CHECKPOINT_NAME if run_dir else None

    def write_checkpoint(epochs_done: int, step: int = 0, partial: dict | None = None) -> None:
        """``step`` > 0: interrupted after that many steps of epoch ``epochs_done + 1``,
        with the epoch's statistics so far in ``partial``."""
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        save_checkpoint(
            {
                **(checkpoint_extra or {}),
                "model": model.state_dict(),
                "task_state": {k: v for k, v in task.state_dict().items() if not k.startswith("model.")},
                "optimizer": optimizer.state_dict(),
                "epoch": epochs_done,
                "step": step,
                "partial": partial,
                "epochs": cfg.epochs,
                "budget": budget.state() if budget else None,
                "rng": rng,
                "history": history,
            },
            ckpt_path,
        )

    start_epoch, start_step, partial, history = 0, 0, None, []
    if resume and ckpt_path and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device)
        try:
            task.load_state_dict({**{f"model.{k}": v for k, v in state["model"].items()}, **state["task_state"]})
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            if device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"])
            start_epoch, history = int(state["epoch"]), list(state["history"])
            start_step, partial = int(state.get("step", 0)), state.get("partial")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) else state_dict_mismatch(e)
            raise CheckpointError(f"cannot resume from {ckpt_path}: it does not match this run ({detail}); delete it or choose another --name") from None
        if budget and state.get("budget"):
            budget.restore(state["budget"])  # continue with the budget that is left
            total_steps = budget.total_steps
        where = f"step {start_step} of epoch {start_epoch + 1}" if start_step else f"the end of epoch {start_epoch}"
        log(f"{desc}: resuming from {ckpt_path} at {where}")
    # metrics.jsonl / metrics.csv (rewritten from the checkpoint's history) and TensorBoard
    metrics_log = MetricsLog(run_dir, history, cfg.tensorboard)
    if cfg.compile:
        model.compile()  # compiles forward in place; parameters and state_dict keys are unchanged

    amp = autocast_for(device, cfg.amp)
    chance = 100.0 / num_classes if num_classes else None
    train_seconds = sum(h.get("train_seconds", 0.0) for h in history)
    images_seen = sum(h.get("train_images", 0) for h in history)
    counts: dict[int, torch.Tensor] = {}  # batch size -> the same number on the device
    params = [p for p in task.parameters() if p.requires_grad]

    def train_step(batch, i: int, epoch: int):
        """One optimizer step on ``batch``, the ``i``-th of ``epoch``. Returns the logits, the
        named loss terms, their sum and the global gradient norm (before clipping)."""
        step = epoch * steps_per_epoch + i
        factor = lr_factor(step, total_steps, steps_per_epoch, cfg.schedule)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        with amp:
            logits, losses = task(batch, epoch + i / steps_per_epoch)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        # without train.grad_clip the norm is only measured (max_norm inf scales by exactly
        # 1), so that a non-finite gradient is caught like a non-finite loss
        grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
        optimizer.step()
        return logits, losses, total, grad_norm

    def explain_non_finite(epoch: int, first: int, bad_step: int, snapshot: dict) -> list[str]:
        """Replay ``epoch`` from its snapshot up to ``bad_step`` (batches are a pure function
        of the epoch, the RNG state is restored), then find the terms at fault there."""
        task.load_state_dict(snapshot["task"])
        optimizer.load_state_dict(snapshot["optimizer"])
        torch.set_rng_state(snapshot["rng"])
        if "cuda" in snapshot:
            torch.cuda.set_rng_state(snapshot["cuda"])
        for i, batch in enumerate(loader.epoch(epoch, first), start=first):
            if epoch * steps_per_epoch + i == bad_step:
                return non_finite_terms(task, batch, epoch + i / steps_per_epoch, amp)
            train_step(batch, i, epoch)
        return []

    def epochs_label() -> str:
        if budget is None:
            return str(cfg.epochs)
        return f"~{-(-total_steps // steps_per_epoch)}" if budget.planned else "?"

    epoch = start_epoch
    with GracefulInterrupt() as stop, contextlib.closing(metrics_log):
        while epoch * steps_per_epoch < total_steps:
            task.train()
            first = start_step if epoch == start_epoch else 0  # > 0 when resuming an interrupted epoch
            resumed = partial if first and partial else None
            # the state at the start of the epoch (host memory), to explain a NaN by replaying
            snapshot = {"task": _to_cpu(task.state_dict()), "optimizer": _to_cpu(optimizer.state_dict()), "rng": torch.get_rng_state()}
            if device.type == "cuda":
                snapshot["cuda"] = torch.cuda.get_rng_state()
            # statistics summed on the device, no host sync per step: total, terms..., correct, count
            sums = torch.tensor(resumed["sums"], device=device) if resumed else None
            term_names: list[str] | None = resumed["terms"] if resumed else None
            # the first step of the epoch with a non-finite loss or gradient (-1: none), and its statistics
            first_bad, bad_stats = torch.tensor(-1, device=device), None
            t0 = time.perf_counter() - (resumed["seconds"] if resumed else 0.0)
            bar = progress(loader.epoch(epoch, first), total=steps_per_epoch, initial=first, desc=f"{desc} {epoch + 1}/{epochs_label()}")
            done = first
            try:
                for i, batch in enumerate(bar, start=first):
                    step = epoch * steps_per_epoch + i
                    logits, losses, total, grad_norm = train_step(batch, i, epoch)

                    with torch.no_grad():
                        correct = (logits.argmax(1) == batch.labels).sum()
                        # no torch.tensor(...) per step: on a GPU each one is a blocking host-to-device copy
                        n = len(batch.labels)
                        count = counts.get(n)
                        if count is None:
                            count = counts[n] = torch.tensor(float(n), device=device)
                        stats = torch.stack([total.detach().float(), *(v.detach().float() for v in losses.values()), correct.float(), count])
                        sums = stats if sums is None else sums + stats
                        new_bad = (first_bad < 0) & ~(torch.isfinite(total.detach()) & torch.isfinite(grad_norm))
                        first_bad = torch.where(new_bad, step, first_bad)
                        bad_stats = stats if bad_stats is None else torch.where(new_bad, stats, bad_stats)
                    term_names = term_names or list(losses)
                    done = i + 1
                    if stop.requested:  # Ctrl-C arrived during this step: stop at its boundary
                        raise KeyboardInterrupt
                    if budget is not None:
                        budget.after_step(step + 1)
                        total_steps = budget.total_steps
                        if step + 1 >= total_steps:
                            break
                    if interactive() and i % 20 == 0:  # the only host syncs: for the bar, on terminals
                        s = sums.tolist()
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{s[0] / (i + 1):.3f}", acc=f"{100 * s[-2] / s[-1]:.1f}", img_s=f"{s[-1] / elapsed:.0f}", refresh=False)
            except KeyboardInterrupt:
                # Ctrl-C: save what this epoch has done, resumable from this very step (unless
                # a step of it went non-finite: then the last good checkpoint stays)
                if ckpt_path and sums is not None and first_bad.item() < 0:
                    write_checkpoint(epoch, done, {"sums": sums.tolist(), "terms": term_names, "seconds": time.perf_counter() - t0})
                    log(f"{desc}: interrupted; saved a resumable checkpoint at step {done} of epoch {epoch + 1} in {ckpt_path}")
                raise
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t0
            s = sums.tolist()
            bad_step = int(first_bad.item())
            if bad_step >= 0:
                values = dict(zip(term_names, bad_stats.tolist()[1:-2]))
                bad_terms = [n for n, v in values.items() if not math.isfinite(v)]
                if bad_terms:
                    what = f"loss became non-finite at step {bad_step} (epoch {epoch + 1}; term(s): {', '.join(bad_terms)})"
                else:  # every term finite but the gradient not: replay the epoch to that step to find the term
                    culprits = explain_non_finite(epoch, first, bad_step, snapshot)
                    finite = ", ".join(f"{n}={v:.4g}" for n, v in values.items())
                    what = (
                        f"gradient became non-finite at step {bad_step} (epoch {epoch + 1}; "
                        f"term(s): {', '.join(culprits) or 'none on replay'}; loss terms were finite: {finite})"
                    )
                raise TrainingError(
                    f"{desc}: {what}; the last good checkpoint is kept"
                    + (f" in {ckpt_path}" if ckpt_path and ckpt_path.exists() else "")
                    + ". Lower the learning rate, add warm-up or set train.grad_clip."
                )
            steps = done  # this epoch's steps: fewer than steps_per_epoch when a budget ends it
            position = epoch * steps_per_epoch + done  # optimizer steps done in the run
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": base_lrs[0] * lr_factor(position - 1, total_steps, steps_per_epoch, cfg.schedule),
                "train_loss": s[0] / steps,
                **{f"train_{n}": v / steps for n, v in zip(term_names, s[1:-2])},
                "train_top1": 100 * s[-2] / s[-1],
                "train_seconds": epoch_seconds,
                "train_images": int(s[-1]),
                "images_per_second": s[-1] / epoch_seconds,
            }
            train_seconds += epoch_seconds
            images_seen += int(s[-1])
            overhead_start = time.perf_counter()
            for name, data in eval_sets.items():
                logits = predict(model, data, cfg.amp)
                for k, v in quick_metrics(logits, data.labels).items():
                    record[f"{name}_{k}"] = v
            history.append(record)
            log(
                f"{desc} epoch {epoch + 1}/{epochs_label()}: loss {record['train_loss']:.3f} train {record['train_top1']:.1f}%"
                + "".join(f" {name} {record[name + '_top1']:.1f}%" for name in eval_sets)
                + f" ({record['images_per_second']:.0f} img/s)"
            )
            metrics_log.append(record)

            if chance and eval_sets:
                watched = next(iter(eval_sets))
                key = f"{watched}_top1"
                best = max(h[key] for h in history)
                if record[key] <= 1.2 * chance and best >= 2 * chance:
                    raise TrainingError(
                        f"{desc}: training collapsed at epoch {epoch + 1}: {watched} accuracy fell from {best:.1f}% "
                        f"to {record[key]:.1f}% (chance {chance:.1f}%). Lower the learning rate, add warm-up or set train.grad_clip."
                    )

            if budget is not None:
                budget.epoch_end(time.perf_counter() - overhead_start, position)
                total_steps = budget.total_steps
            if ckpt_path and (position >= total_steps or (epoch + 1) % cfg.checkpoint_every == 0):
                write_checkpoint(epoch + 1)
            epoch += 1

    report = None
    if budget is not None:
        report = budget.report(total_steps)
        log(
            f"{desc}: budget {format_seconds(budget.seconds)}: {total_steps} steps ({report['epochs']:.1f} epochs) in "
            f"{format_seconds(report['wall_seconds'])} ({100 * report['fraction_used']:.0f}% of the budget)"
            + "".join(f", {name} {history[-1][name + '_top1']:.1f}%" for name in eval_sets if history)
        )
    return FitResult(
        model=model,
        history=history,
        checkpoint=ckpt_path,
        train_seconds=train_seconds,
        images_per_second=images_seen / train_seconds if train_seconds else 0.0,
        budget=report,
    )
