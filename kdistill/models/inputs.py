"""Each model at its own input: resolution and normalisation, adapted on the device.

The data pipeline makes one augmented view of every sample, normalised with the data set's
mean and std, at the training size. A model that declares another input (``input_size``,
``mean``, ``std`` in its config, or what its library says its pretrained weights expect)
gets that same view adapted on the device, as a whole batch: re-normalised (one affine map
per channel) and resized with ``F.interpolate`` (bilinear; antialiased when shrinking). No
per-image work, no second pass over the data.

The adaptation is a forward pre-hook on the model (:func:`attach`): the model's weights,
state dict and checkpoints are unchanged, ``model(x)`` and
:func:`~kdistill.models.base.forward_all` both see the adapted batch, and a teacher cache
built by calling the teacher stores the logits of the teacher's own resolution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.errors import ConfigError


@dataclass(frozen=True)
class InputAdapter:
    """From the data's view (``from_mean``/``from_std``, any size) to a model's input
    (``size`` x ``size``, normalised with ``mean``/``std``). Called as a forward pre-hook."""

    size: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    from_mean: tuple[float, ...]
    from_std: tuple[float, ...]

    @property
    def renormalises(self) -> bool:
        return self.mean is not None and (self.mean, self.std) != (self.from_mean, self.from_std)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (self.adapt(args[0]), *args[1:])

    def adapt(self, x: Tensor) -> Tensor:
        """(B, C, H, W) normalised with the data's statistics -> the model's input."""
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            return x  # token ids and other non-image inputs pass unchanged
        if self.renormalises:
            shape = (1, -1, 1, 1)
            std, mean = self._vector(self.std, x), self._vector(self.mean, x)
            scale = self._vector(self.from_std, x) / std  # x * from_std + from_mean = pixels
            shift = (self._vector(self.from_mean, x) - mean) / std
            x = x * scale.view(shape) + shift.view(shape)
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            shrink = self.size < min(x.shape[-2:])
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    @staticmethod
    def _vector(values: tuple[float, ...], x: Tensor) -> Tensor:
        if len(values) not in (1, x.shape[1]):
            raise ConfigError(f"mean/std {list(values)}: {len(values)} values for images of {x.shape[1]} channels")
        return torch.tensor(values, dtype=x.dtype, device=x.device).expand(x.shape[1])

    def record(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        parts = [f"{self.size}x{self.size} px" if self.size else "the data's size"]
        if self.renormalises:
            parts.append(f"mean {[round(v, 3) for v in self.mean]} std {[round(v, 3) for v in self.std]}")
        return ", ".join(parts)


def adapter_from(record: dict[str, Any] | None) -> InputAdapter | None:
    """The adapter a spec's ``input`` record describes (None: the model takes the data's view)."""
    if not record:
        return None

    def vec(key: str) -> tuple[float, ...] | None:
        return tuple(float(v) for v in record[key]) if record.get(key) is not None else None

    return InputAdapter(record.get("size"), vec("mean"), vec("std"), vec("from_mean"), vec("from_std"))


def attach(model: nn.Module, adapter: InputAdapter | None, who: str = "model") -> nn.Module:
    """Give ``model`` its own input (a forward pre-hook; once: a second call replaces the
    first). The model is returned, its weights untouched."""
    if adapter is None:
        return model
    try:
        hooks = model._forward_pre_hooks
        for key in [k for k, hook in hooks.items() if isinstance(hook, InputAdapter)]:
            del hooks[key]
        model.register_forward_pre_hook(adapter)
        model.kdistill_input = adapter
    except (AttributeError, RuntimeError, TypeError):  # a TorchScript module takes neither hooks nor attributes
        raise ConfigError(
            f"{who}: a TorchScript model cannot be given its own input size or normalisation; "
            "export it for the data's input, or use its Python model"
        ) from None
    return model


def adapt_input(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` as ``model`` takes it (for code that calls its methods rather than the model)."""
    adapter = getattr(model, "kdistill_input", None)
    return adapter.adapt(x) if adapter is not None else x
