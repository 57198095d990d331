"""Knowledge distillation, Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015 (arXiv:1503.02531).

    L_kd = T^2 * KL( softmax(t / T) || softmax(s / T) ),   averaged over the batch

The T^2 factor keeps the gradient's magnitude roughly independent of T (the soft
targets' gradients scale as 1/T^2). The hard-label term (1 - alpha) * CE(y, s) is added by
the distillation task, so ``alpha`` means the same thing for every method.

With ``logit_std: true`` both models' logits are z-scored per sample before the
temperature (Sun et al., CVPR 2024; see :mod:`kdistill.methods.logit_std`).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.methods.base import Method, MethodOptions
from kdistill.methods.shared import standardize
from kdistill.models.base import ModelOutput


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(p_t || p_s) with p = softmax(logits / T), batch mean. Shapes: (B, K) each."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KDOptions(MethodOptions):
    temperature: float = Field(4.0, gt=0, le=100)
    logit_std: bool = False
    """Z-score each row of both models' logits before the temperature (logit standardisation)."""


class KD(Method):
    name = "kd"
    Options = KDOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        s, t = student.logits, teacher.logits.float()
        if self.options.logit_std:
            s, t = standardize(s.float()), standardize(t)
        # keyed by the method's name, so "kd" and its subclass "ls" can run side by side
        return {self.name: kd_loss(s, t, self.options.temperature)}
