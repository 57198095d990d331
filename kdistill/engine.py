"""The one training loop: teacher, baseline student and distillation runs alike.

:func:`fit` is the loop, in named steps: set up, resume, then per epoch train (schedule ->
forward (the task returns named losses) -> sum -> backward -> clip -> step -> statistics
accumulated on the device, no host sync per step), check the numbers, and end the epoch
(evaluate, log, re-plan a time budget, checkpoint atomically). The run's state lives in one
:class:`Training` object; :class:`StepPlan` owns the number of steps. ``resume=True`` continues from the last
checkpoint and, because the batches of every epoch are a pure function of (seed, epoch) and
the RNG state is saved, ends with the same weights as an uninterrupted run.

In a multi-process job (torchrun, see :mod:`kdistill.distributed`) the same loop runs on
every rank: the task is wrapped in DistributedDataParallel, each rank trains on its share
of every global batch, statistics are summed over the ranks once per epoch, evaluation is
sharded, and only rank 0 writes files. Whatever decides how far training goes is agreed
by all ranks at the same step (a rank that stopped alone would hang the others'
collectives): Ctrl-C, a time budget's step count (rank 0's plan) and a non-finite loss.
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

from kdistill import distributed
from kdistill.budget import BudgetPlan, BudgetTooSmall, format_seconds
from kdistill.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
    state_dict_mismatch,
)
from kdistill.config import ScheduleConfig, TrainConfig
from kdistill.data.loader import Batch, EvalData
from kdistill.ema import WeightAverage
from kdistill.errors import CheckpointError, ConfigError, TrainingError
from kdistill.logger import MetricsLog
from kdistill.perf import tune_allocator
from kdistill.progress import Refresh, interactive, log, progress

# the fixed subset of an evaluation set (train.eval_subset) is drawn with this seed, the
# same in every run, so that runs' curves compare on the same samples
EVAL_SUBSET_SEED = 0

# multi-process runs agree on a Ctrl-C and on a budget's step count every this many steps
# (one tiny all-reduce); a budget run may so overrun its plan by up to this many steps - 1
STOP_CHECK_STEPS = 10


@dataclass
class Result:
    """What a training run gives back (the engine's, and the API's with test metrics)."""

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)  # on the last evaluation set ("test" if given, else "val")
    test_logits: torch.Tensor | None = None
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    checkpoint: Path | None = None
    budget: dict[str, Any] | None = None  # with a time budget: the steps, epochs and seconds it reached


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
) -> Result:
    """Train ``task`` (see :mod:`kdistill.tasks`) for ``cfg.epochs`` epochs.

    ``loader`` yields the batches of an epoch from ``loader.epoch(e)`` (see
    :mod:`kdistill.data.loader`); ``eval_sets`` ({"val": ..., "test": ...}) are evaluated
    after every epoch. ``checkpoint_extra`` is stored in every checkpoint (model spec, preprocessing, config).
    With ``run_dir`` set, writes ``checkpoint.pt`` and ``metrics.jsonl`` there.
    With ``cfg.budget`` set, trains for as many steps as fit in that many seconds instead
    of ``cfg.epochs`` epochs (see :mod:`kdistill.budget`), at most ``max_epochs`` epochs.
    """
    tune_allocator()
    with distributed.translate_errors(), distributed.sync_batchnorm(task, device, cfg.sync_batchnorm):
        # set-up: the task on the device, the optimizer, the plan of how many steps to take
        run = Training(
            task, loader, cfg, device, eval_sets or {}, run_dir, checkpoint_extra or {}, desc, num_classes, max_epochs
        )
        if resume:  # weights, optimizer, random streams, history and plan from the checkpoint
            run.resume()
        run.start()
        with GracefulInterrupt() as stop, contextlib.closing(run.metrics_log):
            while run.epoch * run.steps_per_epoch < run.plan.total:
                epoch = run.train_epoch(stop)  # Ctrl-C: a resumable checkpoint at this step
                run.check_numbers(epoch)  # a non-finite loss or gradient stops the run, naming the term
                run.end_epoch(epoch)  # evaluate, log, watch for collapse, re-plan, checkpoint
        return run.result()


def _max_steps(cfg: TrainConfig, steps_per_epoch: int, max_epochs: int | None) -> int | None:
    """A budget run's cap: ``train.max_steps`` and ``max_epochs`` (a teacher cache's epochs)."""
    caps = [c for c in (cfg.max_steps, max_epochs * steps_per_epoch if max_epochs else None) if c]
    return min(caps) if caps else None


class StepPlan:
    """How many optimizer steps the run takes: ``total``, the one number the learning-rate
    schedule and the loop read. Fixed (epochs x steps per epoch), or as many as fit in a
    time budget, re-planned as the run goes (see :mod:`kdistill.budget`); the ranks of a
    multi-process job follow rank 0's plan, agreed at the same steps."""

    def __init__(
        self,
        cfg: TrainConfig,
        steps_per_epoch: int,
        eval_images: int,
        max_epochs: int | None,
        device: torch.device,
        desc: str = "train",
    ):
        self.steps_per_epoch, self.device = steps_per_epoch, device
        self.world = distributed.world_size()
        self.budget = None
        if cfg.budget:
            self.budget = BudgetPlan(
                cfg.budget,
                steps_per_epoch,
                eval_images=eval_images,
                batch_size=cfg.eval_batch_size,
                max_steps=_max_steps(cfg, steps_per_epoch, max_epochs),
                sync=torch.cuda.synchronize if device.type == "cuda" else (lambda: None),
                desc=desc,
            )
            self.total = self.budget.total_steps
        else:
            self.total = min(steps_per_epoch * cfg.epochs, cfg.max_steps or steps_per_epoch * cfg.epochs)
        self.epochs = cfg.epochs if cfg.budget else -(-self.total // steps_per_epoch)

    def restore(self, state: dict | None) -> None:
        """A resumed budget run continues with the budget that is left."""
        if self.budget and state:
            self.budget.restore(state)
            self.total = self.budget.total_steps

    def after_step(self, steps_done: int, epoch_steps_done: int, stop_requested: bool) -> bool:
        """Re-plan after the run's ``steps_done``-th step; with several ranks, every
        STOP_CHECK_STEPS steps, at the epoch's end and at the plan's end, agree on the plan
        and on a Ctrl-C. Returns whether the ranks agreed to stop."""
        if self.budget is not None:
            self._budget_after_step(steps_done)
            if self.world == 1:
                self.total = self.budget.total_steps
        if self.world == 1:
            return False
        checkpoint = epoch_steps_done % STOP_CHECK_STEPS == 0 or epoch_steps_done == self.steps_per_epoch
        if checkpoint or (self.budget is not None and steps_done >= self.total):
            # ranks stop together (a rank leaving alone would hang the others' collectives)
            # and follow rank 0's budget plan from the same step on
            agreed, planned = distributed.agree(
                stop_requested, self.budget.total_steps if self.budget is not None else -1, self.device
            )
            if agreed:
                return True
            if self.budget is not None:
                self.total = planned
        return False

    def _budget_after_step(self, steps_done: int) -> None:
        """The budget's bookkeeping; a budget too small for the first step and an evaluation
        is refused after the first or second step (several ranks: by rank 0's clock, on every rank)."""
        try:
            self.budget.after_step(steps_done)
        except BudgetTooSmall as e:
            if self.world == 1:
                raise
            refusal: BudgetTooSmall | None = e
        else:
            refusal = None
        if self.world > 1 and steps_done <= 2:
            refused, _ = distributed.agree(refusal is not None and distributed.is_main(), -1, self.device)
            if refused:
                b = self.budget
                raise (
                    refusal
                    if distributed.is_main()
                    else BudgetTooSmall(b.desc, b.seconds, None, "measured by rank 0: see its error")
                )

    def ends_at(self, steps_done: int) -> bool:
        """Whether the plan ends after this step (a budget's plan or ``max_steps`` can end
        it inside an epoch)."""
        return steps_done >= self.total

    def after_epoch(self, overhead_seconds: float, steps_done: int) -> None:
        """The epoch's evaluation and checkpoint took ``overhead_seconds``: re-plan."""
        if self.budget is not None:
            self.budget.epoch_end(overhead_seconds, steps_done)
            # several ranks: rank 0's plan, so that all checkpoint and stop at the same step
            self.total = (
                self.budget.total_steps
                if self.world == 1
                else distributed.agree(False, self.budget.total_steps, self.device)[1]
            )

    def epochs_label(self) -> str:
        """The epoch count for progress lines: ``30``, ``~12`` (planned by a budget) or ``?``."""
        if self.budget is None:
            return str(self.epochs)
        return f"~{-(-self.total // self.steps_per_epoch)}" if self.budget.planned else "?"


@dataclass
class Epoch:
    """One epoch's statistics, summed on the device (no host sync per step)."""

    index: int
    first: int  # its first step: > 0 when resuming an interrupted epoch
    snapshot: dict[str, Any]  # the state at its start (host memory), to explain a NaN by replaying
    t0: float
    sums: torch.Tensor | None = None  # total, terms..., correct, count
    term_names: list[str] | None = None
    first_bad: torch.Tensor | None = None  # its first step with a non-finite loss or gradient (-1: none)
    bad_stats: torch.Tensor | None = None  # the statistics of that step
    done: int = 0  # steps done
    seconds: float = 0.0
    totals: list[float] = field(default_factory=list)  # the global batch's statistics (all ranks)

    @torch.no_grad()
    def add(self, step: int, stats: torch.Tensor, grad_norm: torch.Tensor, names: list[str]) -> None:
        self.sums = stats if self.sums is None else self.sums + stats
        new_bad = (self.first_bad < 0) & ~(torch.isfinite(stats[0]) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(new_bad, step, self.first_bad)
        self.bad_stats = stats if self.bad_stats is None else torch.where(new_bad, stats, self.bad_stats)
        self.term_names = self.term_names or names


class Training:
    """The state of one :func:`fit` and its named steps, in the order fit calls them."""

    def __init__(
        self, task, loader, cfg: TrainConfig, device, eval_sets, run_dir, extra, desc, num_classes, max_epochs
    ):
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch == 0:
            raise TrainingError(
                f"{desc}: the training set yields no batch of {cfg.batch_size} samples; lower train.batch_size"
            )
        self.world, self.main = distributed.world_size(), distributed.is_main()
        _check_shares(loader, cfg, self.world, desc)
        self.task, self.model, self.loader, self.cfg, self.device = task, task.model, loader, cfg, device
        self.eval_sets, self.extra, self.desc = eval_sets, extra, desc
        if cfg.eval_tta == "flip":
            check_flip_inputs(eval_sets, desc)
        self.eval_views = eval_subsets(eval_sets, cfg.eval_subset, desc)  # what every epoch but the last evaluates
        # images through the model per evaluation: the average and the raw weights, plain and mirrored
        passes = (2 if cfg.ema else 1) * (2 if cfg.eval_tta == "flip" else 1)
        eval_images = passes * sum(len(d.labels) for d in self.eval_views.values())
        self.plan = StepPlan(cfg, self.steps_per_epoch, eval_images, max_epochs, device, desc)
        if not any(p.requires_grad for p in task.parameters()):
            raise TrainingError(
                f"{desc}: {type(self.model).__name__} has no trainable parameters (every parameter has requires_grad=False); "
                "unfreeze at least one layer with requires_grad_(True)"
            )
        task.to(device)
        if cfg.channels_last:
            task.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(task.parameters(), cfg)
        # the average of the evaluated model's weights (not a teacher's, nor a mutual run's peers')
        self.ema = WeightAverage(self.model, cfg.ema) if cfg.ema else None
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ckpt_path = run_dir / CHECKPOINT_NAME if run_dir else None
        self.run_dir = run_dir
        self.epoch, self.start_epoch, self.start_step, self.partial = 0, 0, 0, None
        self.history: list[dict[str, Any]] = []
        self.own_rng = False  # whether this rank's random stream came from the checkpoint
        self.chance = 100.0 / num_classes if num_classes else None
        self.amp = autocast_for(device, cfg.amp)
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.counts: dict[int, torch.Tensor] = {}  # micro-batch size -> the same number on the device

    def resume(self) -> None:
        """Continue from the checkpoint in the run directory, if there is one; refuse one
        written with other trajectory settings or for another task."""
        if not self.ckpt_path:
            return
        path = self.ckpt_path
        # rank 0 reads (other machines need not see the file); tensors travel on the CPU
        map_to = self.device if self.world == 1 else "cpu"
        state = distributed.on_main(
            lambda: load_checkpoint(path, map_location=map_to) if path.exists() else None, share=True
        )
        if state is None:
            return
        changed = _changed_settings(state.get("train_config"), self.cfg)
        if changed:
            raise CheckpointError(
                f"cannot resume from {path}: it was written with {changed}; resuming continues the same run, "
                "so use the same settings, or start a new run (another --name)"
            )
        try:
            # with train.ema the checkpoint's model is the average; the trained weights are under ema.raw
            weights = state["ema"]["raw"] if self.ema is not None else state["model"]
            self.task.load_state_dict({**{f"model.{k}": v for k, v in weights.items()}, **state["task_state"]})
            if self.ema is not None:
                self.ema.load(state["model"], state["ema"]["updates"])
            self.optimizer.load_state_dict(state["optimizer"])
            ranks = state.get("rng_ranks")
            self.own_rng = self.world == 1 or (
                ranks is not None and len(ranks) == self.world
            )  # else: a job of another size
            _set_rng_state(ranks[distributed.rank()] if self.world > 1 and self.own_rng else state["rng"], self.device)
            self.start_epoch, self.history = int(state["epoch"]), list(state["history"])
            self.start_step, self.partial = int(state.get("step", 0)), state.get("partial")
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            detail = f"no {e.args[0]!r}" if isinstance(e, KeyError) else state_dict_mismatch(e)
            raise CheckpointError(
                f"cannot resume from {path}: it does not match this run ({detail}); delete it or choose another --name"
            ) from None
        self.plan.restore(state.get("budget"))
        where = (
            f"step {self.start_step} of epoch {self.start_epoch + 1}"
            if self.start_step
            else f"the end of epoch {self.start_epoch}"
        )
        log(f"{self.desc}: resuming from {path} at {where}")

    def start(self) -> None:
        """Open the metrics log, give every rank its random stream, compile, wrap in DDP."""
        # metrics.jsonl / metrics.csv (rewritten from the checkpoint's history) and TensorBoard: rank 0 writes
        self.metrics_log = MetricsLog(
            self.run_dir if self.main else None, self.history, self.cfg.tensorboard and self.main
        )
        if self.world > 1 and not self.own_rng:
            _decorrelate_ranks()
        if self.cfg.compile:
            self.model.compile()  # compiles forward in place; parameters and state_dict keys are unchanged
        self.net = distributed.wrap(
            self.task, self.device
        )  # DistributedDataParallel on several ranks, else the task itself
        self.train_seconds = sum(h.get("train_seconds", 0.0) for h in self.history)
        self.images_seen = sum(h.get("train_images", 0) for h in self.history)
        self.epoch = self.start_epoch
        self.steps_run = self.plan.total  # optimizer steps done when the loop ends

    def train_epoch(self, stop: GracefulInterrupt) -> Epoch:
        """One epoch's optimizer steps (from the resumed step on). On Ctrl-C (agreed by all
        ranks) save a checkpoint resumable from this very step, then re-raise."""
        self.task.train()
        epoch = self._begin_epoch()
        batches = self.loader.epoch(epoch.index, epoch.first)
        bar = progress(
            batches,
            total=self.steps_per_epoch,
            initial=epoch.first,
            desc=f"{self.desc} {epoch.index + 1}/{self.plan.epochs_label()}",
        )
        agreed = False  # several ranks: whether they all agreed to stop at this step
        refresh = Refresh() if interactive() else None  # the bar's loss and accuracy, on terminals
        try:
            for i, batch in enumerate(bar, start=epoch.first):
                step = epoch.index * self.steps_per_epoch + i
                stats, names, grad_norm = self.train_step(batch, i, epoch.index)
                if self.ema is not None:
                    self.ema.after_step(step + 1)
                epoch.add(step, stats, grad_norm, names)
                epoch.done = i + 1
                if self.world == 1 and stop.requested:  # Ctrl-C arrived during this step: stop at its boundary
                    raise KeyboardInterrupt
                agreed = self.plan.after_step(step + 1, epoch.done, stop.requested)
                if agreed:
                    raise KeyboardInterrupt
                ends = self.plan.ends_at(step + 1)
                last = ends or i + 1 == self.steps_per_epoch
                if refresh is not None and refresh.due(last=last):  # the only host syncs
                    self._show_progress(bar, epoch, i)
                if ends:
                    break
        except KeyboardInterrupt:
            if self.world > 1 and not agreed:
                raise  # a second Ctrl-C, at any moment: no collective can be trusted now
            self._save_interrupted(epoch)
            raise
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        epoch.seconds = time.perf_counter() - epoch.t0
        return epoch

    def _begin_epoch(self) -> Epoch:
        index = self.epoch
        first = self.start_step if index == self.start_epoch else 0
        resumed = self.partial if first and self.partial else None
        snapshot = {
            "task": _to_cpu(self.task.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            snapshot["cuda"] = torch.cuda.get_rng_state()
        epoch = Epoch(index, first, snapshot, t0=time.perf_counter() - (resumed["seconds"] if resumed else 0.0))
        if resumed:
            epoch.sums = torch.tensor(resumed["sums"], device=self.device)
            if not self.main:
                epoch.sums.zero_()  # the checkpoint holds the sums of all ranks: count them once
            epoch.term_names = resumed["terms"]
        epoch.first_bad = torch.tensor(-1, device=self.device)
        epoch.done = first
        return epoch

    def _show_progress(self, bar, epoch: Epoch, i: int) -> None:
        s = epoch.sums.tolist()
        elapsed = time.perf_counter() - epoch.t0
        # rank 0's own share, scaled to the job (the exact sums come at the epoch's end)
        w = self.world
        bar.set_postfix(
            loss=f"{s[0] * w / (i + 1):.3f}",
            acc=f"{100 * s[-2] / s[-1]:.1f}",
            img_s=f"{s[-1] * w / elapsed:.0f}",
            refresh=False,
        )

    def _save_interrupted(self, epoch: Epoch) -> None:
        """Save what this epoch has done, resumable from this very step (unless a step of it
        went non-finite on any rank: then the last good checkpoint stays)."""
        sums = distributed.all_reduce_sum(epoch.sums) if epoch.sums is not None else None
        went_bad = distributed.any_rank(bool(epoch.first_bad.item() >= 0), self.device)
        if self.ckpt_path and sums is not None and not went_bad:
            distributed.average_batchnorm_stats(self.task)
            partial = {"sums": sums.tolist(), "terms": epoch.term_names, "seconds": time.perf_counter() - epoch.t0}
            self.write_checkpoint(epoch.index, epoch.done, partial)
            log(
                f"{self.desc}: interrupted; saved a resumable checkpoint at step {epoch.done} of epoch {epoch.index + 1} in {self.ckpt_path}"
            )

    def train_step(self, batch: Batch, i: int, epoch: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """One optimizer step on ``batch`` (this rank's share of the global batch), the
        ``i``-th of ``epoch``, in ``grad_accumulation`` micro-batches. Returns the step's
        statistics on the device (total, terms..., correct, count; losses weighted by this
        rank's share of the global batch), the terms' names and the global gradient norm
        (before clipping)."""
        cfg, world = self.cfg, self.world
        factor = lr_factor(epoch * self.steps_per_epoch + i, self.plan.total, self.steps_per_epoch, cfg.schedule)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        # this rank's batch is its share of the global batch of `step_samples` samples;
        # weighting each (micro-)batch mean by its share, times the world size that DDP
        # divides the summed gradients by, gives the gradient of the global mean
        step_samples = (self.loader.samples_in_step(i) if hasattr(self.loader, "samples_in_step") else None) or len(
            batch.labels
        ) * world
        parts = _micro_batches(batch, cfg.grad_accumulation)
        stats = None
        for j, part in enumerate(parts):
            share = len(part.labels) / step_samples
            sync = world == 1 or j == len(parts) - 1  # DDP all-reduces on the last backward only
            with contextlib.nullcontext() if sync else self.net.no_sync():
                with self.amp:
                    logits, losses = self.net(part, epoch + i / self.steps_per_epoch)
                total = sum(losses.values())
                (total * (share * world)).backward()
            part_stats = self._step_stats(logits, part, losses, total, share)
            stats = part_stats if stats is None else stats + part_stats
        # without train.grad_clip the norm is only measured, so that a non-finite gradient
        # is caught like a non-finite loss; the gradients are all-reduced by now, so the norm
        # (and its finiteness) is the same on every rank
        grad_norm = (
            nn.utils.clip_grad_norm_(self.params, cfg.grad_clip) if cfg.grad_clip else gradient_norm(self.params)
        )
        self.optimizer.step()
        return stats, list(losses), grad_norm

    @torch.no_grad()
    def _step_stats(self, logits, part: Batch, losses: dict[str, torch.Tensor], total, share: float) -> torch.Tensor:
        correct = (logits.argmax(1) == part.labels).sum()
        # no torch.tensor(...) per step: on a GPU each one is a blocking host-to-device copy
        n = len(part.labels)
        count = self.counts.get(n)
        if count is None:
            count = self.counts[n] = torch.tensor(float(n), device=self.device)
        return torch.stack(
            [
                share * total.detach().float(),
                *(share * v.detach().float() for v in losses.values()),
                correct.float(),
                count,
            ]
        )

    def check_numbers(self, epoch: Epoch) -> None:
        """Sum the epoch's statistics over the ranks; stop the run if a step went
        non-finite, naming the step and the loss term at fault."""
        epoch.totals = distributed.all_reduce_sum(epoch.sums).tolist()  # the global batch's statistics, on every rank
        bad_step, values = self._agreed_non_finite(epoch)
        if bad_step < 0:
            return
        bad_terms = [n for n, v in values.items() if not math.isfinite(v)]
        if bad_terms:
            what = (
                f"loss became non-finite at step {bad_step} (epoch {epoch.index + 1}; term(s): {', '.join(bad_terms)})"
            )
        else:  # every term finite but the gradient not: replay the epoch to that step to find the term
            culprits = self._explain_non_finite(epoch, bad_step)
            if self.world > 1:  # each rank tested its own shard: the union, in order
                culprits = list(dict.fromkeys(c for found in distributed.all_gather_object(culprits) for c in found))
            finite = ", ".join(f"{n}={v:.4g}" for n, v in values.items())
            what = (
                f"gradient became non-finite at step {bad_step} (epoch {epoch.index + 1}; "
                f"term(s): {', '.join(culprits) or 'none on replay'}; loss terms were finite: {finite})"
            )
        raise TrainingError(
            f"{self.desc}: {what}; the last good checkpoint is kept"
            + (f" in {self.ckpt_path}" if self.ckpt_path and self.ckpt_path.exists() else "")
            + ". Lower the learning rate, add warm-up or set train.grad_clip."
        )

    def _agreed_non_finite(self, epoch: Epoch) -> tuple[int, dict[str, float]]:
        """The run's first step with a non-finite loss or gradient (-1: none) and the loss
        terms there; over all ranks (summed over the ranks that saw that step), so that all
        stop together and explain the failure alike."""
        bad_step = int(epoch.first_bad.item())
        values = dict(zip(epoch.term_names, epoch.bad_stats.tolist()[1:-2])) if bad_step >= 0 else {}
        if self.world == 1:
            return bad_step, values
        reports = distributed.all_gather_object((bad_step, values))
        bad_step = min((b for b, _ in reports if b >= 0), default=-1)
        at_step = [v for b, v in reports if b == bad_step and bad_step >= 0]
        return bad_step, {n: sum(v[n] for v in at_step) for n in (at_step[0] if at_step else {})}

    def _explain_non_finite(self, epoch: Epoch, bad_step: int) -> list[str]:
        """Replay the epoch from its snapshot up to ``bad_step`` (batches are a pure function
        of the epoch, the RNG state is restored), then find the terms at fault there. Several
        ranks replay together (the steps' collectives) and each tests its own shard."""
        snapshot = epoch.snapshot
        self.task.load_state_dict(snapshot["task"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        torch.set_rng_state(snapshot["rng"])
        if "cuda" in snapshot:
            torch.cuda.set_rng_state(snapshot["cuda"])
        for i, batch in enumerate(self.loader.epoch(epoch.index, epoch.first), start=epoch.first):
            if epoch.index * self.steps_per_epoch + i == bad_step:
                return non_finite_terms(self.task, batch, epoch.index + i / self.steps_per_epoch, self.amp)
            self.train_step(batch, i, epoch.index)
        return []

    def end_epoch(self, epoch: Epoch) -> None:
        """Record and log the epoch, evaluate, stop a collapsed run, re-plan, checkpoint."""
        s, steps = epoch.totals, epoch.done  # this epoch's steps: fewer than steps_per_epoch when a budget ends it
        position = epoch.index * self.steps_per_epoch + epoch.done  # optimizer steps done in the run
        self.steps_run = position
        record: dict[str, Any] = {
            "epoch": epoch.index + 1,
            "lr": self.base_lrs[0] * lr_factor(position - 1, self.plan.total, self.steps_per_epoch, self.cfg.schedule),
            "train_loss": s[0] / steps,
            **{f"train_{n}": v / steps for n, v in zip(epoch.term_names, s[1:-2])},
            "train_top1": 100 * s[-2] / s[-1],
            "train_seconds": epoch.seconds,
            "train_images": int(s[-1]),
            "images_per_second": s[-1] / epoch.seconds,
        }
        self.train_seconds += epoch.seconds
        self.images_seen += int(s[-1])
        overhead_start = time.perf_counter()
        distributed.average_batchnorm_stats(self.task)  # every rank evaluates and saves the same model
        if self.ema is not None and self.world > 1:
            with self.ema.applied(keep_changes=True):
                distributed.average_batchnorm_stats(self.model)
        self._evaluate(record, final=position >= self.plan.total)
        self.history.append(record)
        log(
            f"{self.desc} epoch {epoch.index + 1}/{self.plan.epochs_label()}: loss {record['train_loss']:.3f} train {record['train_top1']:.1f}%"
            + "".join(
                f" {name} {record[name + '_top1']:.1f}%"
                + (f" (of {record[name + '_subset']})" if name + "_subset" in record else "")
                for name in self.eval_sets
            )
            + f" ({record['images_per_second']:.0f} img/s)"
        )
        self.metrics_log.append(record)
        self._check_collapse(record, epoch.index)
        self.plan.after_epoch(time.perf_counter() - overhead_start, position)
        if self.ckpt_path and (position >= self.plan.total or (epoch.index + 1) % self.cfg.checkpoint_every == 0):
            self.write_checkpoint(epoch.index + 1)
        self.epoch += 1

    def _evaluate(self, record: dict[str, Any], final: bool) -> None:
        """Every evaluation set's top-1 and loss into ``record``: of the averaged weights with
        train.ema (the trained weights' top-1 as ``<set>_top1_raw``), with flip TTA's top-1 as
        ``<set>_top1_tta``, on the fixed subsets (``<set>_subset``: their size) unless ``final``."""
        tta = self.cfg.eval_tta == "flip"
        for name, full in self.eval_sets.items():
            data = full if final else self.eval_views[name]
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                logits, mirrored = predict_views(self.model, data, self.cfg.amp, flip=tta)
            for k, v in quick_metrics(logits, data.labels).items():
                record[f"{name}_{k}"] = v
            if mirrored is not None:
                record[f"{name}_top1_tta"] = quick_metrics(mirrored, data.labels)["top1"]
            if self.ema is not None:
                record[f"{name}_top1_raw"] = quick_metrics(predict(self.model, data, self.cfg.amp), data.labels)["top1"]
            if data is not full:
                record[f"{name}_subset"] = len(data.labels)

    def _check_collapse(self, record: dict[str, Any], index: int) -> None:
        """Stop a run whose watched accuracy fell back to chance after rising well above it."""
        if not (self.chance and self.eval_sets):
            return
        watched = next(iter(self.eval_sets))
        key = f"{watched}_top1"
        best = max(h[key] for h in self.history)
        if record[key] <= 1.2 * self.chance and best >= 2 * self.chance:
            raise TrainingError(
                f"{self.desc}: training collapsed at epoch {index + 1}: {watched} accuracy fell from {best:.1f}% "
                f"to {record[key]:.1f}% (chance {self.chance:.1f}%). Lower the learning rate, add warm-up or set train.grad_clip."
            )

    def write_checkpoint(self, epochs_done: int, step: int = 0, partial: dict | None = None) -> None:
        """``step`` > 0: interrupted after that many steps of epoch ``epochs_done + 1``,
        with the epoch's statistics so far in ``partial``. All ranks call it; rank 0 writes
        (its budget plan is the one all ranks follow)."""
        rngs = distributed.all_gather_object(_rng_state(self.device))  # every rank's stream, for an exact resume
        if not self.main:
            return
        budget = self.plan.budget
        ema = self.ema
        save_checkpoint(
            {
                **self.extra,
                # the model a checkpoint's user loads: the average with train.ema
                "model": ema.state_dict() if ema is not None else self.model.state_dict(),
                "ema": {"raw": self.model.state_dict(), "updates": ema.updates} if ema is not None else None,
                "task_state": {k: v for k, v in self.task.state_dict().items() if not k.startswith("model.")},
                "optimizer": self.optimizer.state_dict(),
                "epoch": epochs_done,
                "step": step,
                "partial": partial,
                "epochs": self.cfg.epochs,
                "budget": budget.state() if budget else None,
                "rng": rngs[0],
                **({"rng_ranks": rngs} if self.world > 1 else {}),
                "history": self.history,
            },
            self.ckpt_path,
        )

    def result(self) -> Result:
        report = None
        budget = self.plan.budget
        if budget is not None:
            report = budget.report(self.steps_run)
            log(
                f"{self.desc}: budget {format_seconds(budget.seconds)}: {self.steps_run} steps ({report['epochs']:.1f} epochs) in "
                f"{format_seconds(report['wall_seconds'])} ({100 * report['fraction_used']:.0f}% of the budget)"
                + "".join(
                    f", {name} {self.history[-1][name + '_top1']:.1f}%" for name in self.eval_sets if self.history
                )
            )
        if self.ema is not None:
            self.ema.copy_to()  # the trained model is the average (its checkpoint's model too)
        return Result(
            model=self.model,
            history=self.history,
            checkpoint=self.ckpt_path,
            train_seconds=self.train_seconds,
            images_per_second=self.images_seen / self.train_seconds if self.train_seconds else 0.0,
            budget=report,
        )


# --- the pieces the loop is made of -------------------------------------------------


def select_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU. Under torchrun each process takes the GPU
    of its LOCAL_RANK, so ``auto`` and ``cuda`` mean cuda:LOCAL_RANK there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} requested but CUDA is not available; use device: auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise TrainingError(
            f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
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

    # set by a SIGINT that arrived outside training (a sweep's worker process between a
    # configuration's phases): the next run stops at its first step boundary
    pending = False

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log("interrupt: stopping after this step (Ctrl-C again to stop at once)")

    def __enter__(self) -> GracefulInterrupt:
        self.requested = GracefulInterrupt.pending
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


def predict(model: nn.Module, data: EvalData, amp: str = "off", desc: str | None = None) -> torch.Tensor:
    """Logits (N, K) float32 on the CPU for every sample of ``data``, in eval mode. With
    ``desc``, shows the progress of this evaluation (a bar on a terminal).

    In a multi-process job every rank computes the logits of its contiguous share of the
    samples and gets everyone's (gathered in order): all ranks must call it together.
    """
    return predict_views(model, data, amp, desc=desc)[0]


@torch.no_grad()
def predict_views(
    model: nn.Module, data: EvalData, amp: str = "off", flip: bool = False, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`predict`'s logits and, with ``flip``, those of flip test-time augmentation: the
    mean of the logits of each image (N, C, H, W) and of its horizontal mirror (the mean of
    logits, as airbench does, rather than of probabilities); else None."""
    was_training = model.training
    model.eval()
    sharded = distributed.enabled() and data.source is None and len(data.labels) >= distributed.world_size()
    part = data.subset(*distributed.shard_range(len(data.labels))) if sharded else data
    out, out_tta = [], []
    batches = progress(part, total=len(part), desc=desc) if desc else part
    with autocast_for(data.device, amp):
        for batch in batches:
            logits = model(batch.images).float()
            out.append(logits)
            if flip:
                out_tta.append(0.5 * (logits + model(batch.images.flip(-1)).float()))
    model.train(was_training)
    views = [torch.cat(out), torch.cat(out_tta) if flip else None]
    return tuple(None if v is None else (distributed.all_gather_rows(v) if sharded else v).cpu() for v in views)


def check_flip_inputs(eval_sets: dict[str, EvalData], desc: str) -> None:
    """Flip test-time augmentation mirrors images (N, C, H, W); other inputs (tokens) are refused."""
    for name, data in eval_sets.items():
        x = data.inputs if data.source is None else next(iter(data.source))[0]
        if x is None:
            continue
        if x.ndim != 4 or not (x.is_floating_point() or x.dtype == torch.uint8):
            raise ConfigError(
                f"{desc}: train.eval_tta=flip mirrors images (N, C, H, W), but the {name} set's inputs are "
                f"{str(x.dtype).removeprefix('torch.')} of shape {tuple(x.shape)}; set train.eval_tta to off"
            )


def eval_subsets(eval_sets: dict[str, EvalData], size: int | None, desc: str) -> dict[str, EvalData]:
    """Each evaluation set, or a fixed random subset of ``size`` of its samples (in their
    order; the same in every run: EVAL_SUBSET_SEED). Batches from an iterable are evaluated whole."""
    views = {}
    for name, data in eval_sets.items():
        if size is None or size >= len(data.labels):
            views[name] = data
        elif data.source is not None:
            log(f"{desc}: train.eval_subset: the {name} set comes as batches, so every epoch evaluates all of it")
            views[name] = data
        else:
            g = torch.Generator().manual_seed(EVAL_SUBSET_SEED)
            keep = torch.randperm(len(data.labels), generator=g)[:size].sort().values
            views[name] = data.select(keep)
    return views


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


# the settings that define a run's trajectory: a resumed run must keep them
RESUME_KEYS = ("epochs", "max_steps", "batch_size", "optimizer", "schedule", "label_smoothing", "grad_clip", "ema")


def _changed_settings(saved: dict | None, cfg: TrainConfig) -> str:
    """'train.epochs=30 (this run: 40), ...' for the trajectory settings that differ from the
    checkpoint's run; empty when none do (or the checkpoint does not record them)."""
    if not saved:
        return ""
    now = cfg.model_dump(mode="json")
    keys = [k for k in RESUME_KEYS if not (k == "epochs" and cfg.budget)]  # a budget run plans its own steps

    def flat(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old = flat({k: saved[k] for k in keys if k in saved}, "train.")
    new = flat({k: now[k] for k in keys if k in saved}, "train.")
    return ", ".join(f"{k}={old[k]!r} (this run: {new.get(k)!r})" for k in old if old[k] != new.get(k))


def gradient_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, as a tensor (no host sync): what
    ``clip_grad_norm_`` measures, without its pass that rescales every gradient."""
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def quick_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {
        "top1": (logits.argmax(1) == labels).float().mean().item() * 100,
        "loss": F.cross_entropy(logits, labels).item(),
    }
