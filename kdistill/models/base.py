"""The one interface every kdistill model offers.

A model is an ordinary ``nn.Module`` whose ``forward(x)`` returns logits. Distillation
methods that work on intermediate representations also need the stage outputs and the
pre-logit features; models provide them through ``forward_features`` (stage outputs,
shallow to deep) and ``forward_head`` (last stage -> pre-logits -> logits), so that

    forward(x) == forward_head(forward_features(x)[-1]).logits

Feature methods select stages by index (``-1`` = deepest), never by module path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.inputs import adapt_input


class ModelOutput(NamedTuple):
    logits: Tensor  # (B, K)
    features: list[Tensor]  # stage outputs, shallow to deep: (B, C_i, H_i, W_i)
    pre_logits: Tensor  # (B, D): the input of the final linear classifier


class Head(NamedTuple):
    pre_logits: Tensor  # (B, D)
    logits: Tensor  # (B, K)


class KDModel(nn.Module, ABC):
    """Base class: subclasses implement ``forward_features`` and ``forward_head``."""

    @abstractmethod
    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Stage outputs, shallow to deep."""

    @abstractmethod
    def forward_head(self, last: Tensor) -> Head:
        """Last stage output -> (pre-logits, logits)."""

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x)[-1]).logits

    def forward_all(self, x: Tensor) -> ModelOutput:
        features = self.forward_features(x)
        head = self.forward_head(features[-1])
        return ModelOutput(head.logits, features, head.pre_logits)


def forward_all(model: nn.Module, x: Tensor) -> ModelOutput:
    """Logits, stage features and pre-logits of any model.

    kdistill models answer directly; other models through the feature reader attached to
    them (:mod:`kdistill.models.features`), else with their logits only.
    """
    if isinstance(model, KDModel):
        return model.forward_all(adapt_input(model, x))  # model(x) adapts through its hook
    reader = getattr(model, "kdistill_features", None)  # a foreign model's stages (models/features.py)
    if reader is not None:
        return ModelOutput(*reader.read(model, x))
    logits = model(x)
    logits = getattr(logits, "logits", logits)  # a transformers model returns an output object
    return ModelOutput(logits, [], logits)


def check_logits(logits, num_classes: int | None, who: str) -> int:
    """The number of classes a model's output gives; ConfigError (one line) when the output
    is not a (batch, classes) tensor of logits, or has not ``num_classes`` columns."""
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(f"{who} gives {shape}; expected (batch, classes) logits")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ConfigError(
            f"{who} gives logits for {logits.shape[1]} classes but the data set has {num_classes}; "
            "build it for the data's classes (num_classes) or give it a new head"
        )
    return logits.shape[1]


def model_label(model: nn.Module, role: str) -> str:
    """How errors name a model: its role and its source name (or class)."""
    name = getattr(model, "kdistill_name", None) or type(model).__name__
    return f"{role} {name!r}" if role else repr(name)


def _cannot_take(model: nn.Module, x: Tensor, error: Exception, who: str) -> str:
    """One line: the model, the inputs as it sees them (after its own input size, if it has
    one) and its own error."""
    adapter = getattr(model, "kdistill_input", None)
    shape = tuple(x.shape[1:])
    if adapter is not None:
        try:
            shape = tuple(adapter.adapt(x).shape[1:])
        except Exception:  # noqa: BLE001 - the shape as given is still worth naming
            pass
    reason = (str(error).strip().splitlines() or [""])[0][:300]
    return (
        f"{who or model_label(model, 'model')} cannot take the training inputs (batch of shape {shape}, "
        f"{str(x.dtype).removeprefix('torch.')}{', at its input_size' if adapter is not None else ''}): "
        f"{type(error).__name__}: {reason}; build it for these inputs (kdistill's seed models take "
        "kwargs image_size) or set its input_size to one it takes"
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def feature_shapes(model: nn.Module, example: Tensor | tuple[int, ...], who: str = "") -> ModelOutput:
    """Run ``example`` (a small batch of real inputs, of the dtype and shape the model trains
    on: token ids for a text model) through the model to learn its output and feature shapes,
    in eval mode. A shape instead of a batch means two float zero images of that shape.

    A model that cannot take the inputs (built for another image size, say) is a ConfigError
    naming it (``who``), the inputs and the model's own error, before any training starts."""
    was_training = model.training
    model.eval()
    try:
        device = next(iter([*model.parameters(), *model.buffers()]), torch.zeros(0)).device
        x = example.to(device) if isinstance(example, Tensor) else torch.zeros(2, *example, device=device)
        out = forward_all(model, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ConfigError(_cannot_take(model, x, e, who)) from None
    finally:
        model.train(was_training)
    return out
