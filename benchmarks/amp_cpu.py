"""bf16 autocast against float32 on this CPU: training and evaluation images/s per model.

    python benchmarks/amp_cpu.py --out benchmarks/results/amp_cpu.md

For each model, a training step (forward, cross-entropy, backward, SGD with momentum) on one
pre-made batch of 128 random 32x32 images, channels_last, and an evaluation forward on 500,
timed under float32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what
``train.amp: bf16`` does), alternating float32, bf16, float32, bf16 so that a drift of the
machine's speed falls on both. Reports each pair's median and the ratio. On CPUs with bf16
matrix units (AMX: Intel Sapphire Rapids and later) bf16 is faster; without them, slower.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time

import torch
from machine import machine_description, publish
from torch import nn

from kdistill.models import create_model

MODELS = [("seed_student", {}), ("seed_teacher", {}), ("airnet", {}), ("airnet", {"widths": (32, 64, 128)})]


def images_per_second(model: nn.Module, bf16: bool, steps: int, batch: int = 128) -> tuple[float, float]:
    """(training, evaluation) images/s of ``model`` under bf16 autocast or float32."""
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    model.train()
    for i in range(steps + 3):  # 3 warm-up steps
        if i == 3:
            started = time.perf_counter()
        with amp():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train = steps * batch / (time.perf_counter() - started)
    model.eval()
    xe = torch.randn(500, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), amp():
        model(xe)
        started = time.perf_counter()
        for _ in range(4):
            model(xe)
    return train, 2000 / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2, help="float32/bf16 pairs per model (median reported)")
    ap.add_argument("--out")
    args = ap.parse_args()
    lines = [
        "| model | train float32 | train bf16 | ratio | eval float32 | eval bf16 | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, kwargs in MODELS:
        got: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.repeats):
            for bf16 in (False, True):
                torch.manual_seed(0)
                model = create_model(name, **kwargs).to(memory_format=torch.channels_last)
                got[bf16].append(images_per_second(model, bf16, args.steps))
        f32, b16 = ([statistics.median(r[k] for r in got[b]) for k in (0, 1)] for b in (False, True))
        label = name + (f" {kwargs['widths']}" if kwargs else "")
        lines.append(
            f"| {label} | {f32[0]:,.0f} | {b16[0]:,.0f} | {b16[0] / f32[0]:.2f}x "
            f"| {f32[1]:,.0f} | {b16[1]:,.0f} | {b16[1] / f32[1]:.2f}x |"
        )
    head = [
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(torch.device('cpu'))}; "
        f"images/s, median of {args.repeats} alternating pairs of {args.steps} timed steps (batch 128) and 4 "
        "evaluation batches of 500.",
        "",
    ]
    publish(head + lines, args.out)


if __name__ == "__main__":
    main()
