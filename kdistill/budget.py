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

Before the first epoch end, ``o`` is estimated as the evaluation images' forward passes
at a third of a training step's per-image cost (a forward is about a third of
forward + backward).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WARMUP_STEPS = 3  # not timed: first steps allocate buffers, fill caches, maybe compile
REPLAN_FRACTION = 0.05  # re-plan every 5% of the budget


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
    ):
        self.seconds = seconds
        self.steps_per_epoch = steps_per_epoch
        self.eval_images = eval_images
        self.batch_size = batch_size
        self.max_steps = max_steps
        self.clock = clock
        self.sync = sync
        self.start = clock() - elapsed  # a resumed run has already spent ``elapsed``
        # provisional until the first plan: the schedule stays at its very beginning
        self.total_steps = max_steps or steps_per_epoch * 1_000_000
        self.planned = False
        self.finished = False
        self.step_seconds: float | None = None
        self.epoch_overhead: float | None = None
        self._seen = 0  # steps observed by this process
        self._mark: tuple[int, float, float] | None = None  # (steps done, time, overhead so far)
        self._overhead = 0.0  # seconds spent outside training steps (evaluation, checkpoints)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def _expected_overhead(self) -> float:
        if self.epoch_overhead is not None:
            return self.epoch_overhead
        if self.step_seconds is None:
            return 0.0
        return self.eval_images / self.batch_size * self.step_seconds / 3

    def _plan(self, done: int) -> None:
        r, o, S = self.step_seconds, self._expected_overhead(), self.steps_per_epoch
        remaining = self.seconds - self.elapsed()
        k = max(0, int((remaining - o) / (r + o / S)))
        total = done + k
        self.total_steps = min(total, self.max_steps) if self.max_steps else total
        self.planned = True

    def after_step(self, done: int) -> None:
        """``done``: optimizer steps finished so far (global count)."""
        self._seen += 1
        if self.finished:
            return
        if self._mark is None:
            if self._seen >= WARMUP_STEPS:
                self.sync()
                self._mark = (done, self.clock(), self._overhead)
            return
        s0, t0, o0 = self._mark
        n = done - s0
        window = REPLAN_FRACTION * self.seconds if self.planned else min(max(0.02 * self.seconds, 0.5), 0.2 * self.seconds)
        if n >= (1 if self.planned else 5) and self.clock() - t0 - (self._overhead - o0) >= window:
            self.sync()
            now = self.clock()
            self.step_seconds = (now - t0 - (self._overhead - o0)) / n
            self._plan(done)
            self._mark = (done, now, self._overhead)
        # safety net: never start a step that would end past the budget (final evaluation included)
        if self.planned and self.elapsed() + (self.step_seconds or 0.0) + self._expected_overhead() > self.seconds:
            self.total_steps = min(self.total_steps, done)
        if done >= self.total_steps:
            self.finished = True

    def epoch_end(self, overhead_seconds: float, done: int) -> None:
        """The evaluation and checkpoint at an epoch end took ``overhead_seconds``."""
        self._overhead += overhead_seconds
        self.epoch_overhead = overhead_seconds
        if done >= self.total_steps:
            self.finished = True
        elif self.planned:
            self._plan(done)

    def state(self) -> dict[str, Any]:
        """For the checkpoint: a resumed run continues with the budget that is left."""
        return {
            "seconds": self.seconds, "elapsed": self.elapsed(), "total_steps": self.total_steps, "planned": self.planned,
            "step_seconds": self.step_seconds, "epoch_overhead": self.epoch_overhead,
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
