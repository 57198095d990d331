"""DIST, Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022 (arXiv:2205.10536).

Instead of matching probabilities exactly (KL), DIST matches their *relations* with the
Pearson correlation rho, which ignores shifts and scales and so tolerates a teacher much
more confident than the student. With Y = softmax(Z / T) for each model, (B, K):

    inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])    per sample, across the K classes
    intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])    per class, across the B samples of the batch
    L_dist = beta * T^2 * inter + gamma * T^2 * intra

    rho(u, v) = sum (u - mean u)(v - mean v) / (||u - mean u|| * ||v - mean v|| + eps)

with eps = 1e-8 as in the reference (hunto/image_classification_sota,
``lib/models/losses/dist_kd.py``). The intra-class term is computed over the current
batch, so it depends on the batch size (it is 1 for a batch of one image).

Defaults beta = gamma = 1, T = 1 are the official ``dist`` loss (the ImageNet baseline,
``DIST(beta=1, gamma=1, tau=1)`` in the reference's ``kd_loss.py``, which also offers
``dist_t<T>``). For CIFAR-100 hunto/DIST_KD points to ``configs/strategies/distill/dist_cifar.yaml``,
which could not be read here; third-party runs of it use ``dist_t4``, i.e. T = 4 with the
same beta and gamma. Unverified: check that file (and its loss weight) before quoting it.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdistill.methods.base import Method, MethodOptions
from kdistill.methods.shared import loss_precision
from kdistill.models.base import ModelOutput


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``: (N, D) -> (N,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    gamma: float,
    temperature: float,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """(beta * T^2 * inter, gamma * T^2 * intra); their sum is L_dist. Logits (B, K) each.
    ``eps`` keeps rho finite for a constant row or column (then rho = 0)."""
    y_s = F.softmax(student_logits / temperature, dim=1)
    y_t = F.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - pearson_rows(y_s, y_t, eps).mean()  # rows: samples
    intra = 1 - pearson_rows(y_s.t(), y_t.t(), eps).mean()  # rows of the transpose: classes
    scale = temperature**2
    return beta * scale * inter, gamma * scale * intra


class DISTOptions(MethodOptions):
    beta: float = Field(1.0, ge=0)
    """Weight of the inter-class relation (per sample, across classes)."""
    gamma: float = Field(1.0, ge=0)
    """Weight of the intra-class relation (per class, across the batch)."""
    temperature: float = Field(1.0, gt=0, le=100)


class DIST(Method):
    name = "dist"
    Options = DISTOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        o = self.options
        s, t = loss_precision(student.logits, teacher.logits)
        inter, intra = dist_loss(s, t, o.beta, o.gamma, o.temperature)
        return {"dist_inter": inter, "dist_intra": intra}
