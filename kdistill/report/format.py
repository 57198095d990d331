"""Numbers as the reports' tables show them, and lookups that tolerate missing keys."""

from __future__ import annotations

import math
from typing import Any


def nested(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k1][k2]... or ``default`` where a key is missing (runs written by older versions)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def fmt_num(value: Any, fmt: str, suffix: str = "") -> str:
    """``value`` in format ``fmt`` plus ``suffix``; "n/a" for a missing or non-finite value."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{fmt}}{suffix}"


def fmt_count(n: float) -> str:
    """A count with a k/M/G prefix, e.g. ``1.25 M``."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def fmt_bytes(n: float | None) -> str:
    """A size in B/kB/MB/GB (powers of 1000); "n/a" for None."""
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
