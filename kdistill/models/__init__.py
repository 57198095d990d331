"""Model registry: names used in configs and on the command line -> constructors.

Every constructor takes ``num_classes`` as a keyword argument (plus its own options) and
returns a :class:`~kdistill.models.base.KDModel`. Checkpoints record the name and the
arguments, so ``create_model(name, **kwargs)`` rebuilds the model from the file alone.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from kdistill.models import cifar, seed
from kdistill.models.base import KDModel, ModelOutput, count_parameters, forward_all

MODELS: dict[str, Callable[..., KDModel]] = {
    "seed_teacher": seed.seed_teacher,
    "seed_student": seed.seed_student,
    **cifar.MODELS,
}


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(sorted(MODELS))}") from None
    return builder(num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "KDModel", "ModelOutput", "count_parameters", "create_model", "forward_all"]
