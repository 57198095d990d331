"""Time budgets: how many optimizer steps fit in a wall-clock budget.

With ``train.budget`` set, the engine does not train for ``epochs``; it trains for as many
steps as fit in the budget and stretches the learning-rate schedule over them, so a
10-minute run ends annealed, not cut off. The plan is made from the throughput measured
in the first steps (after a few warm-up steps, whose allocations and caches make them
slow) and remade every 5% of the budget and at every epoch end, when the cost of
evaluation and checkpointing is known; the schedule follows the plan (a re-plan moves the
remaining learning rates by a few percent at most). A safety net stops the run at a step
boundary if it would otherwise overrun the budget.

Cost model, for ``k`` steps still to come at ``r`` seconds per step, ``S`` steps per epoch
and ``o`` seconds of evaluation + checkpoint per epoch end:

    remaining seconds = k * r + (k / S) * o + o      (the final epoch end included)

Before the first epoch end, ``o`` is estimated as one third of a training step per
evaluation batch (a forward pass is about a third of forward + backward).

Before the first plan the safety net uses a provisional step time, the mean of the steps
since the first (the first holds the set-up and the warm-up). A budget that cannot hold
the run's first step plus one evaluation is refused as soon as that is known
(:class:`BudgetTooSmall`, saying about how many seconds it would need): right after the
first step if it alone outlasted the budget, else right after the second, whose cost
(timed with a sync) estimates the evaluation's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdistill.errors import ConfigError

WARMUP_STEPS = 3  # not timed: first steps allocate buffers, fill caches, maybe compile
REPLAN_FRACTION = 0.05  # re-plan every 5% of the budget


class BudgetTooSmall(ConfigError):
    """A time budget too short for one training step and the evaluation that must follow:
    ``seconds`` of training time for run ``desc``, which would need about ``needed``
    (``detail`` says why)."""

    def __init__(self, desc: str, seconds: float, needed: float | None, detail: str):
        needs = f": it needs about {format_seconds(needed)}" if needed is not None else ""
        super().__init__(
            f"budget: {desc}: {format_seconds(seconds)} of training time cannot hold one training step and the evaluation "
            f"after it ({detail}){needs}"
        )
        self.desc, self.seconds, self.needed, self.detail = desc, seconds, needed, detail

    def __reduce__(self):  # a sweep worker's refusal travels to the main process pickled
        return type(self), (self.desc, self.seconds, self.needed, self.detail)


def format_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


class BudgetPlan:
    """The step count of a run with a wall-clock budget of ``seconds``.

    The engine calls :meth:`after_step` after every optimizer step and :meth:`epoch_end`
    after each epoch's evaluation and checkpoint, and trains while the global step is below
    :attr:`total_steps`. ``clock`` and ``sync`` are injectable for tests and for CUDA
    (``torch.cuda.synchronize``: timings must include the queued GPU work).
    """

    def __init__(
        self,
        seconds: float,
        steps_per_epoch: int,
        *,
        eval_images: int = 0,
        batch_size: int = 1,
        max_steps: int | None = None,
        elapsed: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
        sync: Callable[[], None] = lambda: None,
        desc: str = "train",
    ):
        self.seconds = seconds
        self.steps_per_epoch = steps_per_epoch
        self.eval_images = eval_images
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.clock = clock
        self.sync = sync
        self.desc = desc
        self.created = clock()
        self.start = self.created - elapsed  # a resumed run has already spent ``elapsed``
        # provisional until the first plan: the schedule stays at its very beginning
        self.total_steps = max_steps or steps_per_epoch * 1_000_000
        self.planned = False
        self.finished = False
        self.step_seconds: float | None = None
        self.epoch_overhead: float | None = None
        self._seen = 0  # steps observed by this process
        self._first: tuple[float, float, float] | None = None  # its first step: (seconds, end time, overhead so far)
        self._mark: tuple[int, float, float] | None = None  # (steps done, time, overhead so far)
        self._overhead = 0.0  # seconds spent outside training steps (evaluation, checkpoints)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def _expected_overhead(self, step_seconds: float | None = None) -> float:
        if self.epoch_overhead is not None:
            return self.epoch_overhead
        r = self.step_seconds if step_seconds is None else step_seconds
        if r is None:
            return 0.0
        return self.eval_images / self.batch_size * r / 3

    def _provisional_step_seconds(self) -> float | None:
        """Before the first plan: the mean of the steps since the first (by the clock alone,
        no sync). None after the first step alone: it includes the set-up and the warm-up,
        often many times a step's cost, so it would stop a run that has time to spare."""
        if self._first is None or self._seen < 2:
            return None
        _, t1, o1 = self._first
        return max(0.0, self.clock() - t1 - (self._overhead - o1)) / (self._seen - 1)

    def _plan(self, done: int) -> None:
        r, o, S = self.step_seconds, self._expected_overhead(), self.steps_per_epoch
        remaining = self.seconds - self.elapsed()
        k = max(0, int((remaining - o) / (r + o / S)))
        total = done + k
        self.total_steps = min(total, self.max_steps) if self.max_steps else total
        self.planned = True

    def after_step(self, done: int) -> None:
        """``done``: optimizer steps finished so far (global count). Raises
        :class:`BudgetTooSmall` after the run's first or second step when the budget cannot
        hold the first step and an evaluation."""
        self._seen += 1
        if self.finished:
            return
        if self._seen <= 2:
            self._time_early_step(done)
        if self._mark is None:
            if self._seen >= WARMUP_STEPS:
                self.sync()
                self._mark = (done, self.clock(), self._overhead)
        else:
            self._measure(done)
        # safety net: never start a step that would end past the budget (final evaluation included)
        r = self.step_seconds if self.planned else self._provisional_step_seconds()
        if r is not None and self.elapsed() + r + self._expected_overhead(r) > self.seconds:
            self.total_steps = min(self.total_steps, done)
        if done >= self.total_steps:
            self.finished = True

    def _time_early_step(self, done: int) -> None:
        """Time this process's first two steps (synced). A new run whose set-up and first
        step outlast the budget, or leave too little for the evaluation at the second
        step's cost, is refused: the budget cannot hold one step and an evaluation."""
        self.sync()
        now = self.clock()
        if self._seen == 1:
            self._first = (now - self.created, now, self._overhead)
            if done == 1 and self.elapsed() > self.seconds:
                self._refuse(done, self._first[0])  # the only step cost known, warm-up and all
            return
        first, t1, o1 = self._first
        if done == 2 and first + self._expected_overhead(now - t1 - (self._overhead - o1)) > self.seconds:
            self._refuse(done, now - t1 - (self._overhead - o1))
        # (a resumed run is not refused: what is left of its budget is spent as well as it can be)

    def _refuse(self, done: int, step_seconds: float) -> None:
        first, evaluation = self._first[0], self._expected_overhead(step_seconds)
        self.total_steps, self.finished = done, True
        detail = f"set-up and the first step took {format_seconds(first)}, evaluating {self.eval_images:,} images takes about {format_seconds(evaluation)}"
        raise BudgetTooSmall(self.desc, self.seconds, first + evaluation, detail)

    def _measure(self, done: int) -> None:
        """Time the steps since the mark; plan once a window of them has passed."""
        s0, t0, o0 = self._mark
        n = done - s0
        window = (
            REPLAN_FRACTION * self.seconds if self.planned else min(max(0.02 * self.seconds, 0.5), 0.2 * self.seconds)
        )
        if n >= (1 if self.planned else 5) and self.clock() - t0 - (self._overhead - o0) >= window:
            self.sync()
            now = self.clock()
            self.step_seconds = (now - t0 - (self._overhead - o0)) / n
            self._plan(done)
            self._mark = (done, now, self._overhead)

    def epoch_end(self, overhead_seconds: float, done: int) -> None:
        """The evaluation and checkpoint at an epoch end took ``overhead_seconds``."""
        self._overhead += overhead_seconds
        self.epoch_overhead = overhead_seconds
        if done >= self.total_steps:
            self.finished = True
            return
        if not self.planned:  # an epoch shorter than the first plan's window: plan from what it took
            self.step_seconds = self._provisional_step_seconds() or (self._first[0] if self._first else None)
            if self.step_seconds is None:
                return
        self._plan(done)
        if done >= self.total_steps:
            self.finished = True

    def state(self) -> dict[str, Any]:
        """For the checkpoint: a resumed run continues with the budget that is left."""
        return {
            "seconds": self.seconds,
            "elapsed": self.elapsed(),
            "total_steps": self.total_steps,
            "planned": self.planned,
            "step_seconds": self.step_seconds,
            "epoch_overhead": self.epoch_overhead,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.start = self.clock() - state["elapsed"]
        self.total_steps, self.planned = state["total_steps"], state["planned"]
        self.step_seconds, self.epoch_overhead = state["step_seconds"], state["epoch_overhead"]

    def report(self, steps: int) -> dict[str, Any]:
        elapsed = self.elapsed()
        return {
            "budget_seconds": self.seconds,
            "wall_seconds": elapsed,
            "fraction_used": elapsed / self.seconds,
            "steps": steps,
            "epochs": steps / self.steps_per_epoch,
            "step_seconds": self.step_seconds,
        }


# ------------------------------------------------------------------ the whole study's budget


@dataclass(frozen=True)
class PhaseCost:
    """What one training phase of a study costs: ``step_seconds`` per optimizer step,
    ``eval_seconds`` per epoch-end evaluation, ``steps_per_epoch`` steps per epoch."""

    name: str
    step_seconds: float
    eval_seconds: float
    steps_per_epoch: int

    def seconds(self, steps: int) -> float:
        """``steps`` optimizer steps and the evaluation at every epoch end (a last partial epoch's included)."""
        return steps * self.step_seconds + -(-steps // self.steps_per_epoch) * self.eval_seconds


@dataclass
class StudyPlan:
    """How a study spends ``budget`` seconds: ``spent`` before the plan (loading, measuring),
    ``reserve`` for the final evaluation, profiling, export and report, and every trained
    phase ``steps`` optimizer steps (the same for all: the two students differ only by
    distillation) taking ``phases[name]`` seconds. ``note``: one line when the budget holds
    less than one epoch of each phase (they train for a fraction of one)."""

    budget: float
    spent: float
    reserve: float
    steps: int
    costs: dict[str, PhaseCost]
    phases: dict[str, float]
    note: str | None = None

    def share(self, phase: str, left: float, remaining: list[str]) -> float:
        """``phase``'s seconds of the ``left`` seconds of training time, shared with the
        ``remaining`` phases (``phase`` among them) in proportion to their plan: a phase
        that ran faster or slower than measured leaves the others their share."""
        return left * self.phases[phase] / sum(self.phases[p] for p in remaining)

    def record(self) -> dict[str, Any]:
        """For summary.json: the plan (the study adds what each phase spent)."""
        return {
            "budget_seconds": self.budget,
            "planning_seconds": self.spent,
            "reserve_seconds": self.reserve,
            "steps": self.steps,
            "phases": {
                name: {
                    "planned_seconds": seconds,
                    "planned_steps": self.steps,
                    "step_seconds": self.costs[name].step_seconds,
                    "steps_per_epoch": self.costs[name].steps_per_epoch,
                }
                for name, seconds in self.phases.items()
            },
            **({"note": self.note} if self.note else {}),
        }


def plan_study(budget: float, spent: float, costs: list[PhaseCost], reserve: float) -> StudyPlan:
    """The most optimizer steps ``N`` that every phase of ``costs`` can take, one after the
    other, in what is left of ``budget`` after ``spent`` seconds and the ``reserve``.

    The same ``N`` for every phase: the student alone and the distilled student must see
    the same batches for their difference to be distillation's; the teacher trains as long
    (a teacher weaker than its student has little to teach). A budget too small for one
    epoch of each phase trains each for a fraction of an epoch (``note`` says so); one too
    small for a single step of each phase and its evaluation is refused with the budget
    that would do."""
    available = budget - spent - reserve
    need = sum(c.seconds(1) for c in costs)
    if available < need:
        enough = math.ceil(spent + reserve + need)
        detail = ", ".join(f"{c.name} {format_seconds(c.seconds(1))}" for c in costs)
        raise ConfigError(
            f"budget: --budget {format_seconds(budget)} cannot hold the study: {format_seconds(spent)} went to loading and "
            f"measuring, {format_seconds(reserve)} are kept for the final evaluation and report, and one training step "
            f"of each phase with its evaluation takes {detail}; give --budget {enough}s or more"
        )
    low, high = 1, 2
    while sum(c.seconds(high) for c in costs) <= available:  # double, then bisect: the largest N that fits
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if sum(c.seconds(mid) for c in costs) <= available else (low, mid)
    steps = low
    note = None
    epoch = max(c.steps_per_epoch for c in costs)
    if steps < epoch:
        full = math.ceil(spent + reserve + sum(c.seconds(c.steps_per_epoch) for c in costs))
        note = (
            f"budget: --budget {format_seconds(budget)} holds {steps} steps of each phase, {steps / epoch:.2f} of an epoch "
            f"({epoch} steps): each phase trains for a fraction of an epoch; --budget {full}s would give each one epoch"
        )
    return StudyPlan(
        budget, spent, reserve, steps, {c.name: c for c in costs}, {c.name: c.seconds(steps) for c in costs}, note
    )
