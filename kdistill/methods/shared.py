"""Helpers that several methods share: which stages a feature method reads, logits in a
precision fit for a loss, and logit standardisation (an option of kd and dkd).

Stage indices follow Python's: ``-1`` is the deepest stage, ``0`` the shallowest; a
model's stages are its ``ModelOutput.features`` (see :mod:`kdistill.models.base`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from kdistill.errors import ConfigError
from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.models.base import ModelOutput


def resolve_stage(index: int | None, features: list[Tensor], who: str, option: str) -> int:
    """``index`` (negative counts from the deepest stage; None: the middle one, L // 2) as a
    position in ``features``, or a ConfigError naming the option and the valid range."""
    n = len(features)
    if n == 0:
        raise ConfigError(
            f"{option}: the {who} exposes no stage features; feature methods need a kdistill model (KDModel)"
        )
    if index is None:
        return n // 2
    if not -n <= index < n:
        raise ConfigError(f"{option}={index}: the {who} has {n} stages (valid indices {-n}..{n - 1})")
    return index % n


def stage_pairs(
    student_stages: list[int] | None, teacher_stages: list[int] | None, context: MethodContext, method: str
) -> list[tuple[int, int]]:
    """Resolved (student, teacher) stage positions; default: the deepest min(L_s, L_t), paired from the deep end."""
    if student_stages is None and teacher_stages is None:
        n = min(len(context.student.features), len(context.teacher.features))
        student_stages = teacher_stages = list(range(-n, 0))
    student_stages = student_stages if student_stages is not None else teacher_stages
    teacher_stages = teacher_stages if teacher_stages is not None else student_stages
    if len(student_stages) != len(teacher_stages):
        raise ConfigError(
            f"{method}: student_stages {student_stages} and teacher_stages {teacher_stages} must pair up (same length)"
        )
    if not student_stages:
        raise ConfigError(f"{method}: no stage pairs (do both models expose stage features?)")
    s = [resolve_stage(i, context.student.features, "student", f"{method}.student_stages") for i in student_stages]
    t = [resolve_stage(i, context.teacher.features, "teacher", f"{method}.teacher_stages") for i in teacher_stages]
    return list(zip(s, t))


class Embeddings:
    """What a relational method (PKT, RKD) compares: both models' pre-logit embeddings
    (``stage=None``), or one stage of each, flattened to (B, D)."""

    def __init__(self, stage: int | None, context: MethodContext, method: str):
        self.student_stage = self.teacher_stage = None
        if stage is not None:
            self.student_stage = resolve_stage(stage, context.student.features, "student", f"{method}.stage")
            self.teacher_stage = resolve_stage(stage, context.teacher.features, "teacher", f"{method}.stage")

    def __call__(self, student: ModelOutput, teacher: ModelOutput) -> tuple[Tensor, Tensor]:
        if self.student_stage is None:
            x_s, x_t = student.pre_logits, teacher.pre_logits
        else:
            x_s, x_t = student.features[self.student_stage], teacher.features[self.teacher_stage]
        return x_s.flatten(1).float(), x_t.flatten(1).float()


class StagePairOptions(MethodOptions):
    student_stages: list[int] | None = None
    """Stage indices of the student; None: the deepest min(L_s, L_t) stages."""
    teacher_stages: list[int] | None = None
    """Paired with ``student_stages``; None: the same indices as the student's."""


class StagePairMethod(Method):
    """A method that compares pairs of stages (AT, SP): the pairs are resolved once, from
    ``student_stages`` and ``teacher_stages``."""

    needs_features = True

    def __init__(self, options: StagePairOptions, context: MethodContext):
        super().__init__(options, context)
        self.pairs = stage_pairs(options.student_stages, options.teacher_stages, context, self.name)

    def stage_pairs(self, student: ModelOutput, teacher: ModelOutput) -> Iterator[tuple[Tensor, Tensor]]:
        """The paired stage outputs (student, teacher), in float32."""
        for i, j in self.pairs:
            yield student.features[i].float(), teacher.features[j].float()


class EmbeddingOptions(MethodOptions):
    stage: int | None = None
    """None: the pre-logit embeddings; an index: that stage, flattened."""


class EmbeddingMethod(Method):
    """A method that relates the samples of a batch through their embeddings (PKT, RKD):
    ``self.embeddings(student, teacher)`` gives both as (B, D) float32."""

    needs_features = True

    def __init__(self, options: EmbeddingOptions, context: MethodContext):
        super().__init__(options, context)
        self.embeddings = Embeddings(options.stage, context, self.name)


def loss_precision(*logits: Tensor) -> tuple[Tensor, ...]:
    """Logits in float32 at least: bf16 under autocast is raised, float64 kept (the tests'
    exact checks run in float64)."""
    return tuple(x.to(torch.promote_types(x.dtype, torch.float32)) for x in logits)


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024; see :mod:`kdistill.methods.logit_std`):
    z-score each row of ``logits`` (B, K): (z - mean) / (std + eps), over the last dim.

    ``std`` uses Bessel's correction (divides by K - 1), as ``Tensor.std`` in the reference
    code. A constant row (std 0) maps to zeros with finite gradients: the variance is
    clamped at eps^2 before the square root, whose derivative is infinite at 0.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    centered = logits - mean
    var = centered.square().sum(dim=-1, keepdim=True) / max(logits.shape[-1] - 1, 1)
    std = torch.sqrt(var.clamp_min(eps * eps))
    return centered / (std + eps)
