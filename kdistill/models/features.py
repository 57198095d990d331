"""Stage features and pre-logits of models that are not kdistill's own (torchvision, timm,
Hugging Face, TorchScript-free user modules), for the feature methods.

A :class:`FeatureReader` is attached to the model (:func:`attach_features`) and reads, in
one ordinary forward pass, the outputs of its stage modules (forward hooks) and the input
of its final classifier (the pre-logits). The stages are, in this order of preference:

- the module names the user lists (``features: [layer2, layer3, layer4]`` in the model's
  config);
- timm: the modules of its ``feature_info`` (what ``features_only``/``forward_intermediates``
  return);
- Hugging Face: the model's ``hidden_states`` (``output_hidden_states=True``), the
  embeddings' output left out;
- otherwise (torchvision, a factory's module): the last module before each drop of the
  spatial resolution among the top-level blocks (or those of its ``features`` sequence),
  found with a probe batch: a ResNet's ``layer1..layer4``.

Transformer token features (B, N, D) become maps (B, D, h, w) when N, less 0, 1 (CLS), 2
(CLS + distillation) or 5 (CLS + 4 registers) leading tokens, is a square h * h (the patch
grid); otherwise they are averaged over the tokens to (B, D, 1, 1). The hooks record nothing outside
:func:`read_all`, so a logit-only run pays nothing for them.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import Tensor, nn

from kdistill.errors import ConfigError
from kdistill.models.base import KDModel
from kdistill.models.transfer import head_path

# leading tokens that may precede a ViT's patch grid, tried in this order: none, CLS,
# CLS + distillation (DeiT), CLS + 4 registers
EXTRA_TOKENS = (0, 1, 2, 5)


def as_map(feature: Tensor) -> Tensor:
    """A stage output as (B, C, H, W): maps unchanged, tokens (B, N, D) reshaped onto their
    square patch grid (leading extra tokens dropped) or, if N is no square, averaged."""
    if isinstance(feature, (tuple, list)):
        feature = feature[0]
    if feature.dim() == 4:
        return feature
    if feature.dim() == 2:
        return feature[:, :, None, None]
    if feature.dim() != 3:
        raise ConfigError(f"a stage output of shape {tuple(feature.shape)} is neither a map nor tokens")
    B, N, D = feature.shape
    for extra in EXTRA_TOKENS:
        if extra >= N:
            break
        side = math.isqrt(N - extra)
        if side * side == N - extra:
            return feature[:, extra:].transpose(1, 2).reshape(B, D, side, side)
    return feature.mean(dim=1)[:, :, None, None]


class FeatureReader:
    """Forward hooks that record the stage outputs and the classifier's input of a model
    while :func:`read_all` runs it."""

    def __init__(self, model: nn.Module, stages: list[str], head: str | None, who: str):
        self.stages, self.head, self.who = stages, head, who
        self.active = False
        self.outputs: dict[str, Tensor] = {}
        self.pre_logits: Tensor | None = None
        named = dict(model.named_modules())
        for name in stages:
            named[name].register_forward_hook(_Record(self, name))
        if head is not None:
            named[head].register_forward_pre_hook(_RecordInput(self))

    def read(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        self.outputs, self.pre_logits, self.active = {}, None, True
        try:
            logits = model(x)
        finally:
            self.active = False
        logits = getattr(logits, "logits", logits)
        missing = [n for n in self.stages if n not in self.outputs]
        if missing:
            raise ConfigError(f"{self.who}: the feature module(s) {', '.join(missing)} did not run in its forward pass")
        features = [as_map(self.outputs[n]) for n in self.stages]
        pre = self.pre_logits if self.pre_logits is not None else logits
        self.outputs, self.pre_logits = {}, None
        return logits, features, pre.flatten(1)


class _Record:
    def __init__(self, reader: FeatureReader, name: str):
        self.reader, self.name = reader, name

    def __call__(self, module, args, output) -> None:
        if self.reader.active:
            self.reader.outputs[self.name] = output


class _RecordInput:
    def __init__(self, reader: FeatureReader):
        self.reader = reader

    def __call__(self, module, args) -> None:
        if self.reader.active:
            self.reader.pre_logits = args[0]


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def check_names(model: nn.Module, names: list[str], who: str) -> list[str]:
    """``names`` if every one is a module of ``model``; else one line listing the valid ones."""
    known = module_names(model)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            top = [n for n in known if "." not in n]
            shown = ", ".join(top[:30]) + (", ..." if len(top) > 30 else "")
            raise ConfigError(
                f"{who}: features: no module named {name!r}{hint}; its modules are {shown} "
                "(nested ones with dots, e.g. layer1.0)"
            )
    return names


def default_stages(model: nn.Module, example: Tensor) -> list[str]:
    """The stage modules of a model that names none: timm's ``feature_info``, else the last
    block before each drop in resolution among the top-level blocks (or ``features``')."""
    info = getattr(model, "feature_info", None)
    if info is not None:
        names = [f.get("module") if isinstance(f, dict) else None for f in info]
        named = dict(model.named_modules())
        names = [n.replace("_", ".") if n not in named and n.replace("_", ".") in named else n for n in names]
        if names and all(n in named for n in names):
            return names
    trunk, prefix = model, ""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and len(list(model.children())) == 1:
        trunk, prefix = inner, "model."
    features = getattr(trunk, "features", None)
    if isinstance(features, nn.Sequential):
        trunk, prefix = features, prefix + "features."
    shapes: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    hooks = [
        child.register_forward_hook(lambda m, a, out, name=name: shapes.append((name, m, tuple(out.shape))))
        for name, child in trunk.named_children()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return [prefix + n for n in _last_of_each_resolution(shapes)]


def _last_of_each_resolution(shapes: list[tuple[str, nn.Module, tuple[int, ...]]]) -> list[str]:
    """Blocks with weights start a stage at each new resolution; a block without weights
    (an activation) ends the current stage when it keeps its resolution; pooling never does."""
    stages: list[list] = []  # [resolution, the stage's last block]
    for name, module, shape in shapes:
        if not isinstance(shape, tuple) or len(shape) != 4:
            continue
        weighted = any(True for _ in module.parameters())
        if weighted and (not stages or stages[-1][0] != shape[-2:]):
            stages.append([shape[-2:], name])
        elif stages and stages[-1][0] == shape[-2:] and (weighted or "Pool" not in type(module).__name__):
            stages[-1][1] = name
    return [name for _, name in stages]


def attach_features(model: nn.Module, names: list[str] | None, example: Tensor | None, who: str) -> FeatureReader:
    """A model's feature reader (made once, with ``names`` or its default stages, found by
    running ``example``)."""
    if isinstance(model, KDModel):
        raise ConfigError(
            f"{who}: features: a kdistill model exposes its own stages; list modules of other models only"
        )
    reader = getattr(model, "kdistill_features", None)
    if reader is not None and (names is None or reader.stages == names):
        return reader
    hf = _hf_model(model)
    if names is None and hf is not None:
        reader = HFReader(model, hf, who)
    else:
        stages = check_names(model, names, who) if names is not None else default_stages(model, example)
        if not stages:
            raise ConfigError(
                f"{who}: found no stage features (no 4-D outputs among its blocks); list its stage modules with "
                "features: [name, ...]"
            )
        reader = FeatureReader(model, stages, head_path(model), who)
    try:
        model.kdistill_features = reader
    except (AttributeError, RuntimeError):
        raise ConfigError(f"{who}: a TorchScript model exposes no stage features; use its Python model") from None
    return reader


def _hf_model(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    return inner if inner is not None and config is not None and hasattr(config, "output_hidden_states") else None


class HFReader:
    """A transformers image classifier's stages: its ``hidden_states`` (the embeddings'
    output, the first, left out) and the input of its classifier."""

    def __init__(self, model: nn.Module, hf: nn.Module, who: str):
        self.hf, self.who = hf, who
        self.stages = ["hidden_states"]
        head = head_path(hf)
        self.recorder = FeatureReader(hf, [], head, who)

    def read(self, model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        adapter = getattr(model, "kdistill_input", None)
        x = adapter.adapt(x) if adapter is not None else x
        self.recorder.active = True
        try:
            out = self.hf(pixel_values=x, output_hidden_states=True)
        finally:
            self.recorder.active = False
        hidden = list(out.hidden_states or [])[1:] or list(out.hidden_states or [])
        pre = self.recorder.pre_logits if self.recorder.pre_logits is not None else out.logits
        self.recorder.pre_logits = None
        return out.logits, [as_map(h) for h in hidden], pre.flatten(1)


def ensure_features(model: nn.Module, example: Tensor | tuple[int, ...], who: str) -> None:
    """Make sure a model that is not a kdistill model exposes stage features (its default
    stages, unless a ``features:`` list attached others already)."""
    if isinstance(model, KDModel) or getattr(model, "kdistill_features", None) is not None:
        return
    device = next(iter([*model.parameters(), *model.buffers()]), torch.zeros(0)).device
    x = example.to(device) if isinstance(example, Tensor) else torch.zeros(2, *example, device=device)
    attach_features(model, None, x, who)


def attach_stages(model: nn.Module, spec: dict) -> nn.Module:
    """The stages a spec lists (``features``: module names) attached to its model."""
    if spec.get("features"):
        attach_features(model, list(spec["features"]), None, f"model {spec.get('name')!r}")
    return model
