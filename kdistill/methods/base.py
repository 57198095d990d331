"""What a distillation method is, for the engine.

A method is an ``nn.Module`` built from its validated options and a :class:`MethodContext`
(the shapes of the student's and teacher's outputs, the data set size). Its ``forward``
receives both models' outputs for one batch and returns a dict of *named, unweighted*
loss terms; the :class:`~kdistill.tasks.Distillation` task weights, sums and logs them.
Methods with parameters of their own (a FitNets regressor, CRD embeddings) register them
as submodules: they are trained with the student and saved in its checkpoints.

A method declares what it takes and needs instead of being special-cased elsewhere: its
``Options`` (the CLI, the API and sweeps ask :meth:`Method.takes` whether it has a
``temperature``, a ``logit_std``, ...) and ``needs_features`` (stage features / pre-logits
of both models, so the teacher must run live, not from a cache of its logits).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field
from torch import Tensor, nn

from kdistill.configbase import StrictConfig
from kdistill.models.base import ModelOutput


class MethodOptions(StrictConfig):
    """Options every method accepts; subclasses add their hyperparameters with defaults."""

    weight: float = Field(1.0, ge=0)


@dataclass(frozen=True)
class MethodContext:
    student: ModelOutput  # outputs of the student for a dummy batch: shapes only
    teacher: ModelOutput  # same for the teacher
    num_classes: int
    num_samples: int  # training set size (index-based methods such as CRD)
    epochs: int  # length of the distillation run (for warm-ups defined in epochs)
    epochs_fixed: bool = True  # False: a time budget plans the run's length, ``epochs`` is a guess


class Method(nn.Module, ABC):
    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_features: ClassVar[bool] = False

    def __init__(self, options: MethodOptions, context: MethodContext):
        super().__init__()
        self.options = options

    @classmethod
    def check_run(cls, options: MethodOptions, epochs: int) -> str | None:
        """Why ``options`` cannot take effect in a run of ``epochs`` epochs (None: they can).
        Called when a config is loaded, so that such a setting is refused before any work."""
        return None

    @classmethod
    def takes(cls, option: str) -> bool:
        """Whether the method has the option ``option`` (e.g. ``temperature``)."""
        return option in cls.Options.model_fields

    @abstractmethod
    def forward(
        self, student: ModelOutput, teacher: ModelOutput, labels: Tensor, indices: Tensor, epoch: float
    ) -> dict[str, Tensor]:
        """Loss terms for one batch. ``epoch`` is fractional (e.g. 2.5 = halfway through the third)."""
