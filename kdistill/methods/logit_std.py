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

The z-scoring (``standardize``, in :mod:`kdistill.methods.shared`) is also an option
(``logit_std``) of ``kd`` and ``dkd``; the method ``ls`` is ``kd`` with ``logit_std: true``
by default.
"""

from __future__ import annotations

from pydantic import Field

from kdistill.methods.kd import KD, KDOptions


class LogitStdKDOptions(KDOptions):
    logit_std: bool = True
    temperature: float = Field(2.0, gt=0, le=100)  # the paper's base temperature on CIFAR-100


class LogitStdKD(KD):
    """``kd`` on z-scored logits (see the module docstring)."""

    name = "ls"
    Options = LogitStdKDOptions
