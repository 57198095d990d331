"""Similarity-preserving distillation, Tung & Mori, "Similarity-Preserving Knowledge
Distillation", ICCV 2019 (arXiv:1907.09682).

For a stage output f (B, C, H, W), flattened to Q (B, C*H*W), the batch similarity matrix
is G = Q Q^T (B, B) with each row L2-normalised. Samples that the teacher sees as similar
should look similar to the student:

    L_sp = gamma / B^2 * sum_j || G_s^j - G_t^j ||_F^2          (sum over stage pairs j)

Student and teacher may differ in channels and spatial size: G is always B x B.
Checked against HobbitLong/RepDistiller (``distiller_zoo/SP.py``: row-wise
``F.normalize``, squared differences summed and divided by B^2, summed over pairs;
``helper/loops.py``: the last stage before pooling, ``feat[-2]``, i.e. ``-1`` here) and its
script's weight ``-b 3000`` (the paper's gamma = 3000 for CIFAR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.methods.shared import StagePairMethod, StagePairOptions
from kdistill.models.base import ModelOutput


def similarity_matrix(f: Tensor) -> Tensor:
    """(B, ...) -> (B, B): G = Q Q^T of the flattened features, rows L2-normalised."""
    q = f.flatten(1)  # (B, D)
    return F.normalize(q @ q.t(), dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """One stage pair: ||G_s - G_t||_F^2 / B^2. f_s: (B, ...), f_t: (B, ...), any feature shapes."""
    b = f_s.shape[0]
    return (similarity_matrix(f_s) - similarity_matrix(f_t)).pow(2).sum() / (b * b)


class SPOptions(StagePairOptions):
    student_stages: list[int] | None = [-1]
    """Stage indices of the student (default: the deepest)."""
    gamma: float = Field(3000.0, ge=0)
    """Paper weight, applied inside the term (on top of ``weight``)."""


class SP(StagePairMethod):
    name = "sp"
    Options = SPOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        with torch.autocast(student.logits.device.type, enabled=False):  # B x B Gram matrices in float32
            total = sum(sp_loss(f_s, f_t) for f_s, f_t in self.stage_pairs(student, teacher))
        return {"sp": self.options.gamma * total}
