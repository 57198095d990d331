"""FitNets, Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep
Nets", ICLR 2015 (arXiv:1412.6550).

A learned regressor r maps the student's *guided* stage f_s (B, C_s, H_s, W_s) onto the
shape of the teacher's *hint* stage f_t (B, C_t, H_t, W_t); the hint loss is their mean
squared error:

    L_hint = mean_{b,c,h,w} ( r(f_s) - f_t )^2

Choices, checked against HobbitLong/RepDistiller (``distiller_zoo/FitNet.py``,
``models/util.py: ConvReg``, ``helper/loops.py``) and mdistiller:

- The regressor is conv 1x1 (C_s -> C_t) + BatchNorm + ReLU. RepDistiller's ``ConvReg`` is
  also conv + BN + ReLU; the ReLU follows the paper, whose regressor ends in the same
  non-linearity as the hint layer (every kdistill stage ends in a ReLU, or a pooling of
  one). ``relu: false`` drops it, for teachers whose stages can be negative.
- Spatial sizes: RepDistiller learns the resampling (a 3x3 stride-2 conv, or a transposed
  conv). Here the student's map is resampled *before* the 1x1 conv instead: adaptive
  average pooling when it is larger than the teacher's, bilinear interpolation when
  smaller. That works for any pair of sizes and keeps the regressor small.
- The mean over all elements (``nn.MSELoss``), not the paper's 1/2 * squared norm; the
  weight ``beta`` = 100 is RepDistiller's and mdistiller's (``-b 100``, FEAT_WEIGHT 100).
- One-stage training (hint loss added to the task's loss from the first step), as both
  reference codebases do; the paper pre-trains the guided layers on the hint first.
- Stages: the paper guides a middle layer of the student with a middle layer of the
  teacher; RepDistiller's ``hint_layer=2`` is the middle of the three stages of the CIFAR
  ResNets/WRNs. The default (``None``) is the middle stage of each model, index L // 2 of
  its L stages: 1 (= -2) for the three-stage ResNets/WRNs, 1 (= -1, the deeper one) for
  the two-stage seed pair. Any index (negative counts from the deepest) can be given.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.methods.shared import resolve_stage
from kdistill.models.base import ModelOutput


def resize_like(f: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, C, H, W) -> (B, C, *size): average pooling to shrink, bilinear to grow."""
    if tuple(f.shape[-2:]) == tuple(size):
        return f
    if f.shape[-2] >= size[0] and f.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(f, size)
    return F.interpolate(f, size=size, mode="bilinear", align_corners=False)


def hint_loss(regressed: Tensor, hint: Tensor) -> Tensor:
    """FitNets hint loss: mean over all elements of (r(f_s) - f_t)^2. Shapes: (B, C_t, H_t, W_t) each."""
    return F.mse_loss(regressed, hint)


class HintRegressor(nn.Module):
    """r: (B, C_s, H_s, W_s) -> (B, C_t, H_t, W_t): resample, conv 1x1, BatchNorm, optional ReLU."""

    def __init__(self, in_channels: int, out_channels: int, size: tuple[int, int], relu: bool = True):
        super().__init__()
        self.size = tuple(size)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)  # BN supplies the bias
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = relu

    def forward(self, f: Tensor) -> Tensor:
        x = self.bn(self.conv(resize_like(f, self.size)))
        return F.relu(x) if self.relu else x


class FitNetsOptions(MethodOptions):
    student_stage: int | None = None
    """Guided stage of the student; None: its middle stage (index L // 2)."""
    teacher_stage: int | None = None
    """Hint stage of the teacher; None: its middle stage (index L // 2)."""
    beta: float = Field(100.0, ge=0)
    """Paper/reference weight of the hint loss, applied inside the term (on top of ``weight``)."""
    relu: bool = True


class FitNets(Method):
    name = "fitnets"
    Options = FitNetsOptions
    needs_features = True

    def __init__(self, options: FitNetsOptions, context: MethodContext):
        super().__init__(options, context)
        self.student_stage = resolve_stage(
            options.student_stage, context.student.features, "student", "fitnets.student_stage"
        )
        self.teacher_stage = resolve_stage(
            options.teacher_stage, context.teacher.features, "teacher", "fitnets.teacher_stage"
        )
        s = context.student.features[self.student_stage]  # (B, C_s, H_s, W_s)
        t = context.teacher.features[self.teacher_stage]  # (B, C_t, H_t, W_t)
        self.regressor = HintRegressor(s.shape[1], t.shape[1], tuple(t.shape[-2:]), options.relu)

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        regressed = self.regressor(student.features[self.student_stage])
        hint = teacher.features[self.teacher_stage]
        return {"fitnets": self.options.beta * hint_loss(regressed.float(), hint.float())}
