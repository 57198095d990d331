"""Transfer from a model trained on another label set: its head (the final classifier),
replaced for the run's classes, and the backbone frozen for a linear probe.

The head is found as the library names it (timm's ``get_classifier()``, torchvision's
``fc`` or ``classifier[-1]``, a transformers model's ``classifier``) or, for any other
module (a factory's, a TorchScript file's), as its last ``nn.Linear``.
"""

from __future__ import annotations

from torch import nn

from kdistill.errors import ConfigError
from kdistill.progress import log


def head_path(model: nn.Module) -> str | None:
    """The dotted name of ``model``'s final linear classifier (None: it has none)."""
    named = dict(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # timm
        head = get_classifier()
        for name, module in named.items():
            if module is head and isinstance(module, nn.Linear):
                return name
    for name in ("fc", "classifier", "head", "model.classifier"):  # torchvision, transformers
        module = named.get(name)
        if isinstance(module, nn.Sequential):
            inner = [f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            if inner:
                return inner[-1]
        elif isinstance(module, nn.Linear):
            return name
    linears = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def replace_head(model: nn.Module, num_classes: int, who: str) -> str:
    """Give ``model`` a new, randomly initialised head for ``num_classes`` classes (in
    place, on the old head's device and dtype); returns its path."""
    path = head_path(model)
    if path is None:
        raise ConfigError(
            f"{who}: has no linear classifier (nn.Linear) to replace with a head for {num_classes} classes"
        )
    old = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if "." in path else model
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, path.rpartition(".")[2], new.to(old.weight.device, old.weight.dtype))
    log(f"{who}: pretrained for {old.out_features} classes; new head {path} for {num_classes} classes")
    return path


def freeze_backbone(model: nn.Module, who: str) -> int:
    """Train only the head: every other parameter stops requiring gradients. Returns the
    number of parameters left trainable."""
    path = head_path(model)
    if path is None:
        raise ConfigError(
            f"{who}: finetune.freeze_backbone needs a linear classifier (nn.Linear) to train; it has none"
        )
    head = {id(p) for p in model.get_submodule(path).parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{who}: backbone frozen; training the head {path} only ({trainable:,} parameters)")
    return trainable
