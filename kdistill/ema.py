"""An exponential moving average of a model's weights (Polyak averaging, as in the fast
CIFAR-10 recipes: hlb-CIFAR10, airbench), kept on the model's device.

After every ``cfg.every``-th optimizer step, with ``d`` the decay of this update:

    avg <- d * avg + (1 - d) * weights        (one ``torch._foreach_lerp_`` over all tensors)

for the parameters and the floating-point buffers alike: batch-norm running statistics are
averaged too (as timm's ModelEmaV2 does), so that they match the averaged weights about as
well as the live ones match the live weights; integer buffers (``num_batches_tracked``) are
copied. With ``cfg.warmup`` the n-th update (n = 0, 1, ...) uses d = min(decay, (1 + n) / (10 + n)).

The average starts from the weights it is given (the initial ones). :meth:`WeightAverage.applied`
lends the model the averaged weights (to evaluate or save them) and gives its own back, bit
for bit; :meth:`WeightAverage.copy_to` makes them the model's for good (at the end of training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from kdistill.config import EmaConfig


class WeightAverage:
    """The average of ``model``'s state (its ``state_dict`` entries, same keys)."""

    def __init__(self, model: nn.Module, cfg: EmaConfig):
        self.cfg = cfg
        self.updates = 0  # how many updates the average has had
        state = model.state_dict()  # detached tensors sharing the model's storage
        self.keys = list(state)
        self.live = list(state.values())
        self.average = [t.detach().clone() for t in self.live]
        floating = [t.is_floating_point() for t in self.live]
        self._live_f = [t for t, f in zip(self.live, floating) if f]
        self._avg_f = [t for t, f in zip(self.average, floating) if f]
        self._live_i = [t for t, f in zip(self.live, floating) if not f]
        self._avg_i = [t for t, f in zip(self.average, floating) if not f]

    def decay(self) -> float:
        """The decay of the next update."""
        d = self.cfg.decay
        return min(d, (1 + self.updates) / (10 + self.updates)) if self.cfg.warmup else d

    @torch.no_grad()
    def after_step(self, steps_done: int) -> None:
        """The run has taken ``steps_done`` optimizer steps: update when it is due."""
        if steps_done % self.cfg.every:
            return
        weight = 1.0 - self.decay()
        if self._avg_f:
            torch._foreach_lerp_(self._avg_f, self._live_f, weight)
        for a, t in zip(self._avg_i, self._live_i):
            a.copy_(t)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self, keep_changes: bool = False) -> Iterator[None]:
        """Inside the block the model holds the averaged weights; after it, its own again.
        ``keep_changes``: what the block did to them (the ranks' batch-norm statistics
        averaged) is kept in the average."""
        with torch.no_grad():
            own = [t.clone() for t in self.live]
            torch._foreach_copy_(self.live, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                if keep_changes:
                    torch._foreach_copy_(self.average, self.live)
                torch._foreach_copy_(self.live, own)

    @torch.no_grad()
    def copy_to(self) -> None:
        """The model takes the averaged weights for good."""
        torch._foreach_copy_(self.live, self.average)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's ``state_dict``."""
        return dict(zip(self.keys, self.average))

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], updates: int) -> None:
        """Restore the average from a checkpoint (keys like the model's)."""
        for k, a in zip(self.keys, self.average):  # a missing key: KeyError(key)
            a.copy_(state[k])
        self.updates = int(updates)
