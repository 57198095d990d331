"""Logit standardisation, Sun, Ren, Li, Wang & Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024 (arXiv:2403.01427).

Before the temperature, each row of the teacher's and the student's logits is z-scored:

    Z(z) = (z - mean(z)) / (std(z) + eps),        mean and std over the K classes

    L_ls = T^2 * KL( softmax(Z(t) / T) || softmax(Z(s) / T) ),   averaged over the batch

so the student has to match the teacher's logit *relations*, not their range: the
effective temperature of each sample becomes T * std(z), different for teacher and student
and for every sample. The paper calls T the *base* temperature; since Z(z) has unit
standard deviation, T is much smaller than in plain KD. Its CIFAR-100 recipe is T = 2
(3 for some pairs) with the KD term weighted 9 against 0.1 for cross-entropy
(sunshangquan/logit-standardization-KD, README and tools/train.py).

``standardize`` is also an option (``logit_std``) of ``kd`` and ``dkd``; the method ``ls``
is ``kd`` with ``logit_std: true`` by default.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdistill.methods.kd import KD, KDOptions


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row of ``logits`` (B, K): (z - mean) / (std + eps), over the last dim.

    ``std`` uses Bessel's correction (divides by K - 1), as ``Tensor.std`` in the reference
    code. A constant row (std 0) maps to zeros with finite gradients: the variance is
    clamped at eps^2 before the square root, whose derivative is infinite at 0.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    centered = logits - mean
    var = centered.square().sum(dim=-1, keepdim=True) / max(logits.shape[-1] - 1, 1)
    std = torch.sqrt(var.clamp_min(eps * eps))
    return centered / (std + eps)


class LogitStdKDOptions(KDOptions):
    logit_std: bool = True
    temperature: float = Field(2.0, gt=0, le=100)  # the paper's base temperature on CIFAR-100


class LogitStdKD(KD):
    """``kd`` on z-scored logits (see the module docstring)."""

    name = "ls"
    Options = LogitStdKDOptions
