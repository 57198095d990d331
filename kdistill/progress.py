"""Progress bars on a terminal, plain log lines elsewhere (CI, files).

In a multi-process job (torchrun) only rank 0 shows bars and logs: the other ranks train
the same steps and would print the same lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def _main_process() -> bool:
    # the rank torchrun announces; read from the environment so that it holds before the
    # process group exists and without importing torch.distributed here
    return (os.environ.get("RANK") or "0") == "0"


def interactive() -> bool:
    return sys.stderr.isatty() and _main_process()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0) -> Iterable[T]:
    """tqdm with an ETA on a terminal; elsewhere silent (the caller logs a summary line)."""
    return tqdm(iterable, total=total, desc=desc, disable=disable or not interactive(), leave=False, dynamic_ncols=True, initial=initial)


def log(message: str) -> None:
    """One line to stderr, safe to interleave with a progress bar (rank 0 only)."""
    if not _main_process():
        return
    tqdm.write(message, file=sys.stderr)
