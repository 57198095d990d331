"""Attention transfer, Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving
the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017
(arXiv:1612.03928).

The (activation-based) attention map of a stage output f (B, C, H, W) is the channel mean
of |f|^p, flattened and L2-normalised per sample:

    a(f) = q / ||q||_2,   q = mean_c |f_c|^p  in R^{H*W}        (p = 2)

and the loss sums, over the chosen stage pairs j, the mean squared difference of the maps:

    L_at = beta * sum_j mean_{b,k} ( a(f_s^j) - a(f_t^j) )_{bk}^2

Conventions, checked against HobbitLong/RepDistiller (``distiller_zoo/AT.py``,
``helper/loops.py``) and mdistiller (``distillers/AT.py``), which agree with the authors'
code (szagoruyko/attention-transfer):

- The channel *mean* (the paper writes a sum): the constant 1/C cancels in the normalisation.
- The mean over the B*H*W map elements per pair, then a *sum* over pairs, scaled by
  ``beta`` = 1000 (RepDistiller's ``-b 1000``, mdistiller's FEAT_WEIGHT; the paper's
  beta/2 with beta = 1000 on the same sum). With a sum, adding stages adds terms.
- Different spatial sizes: the larger of the two *feature maps* is average-pooled to the
  smaller size before the maps are taken (as both references do), never upsampled.
- Stages: RepDistiller uses every residual stage (``feat[1:-1]``). Here the default pairs
  the deepest min(L_s, L_t) stages from the deep end: (-1, -1), (-2, -2), ...
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.methods.shared import stage_pairs
from kdistill.models.base import ModelOutput


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """(B, C, H, W) -> (B, H*W): the channel mean of |f|^p, L2-normalised per sample."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """One stage pair: mean_{b,k} (a(f_s) - a(f_t))^2. f_s: (B, C_s, H_s, W_s), f_t: (B, C_t, H_t, W_t);
    the larger map is average-pooled to the smaller one's size first."""
    size = (min(f_s.shape[-2], f_t.shape[-2]), min(f_s.shape[-1], f_t.shape[-1]))
    if tuple(f_s.shape[-2:]) != size:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    if tuple(f_t.shape[-2:]) != size:
        f_t = F.adaptive_avg_pool2d(f_t, size)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


class ATOptions(MethodOptions):
    student_stages: list[int] | None = None
    """Stage indices of the student; None: the deepest min(L_s, L_t) stages."""
    teacher_stages: list[int] | None = None
    """Paired with ``student_stages``; None: the same indices as the student's."""
    p: float = Field(2.0, gt=0)
    beta: float = Field(1000.0, ge=0)
    """Paper/reference weight, applied inside the term (on top of ``weight``)."""


class AT(Method):
    name = "at"
    Options = ATOptions
    needs_features = True

    def __init__(self, options: ATOptions, context: MethodContext):
        super().__init__(options, context)
        self.pairs = stage_pairs(options.student_stages, options.teacher_stages, context, "at")

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        p = self.options.p
        total = sum(at_loss(student.features[i].float(), teacher.features[j].float(), p) for i, j in self.pairs)
        return {"at": self.options.beta * total}
