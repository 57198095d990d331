"""Decoupled knowledge distillation (DKD), Zhao, Cui, Song, Qiu & Liang, "Decoupled
Knowledge Distillation", CVPR 2022 (arXiv:2203.08679).

KD's KL divergence splits into a target-class part and a non-target part. With
p = softmax(z / T) and target class y:

    b   = [p_y, 1 - p_y]                           binary: target vs all other classes
    p^  = softmax over the non-target logits only  (K - 1 classes, the target left out)

    TCKD = T^2 * KL(b_teacher || b_student)
    NCKD = T^2 * KL(p^_teacher || p^_student)
    L_dkd = min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD),   batch means

(KD itself is TCKD + (1 - p_y^teacher) * NCKD; DKD frees NCKD from that weight.) Defaults
are the paper's CIFAR-100 setting, as in megvii-research/mdistiller (configs and
``mdistiller/engine/cfg.py``): alpha = 1, beta = 8, T = 4, warm-up 20 epochs, and
cross-entropy weight 1 (in kdistill: ``alpha: 1`` and ``ce_weight: 1`` for the run). The
reference configs tune beta per pair (2 for resnet56 -> resnet20) and use beta = 0.5,
T = 1 and a 1-epoch warm-up on ImageNet.

The reference code computes p_y and 1 - p_y from a softmax and takes their log, which is
-inf once 1 - p_y underflows (a confident student), and masks the target by subtracting
1000 from its logit. Here every log-probability comes from logsumexp: log p_y = z_y - lse(z)
and log(1 - p_y) = lse(z without y) - lse(z), and the target never enters NCKD's sums, so
the loss and its gradient stay finite for any finite logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.errors import ConfigError
from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.methods.shared import loss_precision, standardize
from kdistill.models.base import ModelOutput


def _log_parts(logits: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """log [p_y, 1 - p_y] (B, 2) and log p^ (B, K) for one model; p^ is meaningless at y."""
    lse_all = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
    # exp(-inf) = 0: the target adds nothing to the sum, nor gets a gradient through it
    lse_other = torch.logsumexp(logits.masked_fill(target_mask, float("-inf")), dim=1, keepdim=True)
    log_target = logits.masked_select(target_mask).view(-1, 1)  # (B, 1): z_y
    log_binary = torch.cat([log_target - lse_all, lse_other - lse_all], dim=1)  # (B, 2)
    log_non_target = logits - lse_other  # (B, K): finite everywhere, used at j != y only
    return log_binary, log_non_target


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """(alpha * TCKD, beta * NCKD), batch means, both including T^2; their sum is L_dkd
    without warm-up. Shapes: logits (B, K) with K >= 2, target (B,) int64."""
    s = student_logits / temperature
    t = teacher_logits / temperature
    target_mask = F.one_hot(target, s.shape[1]).bool()  # (B, K)
    log_bs, log_ps = _log_parts(s, target_mask)
    log_bt, log_pt = _log_parts(t, target_mask)
    batch = s.shape[0]

    # KL(b_t || b_s) = sum b_t * (log b_t - log b_s), both entries finite
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum() / batch
    # KL(p^_t || p^_s) over j != y: the teacher's weight is set to 0 at the target, where
    # the difference of log-probabilities is finite, so the product is exactly 0
    weights = log_pt.exp().masked_fill(target_mask, 0.0)
    nckd = (weights * (log_pt - log_ps)).sum() / batch
    scale = temperature**2
    return alpha * scale * tckd, beta * scale * nckd


def scaled_warmup_epochs(epochs: int) -> float:
    """The paper's warm-up (20 of its 240 epochs) scaled to a schedule of ``epochs``."""
    return round(20 / 240 * epochs, 2)


def dkd_warmup(epoch: float, warmup_epochs: float) -> float:
    """Linear ramp of the DKD weight: min(epoch / warmup, 1); 1 when warmup is 0.

    ``epoch`` is fractional and starts at 0. (mdistiller counts epochs from 1 and ramps
    per epoch, so its factor is 1/20 during the first epoch; here it rises from 0 step by
    step and reaches 1 at the same point, the end of epoch ``warmup``.)
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(epoch / warmup_epochs, 1.0)


class DKDOptions(MethodOptions):
    alpha: float = Field(1.0, ge=0)
    """Weight of TCKD (target vs non-target)."""
    beta: float = Field(8.0, ge=0)
    """Weight of NCKD (among the non-target classes)."""
    temperature: float = Field(4.0, gt=0, le=100)
    warmup_epochs: float | None = Field(None, ge=0)
    """The DKD terms ramp up linearly over this many epochs (0: no warm-up). None: the
    paper's 20 of its 240 epochs, scaled to the run (1.25 for 15 epochs). A warm-up longer
    than the run is refused: DKD would never reach full weight."""
    logit_std: bool = False
    """Z-score each row of both models' logits before the temperature (Sun et al., CVPR 2024)."""


class DKD(Method):
    name = "dkd"
    Options = DKDOptions

    def __init__(self, options: DKDOptions, context: MethodContext):
        super().__init__(options, context)
        problem = self.check_run(options, context.epochs) if context.epochs_fixed else None
        if problem:
            raise ConfigError(f"{self.name}.{problem}")
        self.warmup_epochs = options.warmup_epochs
        if self.warmup_epochs is None:
            self.warmup_epochs = scaled_warmup_epochs(context.epochs)

    @classmethod
    def check_run(cls, options: DKDOptions, epochs: int) -> str | None:
        if options.warmup_epochs is not None and options.warmup_epochs > epochs:
            return (
                f"warmup_epochs: {options.warmup_epochs:g} is longer than the run's {epochs} epochs, so the {cls.name} terms "
                f"would never reach full weight; use at most {epochs} (0: no warm-up; unset: the paper's 20/240 of the run, "
                f"{scaled_warmup_epochs(epochs):g} epochs)"
            )
        return None

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        o = self.options
        s, t = loss_precision(student.logits, teacher.logits)
        if o.logit_std:
            s, t = standardize(s), standardize(t)
        tckd, nckd = dkd_loss(s, t, labels, o.alpha, o.beta, o.temperature)
        ramp = dkd_warmup(epoch, self.warmup_epochs)
        return {"dkd_tckd": ramp * tckd, "dkd_nckd": ramp * nckd}
