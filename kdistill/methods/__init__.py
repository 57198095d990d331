"""Distillation methods, by the names used in configs and on the command line.

Everything the rest of kdistill knows about a method it asks here: which methods exist,
their options (validated once, by :func:`parse_methods`), which take an option such as the
temperature (:func:`set_option`), and which need the teacher's features.
"""

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
DEFAULT_METHOD = KD.name  # Hinton et al.'s, when a run names none


class UnknownMethod(ValueError):
    pass


def method_class(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown method {name!r}; expected one of: {', '.join(sorted(METHODS))}") from None


def parse_method_options(name: str, options: dict[str, Any]) -> MethodOptions:
    """Validate one method's options; errors name the method and the key."""
    cls = method_class(name)
    try:
        return cls.Options.model_validate(options)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise ValueError(f"{name}.{key}: {msg}" if key else f"{name}.{msg}") from None


def parse_methods(methods: dict[str, dict[str, Any] | None]) -> dict[str, MethodOptions]:
    """Every method's validated options, by name."""
    return {name: parse_method_options(name, options or {}) for name, options in methods.items()}


def taking(option: str, names) -> list[str]:
    """The methods among ``names`` that have the option ``option`` (unknown names have none:
    validating them is :func:`parse_methods`'s job)."""
    return [name for name in names if name in METHODS and METHODS[name].takes(option)]


def set_option(methods: dict[str, dict[str, Any] | None], option: str, value: Any) -> dict[str, dict[str, Any]]:
    """``methods`` with ``option: value`` added to every method that takes it, unless that
    method sets it already."""
    takers = taking(option, methods)
    return {n: ({option: value, **(o or {})} if n in takers else dict(o or {})) for n, o in methods.items()}


def needs_features(names) -> bool:
    return any(method_class(name).needs_features for name in names)


def soft_target_temperature(methods: dict[str, dict[str, Any] | None], parsed: dict[str, MethodOptions]) -> float:
    """The temperature of the first method that sets one explicitly, else of the first that
    has one, else 1.0: the temperature at which a teacher ensemble averages its members'
    soft outputs."""
    for name, options in methods.items():
        if options and "temperature" in options:
            return float(parsed[name].temperature)
    for name in taking("temperature", methods):
        return float(parsed[name].temperature)
    return 1.0


def check_run(parsed: dict[str, MethodOptions], epochs: int) -> list[str]:
    """Why each method's options cannot take effect in a run of ``epochs`` epochs, as
    ``name.option: reason`` (empty: they all can)."""
    return [
        f"{name}.{problem}" for name, options in parsed.items() if (problem := METHODS[name].check_run(options, epochs))
    ]


def build_methods(
    methods: dict[str, MethodOptions | dict[str, Any] | None], context: MethodContext
) -> dict[str, Method]:
    """The methods' modules from their options: parsed already (:func:`parse_methods`, as a
    config holds them) or plain dicts, parsed here."""
    parsed = {n: o if isinstance(o, MethodOptions) else parse_method_options(n, o or {}) for n, o in methods.items()}
    return {name: METHODS[name](options, context) for name, options in parsed.items()}


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "Method",
    "UnknownMethod",
    "MethodContext",
    "MethodOptions",
    "build_methods",
    "check_run",
    "kd_loss",
    "method_class",
    "needs_features",
    "parse_method_options",
    "parse_methods",
    "set_option",
    "soft_target_temperature",
    "taking",
]
