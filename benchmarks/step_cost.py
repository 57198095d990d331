"""Cost of one training step of the seed pair, in CPU time, without any pipeline.

    OMP_NUM_THREADS=1 python benchmarks/step_cost.py

Measures images per CPU-second (``time.process_time``) of the bare step on one pre-made
batch of 128: the student alone (CE), the student against cached teacher logits (KD), the
student with the live teacher (KD) and the teacher alone (CE), in NCHW and channels_last.
CPU time (not wall time) is nearly insensitive to other jobs on the machine, so this runs
usefully on a busy machine; with one thread it is the work per image, and the best a
2-thread run could reach is twice it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kdistill
from kdistill.perf import tune_allocator


def measure(
    model: torch.nn.Module,
    channels_last: bool,
    teacher: torch.nn.Module | None = None,
    cached: bool = False,
    steps: int = 60,
    repeats: int = 5,
) -> list[float]:
    torch.manual_seed(0)
    x, y, cached_logits = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,)), torch.randn(128, 10)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def step() -> None:
        z = model(x)
        loss = F.cross_entropy(z, y)
        if teacher is not None or cached:
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
            else:
                t = cached_logits
            loss = 0.1 * loss + 0.9 * kdistill.kd_loss(z, t, 4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(10):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(steps):
            step()
        rates.append(steps * 128 / (time.process_time() - t0))
    return rates


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"mallopt applied: {tune_allocator()}; threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print("| step | layout | images per CPU-second (median, min-max of 5) |\n| --- | --- | ---: |")
    new = kdistill.create_model
    for channels_last in (False, True):
        layout = "channels_last" if channels_last else "NCHW"
        cases = {
            "student, CE": ("seed_student", {}),
            "student, KD from cached logits": ("seed_student", {"cached": True}),
            "student, KD from the live teacher": ("seed_student", {"teacher": new("seed_teacher").eval()}),
            "teacher, CE": ("seed_teacher", {"steps": 30}),
        }
        for name, (model, kwargs) in cases.items():
            r = measure(new(model), channels_last, **kwargs)
            print(f"| {name} | {layout} | {statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f}) |", flush=True)


if __name__ == "__main__":
    main()
