"""Progress bars on a terminal, plain log lines elsewhere (CI, files).

Every long phase (decoding, training, evaluation, profiling, export) goes through
:func:`progress`. On a terminal it is a tqdm bar with an ETA. Elsewhere, a bar would fill a
log file with carriage returns, so the phase writes one plain line every
``KDISTILL_LOG_INTERVAL`` seconds (default 30) with its position, elapsed time and ETA,
and a closing line if it lasted that long; short phases stay quiet (their caller logs a
summary line).

In a multi-process job (torchrun) only rank 0 shows bars and log lines: the other ranks train
the same steps and would print the same lines.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines


def _main_process() -> bool:
    # the rank torchrun announces; read from the environment so that it holds before the
    # process group exists and without importing torch.distributed here
    return (os.environ.get("RANK") or "0") == "0"


_plain_only = False
_quiet = os.environ.get("KDISTILL_QUIET", "") not in ("", "0")


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """For library use: no progress bars or lines and no per-epoch log lines inside this
    block (or with KDISTILL_QUIET=1); warnings and errors still show."""
    global _quiet
    previous, _quiet = _quiet, enabled
    try:
        yield
    finally:
        _quiet = previous


def plain_progress_only() -> None:
    """Plain log lines from now on, even on a terminal (worker processes: their bars would
    overwrite each other)."""
    global _plain_only
    _plain_only = True


def interactive() -> bool:
    return sys.stderr.isatty() and _main_process() and not _plain_only


def log_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("KDISTILL_LOG_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class PlainProgress(Generic[T]):
    """The non-terminal stand-in for a tqdm bar: the same iteration and ``set_postfix``,
    plain log lines with an ETA every ``interval`` seconds."""

    def __init__(
        self, iterable: Iterable[T], total: int | None, desc: str, initial: int = 0, interval: float | None = None
    ):
        self.iterable, self.total, self.desc, self.initial = iterable, total, desc, initial
        self.interval = log_interval() if interval is None else interval
        self.postfix = ""

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _line(self, done: int, elapsed: float) -> str:
        rate = (done - self.initial) / elapsed if elapsed > 0 else 0.0
        where = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else f"{done}"
        eta = f", ETA {_duration((self.total - done) / rate)}" if self.total and rate > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {where}, {_duration(elapsed)} elapsed{eta}{extra}"

    def __iter__(self) -> Iterator[T]:
        start = last = time.perf_counter()
        done = self.initial
        logged = False
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= self.interval and (not self.total or done < self.total):
                log(self._line(done, now - start))
                last, logged = now, True
        elapsed = time.perf_counter() - start
        if logged or (self.interval == 0 and done > self.initial):
            log(f"{self.desc}: done, {done - self.initial} steps in {_duration(elapsed)}")

    def __len__(self) -> int:
        return self.total or 0


BAR_REFRESH_SECONDS = 0.5  # between updates of a training bar's loss and accuracy


class Refresh:
    """When a progress bar's numbers are worth updating: at the first call, then at most
    once every ``seconds`` (by ``clock``), and always at the last step, so a short epoch
    ends showing its own numbers, not its first step's. Reading the numbers may cost a
    host sync, which is why it is rationed by time, never done per step."""

    def __init__(self, seconds: float = BAR_REFRESH_SECONDS, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.clock = seconds, clock
        self.shown: float | None = None

    def due(self, last: bool = False) -> bool:
        now = self.clock()
        if last or self.shown is None or now - self.shown >= self.seconds:
            self.shown = now
            return True
        return False


def progress(
    iterable: Iterable[T], total: int | None = None, desc: str = "", disable: bool = False, initial: int = 0
) -> Iterable[T]:
    """A tqdm bar with an ETA on a terminal; plain log lines with an ETA elsewhere (see the
    module's docstring). ``disable`` silences both."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if disable or _quiet:
        return PlainProgress(iterable, total, desc, initial, interval=float("inf"))
    if not interactive():
        return PlainProgress(iterable, total, desc, initial)
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, initial=initial)


def log(message: str) -> None:
    """One line to stderr, safe to interleave with a progress bar (rank 0 only; in a
    :func:`quiet` block only warnings)."""
    if not _main_process() or (_quiet and not message.startswith("warning")):
        return
    tqdm.write(message, file=sys.stderr)
