"""Model registry: names used in configs and on the command line -> constructors.

Every zoo constructor takes ``num_classes`` as a keyword argument (plus its own options) and
returns a :class:`~kdistill.models.base.KDModel`. A name with a prefix (``timm:resnet18``,
``hf:<folder>``, ``torchscript:<file>``, ``pkg.module:factory``, ...) comes from another
library or file (:mod:`kdistill.models.sources`). Checkpoints record the name, the
arguments and the source's record, so :func:`build` rebuilds the model from the file alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from kdistill.errors import ConfigError
from kdistill.models import cifar, fast, seed
from kdistill.models.base import KDModel, ModelOutput, check_logits, count_parameters, forward_all
from kdistill.models.sources import SYNTAX, ModelSource, is_source, load_weights, parse_source

MODELS: dict[str, Callable[..., KDModel]] = {
    "seed_teacher": seed.seed_teacher,
    "seed_student": seed.seed_student,
    **cifar.MODELS,
    **fast.MODELS,
}


class UnknownModel(ConfigError, ValueError):
    """A model name that is neither in the zoo nor a well-formed source (a ValueError too,
    as create_model raised before sources existed)."""


def check_name(name: str) -> str:
    """A model name as a config or the command line gives it, checked without importing any
    library: a zoo name or a well-formed source. ValueError (one line) otherwise."""
    if is_source(name):
        parse_source(name)
        return name
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of: {', '.join(sorted(MODELS))}, or a source: {SYNTAX}")
    return name


def source_of(name: str) -> ModelSource | None:
    """The source of a prefixed name (None for a zoo name)."""
    return parse_source(name) if is_source(name) else None


def create_model(
    name: str, num_classes: int = 10, *, pretrained: bool = False, weights: str | Path | None = None, **kwargs
) -> nn.Module:
    """A model by name: ``create_model("seed_student")``, ``create_model("timm:resnet18",
    num_classes=10, pretrained=True)``, ``create_model("mypkg.models:make", weights="w.pt")``.
    ``pretrained`` uses the library's own weights; ``weights`` loads a state dict file."""
    return build(name, num_classes, kwargs, pretrained=pretrained, weights=weights)[0]


def build(
    name: str,
    num_classes: int,
    kwargs: dict[str, Any],
    pretrained: bool = False,
    weights: str | Path | None = None,
    record: dict[str, Any] | None = None,
    new_head: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model and what a checkpoint records of its source (its file's sha256, a Hugging
    Face config, the weights file loaded). ``record``: that of an earlier build, from a
    checkpoint, to rebuild the same architecture (its weights then come from the checkpoint).
    ``new_head``: weights for another number of classes load all but the head (transfer)."""
    try:
        source = source_of(check_name(name))
    except ValueError as e:
        raise UnknownModel(str(e)) from None
    if source is None:
        if pretrained:
            raise ConfigError(f"model {name!r}: kdistill's zoo has no pretrained weights; use weights_file: FILE")
        model, new_record = MODELS[name](num_classes=num_classes, **kwargs), {}
    else:
        model, new_record = source.build(num_classes, kwargs, pretrained, record)
    try:
        model.kdistill_name = name  # how errors about its output name it
    except (AttributeError, RuntimeError):  # a TorchScript module takes no new attributes
        pass
    if weights is not None:
        new_record = {**new_record, "weights_file": str(Path(weights).expanduser().resolve())}
        new_record["weights_sha256"] = load_weights(model, Path(weights), name, new_head)
    return model, new_record


__all__ = [
    "MODELS",
    "KDModel",
    "ModelOutput",
    "ModelSource",
    "UnknownModel",
    "build",
    "check_logits",
    "check_name",
    "count_parameters",
    "create_model",
    "forward_all",
    "source_of",
]
