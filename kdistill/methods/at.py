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

from kdistill.methods.shared import StagePairMethod, StagePairOptions
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


class ATOptions(StagePairOptions):
    p: float = Field(2.0, gt=0)
    beta: float = Field(1000.0, ge=0)
    """Paper/reference weight, applied inside the term (on top of ``weight``)."""


class AT(StagePairMethod):
    name = "at"
    Options = ATOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        total = sum(at_loss(f_s, f_t, self.options.p) for f_s, f_t in self.stage_pairs(student, teacher))
        return {"at": self.options.beta * total}
