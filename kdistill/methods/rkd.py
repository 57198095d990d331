"""Relational knowledge distillation, Park, Kim, Lu & Cho, "Relational Knowledge
Distillation", CVPR 2019 (arXiv:1904.05068).

The student mimics the *relations* between the teacher's embeddings of a batch, not the
embeddings themselves, so the two embedding sizes may differ. For embeddings e (B, D):

distance potential, pairwise Euclidean distances normalised by their mean over the
B(B-1) distinct pairs (which makes the term scale-invariant):

    psi_D(i, j) = ||e_i - e_j||_2 / mu,   mu = mean_{i != j} ||e_i - e_j||_2

angle potential, the cosine of the angle at anchor a of every triplet (a, b, c):

    psi_A(a, b, c) = < (e_b - e_a) / ||e_b - e_a||, (e_c - e_a) / ||e_c - e_a|| >

    L_rkd = w_d * mean_{i,j} huber(psi_D^s - psi_D^t) + w_a * mean_{a,b,c} huber(psi_A^s - psi_A^t)

with huber = smooth L1 (threshold 1), w_d = 25 and w_a = 50 (the paper's CIFAR weights).
The two terms are returned separately ("rkd_distance", "rkd_angle"), each already
multiplied by its weight, so ``weight`` scales both.

Conventions checked against HobbitLong/RepDistiller (``distiller_zoo/RKD.py``, the
authors' own formulation; ``helper/loops.py``: the pooled features ``feat[-1]``, i.e. the
pre-logits here): the Huber means run over all B^2 pairs and B^3 triplets, including the
degenerate ones (i = j, or a repeated index), where both potentials are exactly 0 (a zero
difference vector normalises to 0) and contribute nothing but the count. The reference
takes the distance mean over pairs with d > 0; here it is over i != j (the same unless two
samples of a batch are identical).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.methods.shared import EmbeddingMethod, EmbeddingOptions
from kdistill.models.base import ModelOutput

_EPS = 1e-12


def distance_potential(e: Tensor) -> Tensor:
    """(B, D) -> (B, B): pairwise Euclidean distances over their mean on the distinct pairs; 0 on the diagonal."""
    b = e.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=e.device)
    diff = e.unsqueeze(1) - e.unsqueeze(0)  # (B, B, D): e_i - e_j
    # clamp before the square root: its gradient is infinite at 0 (the diagonal, masked anyway)
    d = diff.pow(2).sum(-1).clamp_min(_EPS).sqrt() * off
    mu = d[off].mean().clamp_min(_EPS)
    return d / mu


def angle_potential(e: Tensor) -> Tensor:
    """(B, D) -> (B, B, B): [a, b, c] = cosine of the angle at e_a between e_b and e_c (0 if degenerate)."""
    v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # (B, B, D): v[a, b] = unit(e_b - e_a)
    return torch.bmm(v, v.transpose(1, 2))


def rkd_distance_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """mean over the B^2 pairs of smooth_l1(psi_D(e_s) - psi_D(e_t)). e_s: (B, D_s), e_t: (B, D_t)."""
    return F.smooth_l1_loss(distance_potential(e_s), distance_potential(e_t))


def rkd_angle_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """mean over the B^3 triplets of smooth_l1(psi_A(e_s) - psi_A(e_t)). e_s: (B, D_s), e_t: (B, D_t)."""
    return F.smooth_l1_loss(angle_potential(e_s), angle_potential(e_t))


class RKDOptions(EmbeddingOptions):
    distance_weight: float = Field(25.0, ge=0)
    angle_weight: float = Field(50.0, ge=0)


class RKD(EmbeddingMethod):
    name = "rkd"
    Options = RKDOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        e_s, e_t = self.embeddings(student, teacher)  # (B, D) float32 each
        o = self.options
        with torch.autocast(e_s.device.type, enabled=False):  # cosines and distances in float32
            return {
                "rkd_distance": o.distance_weight * rkd_distance_loss(e_s, e_t),
                "rkd_angle": o.angle_weight * rkd_angle_loss(e_s, e_t),
            }
