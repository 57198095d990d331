"""Distillation methods, by the names used in configs and on the command line."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from kdistill.methods.at import AT
from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.methods.crd import CRD
from kdistill.methods.dist import DIST
from kdistill.methods.dkd import DKD
from kdistill.methods.fitnets import FitNets
from kdistill.methods.kd import KD, kd_loss
from kdistill.methods.logit_std import LogitStdKD
from kdistill.methods.pkt import PKT
from kdistill.methods.rkd import RKD
from kdistill.methods.sp import SP

# logit methods first, then feature methods, then contrastive
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (KD, DKD, LogitStdKD, DIST, FitNets, AT, SP, RKD, PKT, CRD)
}


def parse_method_options(name: str, options: dict[str, Any]) -> MethodOptions:
    """Validate one method's options; errors name the method and the key."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(sorted(METHODS))}") from None
    try:
        return cls.Options.model_validate(options)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{name}.{key}: {msg}" if key else f"{name}.{msg}") from None


def build_methods(methods: dict[str, dict[str, Any]], context: MethodContext) -> dict[str, Method]:
    return {name: METHODS[name](parse_method_options(name, opts or {}), context) for name, opts in methods.items()}


__all__ = ["METHODS", "Method", "MethodContext", "MethodOptions", "build_methods", "kd_loss", "parse_method_options"]
