"""The one training loop: teacher, baseline student and distillation runs alike.

Read top to bottom: schedule -> forward (the task returns named losses) -> sum -> backward
-> clip -> step -> accumulate statistics on the device (no host sync per step) -> evaluate
at the end of each epoch -> checkpoint atomically. ``resume=True`` continues from the last
checkpoint and, because the batches of every epoch are a pure function of (seed, epoch) and
the RNG state is saved, ends with the same weights as an uninterrupted run.

In a multi-process job (torchrun, see :mod:`kdistill.distributed`) the same loop runs on
every rank: the task is wrapped in DistributedDataParallel, each rank trains on its share
of every global batch, statistics are summed over the ranks once per epoch, evaluation is
sharded, and only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import json
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

from kdistill import distributed
from kdistill.checkpoint import load_checkpoint, save_checkpoint
from kdistill.config import ScheduleConfig, TrainConfig
from kdistill.data.loader import Batch, EvalData
from kdistill.errors import CheckpointError, ConfigError, TrainingError
from kdistill.perf import tune_allocator
from kdistill.progress import interactive, log, progress

CHECKPOINT_NAME = "checkpoint.pt"
STOP_CHECK_STEPS = 10  # multi-process runs agree on a Ctrl-C every this many steps (one tiny all-reduce)


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU. Under torchrun each process takes the GPU
    of its LOCAL_RANK, so ``auto`` and ``cuda`` mean cuda:LOCAL_RANK there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "cuda" and distributed.env_world_size() > 1:
        if device.index is not None:
            raise ConfigError(
                f"device: {name!r} under torchrun: every process uses the GPU of its LOCAL_RANK; "
                "set device to auto or cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        device = torch.device("cuda", distributed.local_rank())
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


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    train_seconds: float = 0.0
    images_per_second: float = 0.0


@torch.no_grad()
def predict(model: nn.Module, data: EvalData, amp: str = "off") -> torch.Tensor:
    """Logits (N, K) float32 on the CPU for every sample of ``data``, in eval mode.

    In a multi-process job every rank computes the logits of its contiguous share of the
    samples and gets everyone's (gathered in order): all ranks must call it together.
    """
    was_training = model.training
    model.eval()
    sharded = distributed.enabled() and data.source is None and len(data.labels) >= distributed.world_size()
    part = data.subset(*distributed.shard_range(len(data.labels))) if sharded else data
    out = []
    with autocast_for(data.device, amp):
        for batch in part:
            out.append(model(batch.images).float())
    model.train(was_training)
    logits = torch.cat(out)
    return (distributed.all_gather_rows(logits) if sharded else logits).cpu()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def _decorrelate_ranks() -> None:
    """Give every rank a random stream of its own (dropout masks, CRD negatives), derived
    from the stream they share, so a run is still a function of its seed."""
    seed = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(seed + distributed.rank())


def _micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """A batch split into ``parts`` micro-batches (gradient accumulation)."""
    if parts == 1:
        return [batch]
    return [type(batch)(*fields) for fields in zip(*(t.tensor_split(parts) for t in batch))]


def _check_shares(loader, cfg: TrainConfig, world: int, desc: str) -> None:
    """Every optimizer step must give every rank at least one sample per micro-batch."""
    smallest = loader.samples_in_step(len(loader) - 1) if hasattr(loader, "samples_in_step") else None
    need = world * cfg.grad_accumulation
    if smallest is not None and smallest < need:
        raise ConfigError(
            f"{desc}: train.batch_size={cfg.batch_size}: a step of {smallest} samples cannot feed {world} process(es) "
            f"x train.grad_accumulation={cfg.grad_accumulation} micro-batches; use a global batch of at least {need}"
        )


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
) -> FitResult:
    """Train ``task`` (see :mod:`kdistill.tasks`) for ``cfg.epochs`` epochs.

    ``loader`` yields the batches of an epoch from ``loader.epoch(e)`` (see
    :mod:`kdistill.data.loader`); ``eval_sets`` ({"val": ..., "test": ...}) are evaluated
    after every epoch. ``checkpoint_extra`` is stored in every checkpoint (model spec, preprocessing, config).
    With ``run_dir`` set, writes ``checkpoint.pt`` and ``metrics.jsonl`` there.
    """
    tune_allocator()
    with distributed.translate_errors(), distributed.sync_batchnorm(task, device, cfg.sync_batchnorm):
        return _fit(task, loader, cfg, device, eval_sets, run_dir, resume, checkpoint_extra, desc, num_classes)


def _fit(task, loader, cfg, device, eval_sets, run_dir, resume, checkpoint_extra, desc, num_classes) -> FitResult:
    model = task.model
    task.to(device)
    if cfg.channels_last:
        task.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(task.parameters(), cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise TrainingError(f"{desc}: the training set yields no batch of {cfg.batch_size} samples; lower train.batch_size")
    world, main = distributed.world_size(), distributed.is_main()
    _check_shares(loader, cfg, world, desc)
    total_steps = steps_per_epoch * cfg.epochs
    ckpt_path = run_dir / CHECKPOINT_NAME if run_dir else None
    metrics_path = run_dir / "metrics.jsonl" if run_dir and main else None  # rank 0 writes files

    def write_checkpoint(epochs_done: int, step: int = 0, partial: dict | None = None) -> None:
        """``step`` > 0: interrupted after that many steps of epoch ``epochs_done + 1``,
        with the epoch's statistics so far in ``partial``. All ranks call it; rank 0 writes."""
        rngs = distributed.all_gather_object(_rng_state(device))  # every rank's stream, for an exact resume
        if not main:
            return
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
                "rng": rngs[0],
                **({"rng_ranks": rngs} if world > 1 else {}),
                "history": history,
            },
            ckpt_path,
        )

    start_epoch, start_step, partial, history = 0, 0, None, []
    own_rng = False  # whether this rank's random stream came from the checkpoint
    state = None
    if resume and ckpt_path:
        # rank 0 reads (other machines need not see the file); tensors travel on the CPU
        map_to = device if world == 1 else "cpu"
        state = distributed.on_main(lambda: load_checkpoint(ckpt_path, map_location=map_to) if ckpt_path.exists() else None, share=True)
    if state is not None:
        try:
            task.load_state_dict({**{f"model.{k}": v for k, v in state["model"].items()}, **state["task_state"]})
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"cannot resume from {ckpt_path}: it does not match this run ({str(e).splitlines()[0]})") from None
        ranks = state.get("rng_ranks")
        own_rng = world == 1 or (ranks is not None and len(ranks) == world)  # else: a job of another size
        _set_rng_state(ranks[distributed.rank()] if world > 1 and own_rng else state["rng"], device)
        start_epoch, history = state["epoch"], list(state["history"])
        start_step, partial = state.get("step", 0), state.get("partial")
        where = f"step {start_step} of epoch {start_epoch + 1}" if start_step else f"the end of epoch {start_epoch}"
        log(f"{desc}: resuming from {ckpt_path} at {where}")
    if metrics_path:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        # rewrite from the checkpoint's history: epochs after the last checkpoint are redone
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    if world > 1 and not own_rng:
        _decorrelate_ranks()
    if cfg.compile:
        model.compile()  # compiles forward in place; parameters and state_dict keys are unchanged
    net = distributed.wrap(task, device)  # DistributedDataParallel on several ranks, else task itself
    accumulate = cfg.grad_accumulation

    eval_sets = eval_sets or {}
    amp = autocast_for(device, cfg.amp)
    chance = 100.0 / num_classes if num_classes else None
    train_seconds = sum(h.get("train_seconds", 0.0) for h in history)
    images_seen = sum(h.get("train_images", 0) for h in history)
    first_bad = torch.tensor(-1, device=device)
    counts: dict[int, torch.Tensor] = {}  # micro-batch size -> that number on the device

    with GracefulInterrupt() as stop:
        for epoch in range(start_epoch, cfg.epochs):
            task.train()
            first = start_step if epoch == start_epoch else 0  # > 0 when resuming an interrupted epoch
            resumed = partial if first and partial else None
            # statistics summed on the device, no host sync per step: total, terms..., correct, count
            sums = torch.tensor(resumed["sums"], device=device) if resumed else None
            if sums is not None and not main:
                sums.zero_()  # the checkpoint holds the sums of all ranks: count them once
            term_names: list[str] | None = resumed["terms"] if resumed else None
            t0 = time.perf_counter() - (resumed["seconds"] if resumed else 0.0)
            bar = progress(loader.epoch(epoch, first), total=steps_per_epoch, initial=first, desc=f"{desc} {epoch + 1}/{cfg.epochs}")
            done = first
            agreed = False  # several ranks: whether they all agreed to stop at this step
            try:
                for i, batch in enumerate(bar, start=first):
                    step = epoch * steps_per_epoch + i
                    factor = lr_factor(step, total_steps, steps_per_epoch, cfg.schedule)
                    for group, base in zip(optimizer.param_groups, base_lrs):
                        group["lr"] = base * factor
                    optimizer.zero_grad(set_to_none=True)
                    # this rank's batch is its share of the global batch of `step_samples` samples;
                    # weighting each (micro-)batch mean by its share, times the world size that
                    # DDP divides the summed gradients by, gives the gradient of the global mean
                    step_samples = (loader.samples_in_step(i) if hasattr(loader, "samples_in_step") else None) or len(batch.labels) * world
                    parts = _micro_batches(batch, accumulate)
                    for j, part in enumerate(parts):
                        share = len(part.labels) / step_samples
                        sync = world == 1 or j == len(parts) - 1  # DDP all-reduces on the last backward only
                        with contextlib.nullcontext() if sync else net.no_sync():
                            with amp:
                                logits, losses = net(part, epoch + i / steps_per_epoch)
                            total = sum(losses.values())
                            (total * (share * world)).backward()

                        with torch.no_grad():
                            correct = (logits.argmax(1) == part.labels).sum()
                            n = len(part.labels)  # a host-to-device copy per size, not per step (it blocks on GPUs)
                            count = counts[n] if n in counts else counts.setdefault(n, torch.tensor(float(n), device=device))
                            stats = torch.stack([share * total.detach().float(), *(share * v.detach().float() for v in losses.values()), correct.float(), count])
                            sums = stats if sums is None else sums + stats
                            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(total.detach()), torch.tensor(step, device=device), first_bad)
                        term_names = term_names or list(losses)
                    if cfg.grad_clip:
                        nn.utils.clip_grad_norm_(task.parameters(), cfg.grad_clip)
                    optimizer.step()
                    done = i + 1
                    if world == 1 and stop.requested:  # Ctrl-C arrived during this step: stop at its boundary
                        raise KeyboardInterrupt
                    if world > 1 and (done % STOP_CHECK_STEPS == 0 or done == steps_per_epoch):
                        # ranks stop together: a rank leaving alone would hang the others' collectives
                        agreed = distributed.any_rank(stop.requested, device)
                        if agreed:
                            raise KeyboardInterrupt
                    if interactive() and i % 20 == 0:  # the only host syncs: for the bar, on terminals
                        s = sums.tolist()
                        elapsed = time.perf_counter() - t0
                        # rank 0's own share, scaled to the job (the exact sums come at the epoch's end)
                        bar.set_postfix(loss=f"{s[0] * world / (i + 1):.3f}", acc=f"{100 * s[-2] / s[-1]:.1f}", img_s=f"{s[-1] * world / elapsed:.0f}", refresh=False)
            except KeyboardInterrupt:
                if world > 1 and not agreed:
                    raise  # a second Ctrl-C, at any moment: no collective can be trusted now
                # Ctrl-C: save what this epoch has done, resumable from this very step
                sums = distributed.all_reduce_sum(sums) if sums is not None else None
                if ckpt_path and sums is not None and math.isfinite(sums[0].item()):
                    distributed.average_batchnorm_stats(task)
                    write_checkpoint(epoch, done, {"sums": sums.tolist(), "terms": term_names, "seconds": time.perf_counter() - t0})
                    log(f"{desc}: interrupted; saved a resumable checkpoint at step {done} of epoch {epoch + 1} in {ckpt_path}")
                raise
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t0
            s = distributed.all_reduce_sum(sums).tolist()  # the global batch's statistics, on every rank
            if not math.isfinite(s[0]):
                bad_terms = [n for n, v in zip(term_names, s[1:-2]) if not math.isfinite(v)]
                bad_step = min((b for b in distributed.all_gather_object(int(first_bad.item())) if b >= 0), default=-1)
                raise TrainingError(
                    f"{desc}: loss became non-finite at step {bad_step} (epoch {epoch + 1}; "
                    f"term(s): {', '.join(bad_terms) or 'total'}); the last good checkpoint is kept"
                    + (f" in {ckpt_path}" if ckpt_path and ckpt_path.exists() else "")
                    + ". Lower the learning rate, add warm-up or set train.grad_clip."
                )
            steps = steps_per_epoch
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "lr": base_lrs[0] * lr_factor(min((epoch + 1) * steps, total_steps) - 1, total_steps, steps, cfg.schedule),
                "train_loss": s[0] / steps,
                **{f"train_{n}": v / steps for n, v in zip(term_names, s[1:-2])},
                "train_top1": 100 * s[-2] / s[-1],
                "train_seconds": epoch_seconds,
                "train_images": int(s[-1]),
                "images_per_second": s[-1] / epoch_seconds,
            }
            train_seconds += epoch_seconds
            images_seen += int(s[-1])
            distributed.average_batchnorm_stats(task)  # every rank evaluates and saves the same model
            for name, data in eval_sets.items():
                logits = predict(model, data, cfg.amp)
                for k, v in quick_metrics(logits, data.labels).items():
                    record[f"{name}_{k}"] = v
            history.append(record)
            log(
                f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.3f} train {record['train_top1']:.1f}%"
                + "".join(f" {name} {record[name + '_top1']:.1f}%" for name in eval_sets)
                + f" ({record['images_per_second']:.0f} img/s)"
            )
            if metrics_path:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")

            if chance and eval_sets:
                watched = next(iter(eval_sets))
                key = f"{watched}_top1"
                best = max(h[key] for h in history)
                if record[key] <= 1.2 * chance and best >= 2 * chance:
                    raise TrainingError(
                        f"{desc}: training collapsed at epoch {epoch + 1}: {watched} accuracy fell from {best:.1f}% "
                        f"to {record[key]:.1f}% (chance {chance:.1f}%). Lower the learning rate, add warm-up or set train.grad_clip."
                    )

            if ckpt_path and (epoch + 1 == cfg.epochs or (epoch + 1) % cfg.checkpoint_every == 0):
                write_checkpoint(epoch + 1)

    return FitResult(
        model=model,
        history=history,
        checkpoint=ckpt_path,
        train_seconds=train_seconds,
        images_per_second=images_seen / train_seconds if train_seconds else 0.0,
    )
