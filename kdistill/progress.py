"""Progress bars on a terminal, plain log lines elsewhere (CI, files)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def interactive() -> bool:
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0) -> Iterable[T]:
    """tqdm with an ETA on a terminal; elsewhere silent (the caller logs a summary line)."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not interactive(), leave=False, dynamic_ncols=True, initial=initial)


def log(message: str) -> None:
    """One line to stderr, safe to interleave with a progress bar."""
    tqdm.write(message, file=sys.stderr)
