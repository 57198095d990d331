"""Several teachers as one: the target of multi-teacher distillation.

The distillation target is the (weighted) average of the teachers' *softened* outputs,
p = sum_i w_i softmax(t_i / T). The ensemble returns logits z = T * log(p), so that
softmax(z / T) == p exactly: every logit-based method (KD at the same T) sees the averaged
soft targets without knowing that there are several teachers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TeacherEnsemble(nn.Module):
    def __init__(self, teachers: list[nn.Module], weights: list[float] | None = None, temperature: float = 1.0):
        super().__init__()
        if len(teachers) < 1:
            raise ValueError("a teacher ensemble needs at least one teacher")
        weights = weights or [1.0] * len(teachers)
        if len(weights) != len(teachers) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"teacher weights {weights} must be {len(teachers)} non-negative numbers with a positive sum"
            )
        self.teachers = nn.ModuleList(teachers)
        total = sum(weights)
        self.register_buffer(
            "log_weights", torch.tensor([math.log(w / total) if w > 0 else -math.inf for w in weights])
        )
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        T = self.temperature
        # (M, B, K) log-probabilities at temperature T, mixed in log space for stability
        logp = torch.stack([torch.log_softmax(t(x).float() / T, dim=1) for t in self.teachers])
        mixed = torch.logsumexp(logp + self.log_weights.view(-1, 1, 1), dim=0)  # log sum_i w_i p_i
        return T * mixed
