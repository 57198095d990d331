"""The frozen teacher's forward pass, eager against torch.compile (train.compile_teacher).

    python benchmarks/compile_teacher.py --out benchmarks/results/compile_teacher.md

For each teacher: the forward pass that a live distillation step runs (eval mode, no
gradients, channels_last, a batch of 128 random 32x32 images), under bf16 autocast
(``train.amp: bf16``) and in float32, eager and through ``torch.compile``. The compiled
model is built once (its compile time reported: what a run pays once); then eager and
compiled are timed alternately, ``--repeats`` pairs, so that a drift of the machine's speed
falls on both; the median of each is reported with their ratio. Every compilation starts
from an empty torch.compile cache (a fresh TORCHINDUCTOR_CACHE_DIR), as on a user's first run.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import tempfile
import time

import torch
from machine import machine_description, publish
from torch import nn
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from kdistill.models import create_model

TEACHERS = [("seed_teacher", {}), ("airnet", {"widths": (32, 64, 128)})]
QUICK = [("airnet", {"widths": (4, 8, 8)})]


def seconds_per_batch(run, x: torch.Tensor, amp, steps: int) -> float:
    with torch.no_grad(), amp():
        run(x)
        started = time.perf_counter()
        for _ in range(steps):
            run(x)
    return (time.perf_counter() - started) / steps


def measure(model: nn.Module, bf16: bool, steps: int, repeats: int) -> tuple[float, float, float]:
    """(compile seconds, eager images/s, compiled images/s) of ``model``'s frozen forward."""
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model)
    started = time.perf_counter()
    with torch.no_grad(), amp():
        compiled(x)
    compile_seconds = time.perf_counter() - started
    eager, fast = [], []
    for _ in range(repeats):
        eager.append(seconds_per_batch(model, x, amp, steps))
        fast.append(seconds_per_batch(compiled, x, amp, steps))
    return compile_seconds, 128 / statistics.median(eager), 128 / statistics.median(fast)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="timed forward passes per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="eager/compiled pairs (median reported)")
    ap.add_argument("--quick", action="store_true", help="a tiny airnet and few steps: checks that it runs")
    ap.add_argument("--out")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    lines = [
        "| teacher | precision | compile (once) | eager img/s | compiled img/s | ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, kwargs in QUICK if args.quick else TEACHERS:
        for bf16 in (True, False):
            torch.manual_seed(0)
            model = create_model(name, **kwargs).eval().to(memory_format=torch.channels_last)
            for p in model.parameters():
                p.requires_grad_(False)
            torch._dynamo.reset()  # forget earlier compilations
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache, temporary_cache_dir(cache):
                seconds, eager, fast = measure(model, bf16, args.steps, args.repeats)
            label = name + (f" {tuple(kwargs['widths'])}" if kwargs else "")
            lines.append(
                f"| {label} | {'bf16 autocast' if bf16 else 'float32'} | {seconds:.1f} s | {eager:,.0f} | {fast:,.0f} "
                f"| {fast / eager:.2f}x |"
            )
    head = [
        f"Command: `python {shlex.join(['benchmarks/compile_teacher.py', *argv])}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(torch.device('cpu'))}; "
        f"images/s of the frozen forward (batch 128, channels_last, no gradients), median of {args.repeats} "
        f"alternating eager/compiled measurements of {args.steps} batches.",
        "",
    ]
    publish(head + lines, args.out)


if __name__ == "__main__":
    main()
