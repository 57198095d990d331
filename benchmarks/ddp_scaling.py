"""Data-parallel scaling: training images/s of one distillation with 1, 2, ... processes.

    python benchmarks/ddp_scaling.py --procs 1 2 --threads 1            # CPU processes (gloo)
    python benchmarks/ddp_scaling.py --procs 1 --device cuda            # one GPU (NCCL if more)

Each configuration is a real ``torchrun --standalone --nproc_per_node=N`` job (N = 1 too, so
every figure pays the same launcher) that distills seed_teacher into seed_student with KD on
``--train-size`` images of the data set (every k-th), with the same global batch for every N.
The figure is the engine's own: images of the last epoch (all ranks) / its training seconds
(evaluation excluded), so the first epoch's warm-up is not counted. Every process gets
``--threads`` intra-op threads (OMP_NUM_THREADS). Writes a markdown table to
benchmarks/results/ddp.md (``--out``); state with ``--note`` whether the machine was shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    """One rank of the torchrun job: the timed distillation."""
    import kdistill
    from kdistill import distributed
    from kdistill.engine import select_device

    device = select_device(args.device)
    distributed.ensure(device)
    ds = distributed.local_main_first(lambda: kdistill.load_dataset(args.data))
    # every k-th image: the bundled sample is sorted by class, a prefix would hold few classes
    stride = max(1, len(ds.train_labels) // args.train_size)
    data = (ds.train_images[::stride][: args.train_size], ds.train_labels[::stride][: args.train_size])
    torch.manual_seed(0)
    teacher = kdistill.create_model("seed_teacher", num_classes=ds.num_classes)
    student = kdistill.create_model("seed_student", num_classes=ds.num_classes)
    result = kdistill.distill(
        teacher,
        student,
        data,
        methods="kd",
        epochs=args.epochs,
        batch_size=args.batch_size,
        device=device,
        seed=0,
        grad_clip=5.0,
        desc=f"{distributed.world_size()} proc",
    )
    if distributed.is_main():
        last = result.history[-1]
        Path(args.result).write_text(
            json.dumps(
                {
                    "images_per_second": last["images_per_second"],
                    "train_images": last["train_images"],
                    "seconds": last["train_seconds"],
                }
            )
        )


def launch(procs: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={procs}",
            __file__,
            "--worker",
            "--result",
            str(result),
            "--data",
            args.data,
            "--train-size",
            str(args.train_size),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--device",
            args.device,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        out = json.loads(result.read_text())
        out["wall_seconds"] = time.perf_counter() - t0
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per process")
    ap.add_argument("--data", default="cifar10-mini")
    ap.add_argument("--train-size", type=int, default=2560)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch, the same for every process count")
    ap.add_argument("--note", default="", help="e.g. 'machine shared with other jobs'")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp.md"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    rows = {p: launch(p, args) for p in args.procs}
    base = rows[min(rows)]["images_per_second"] / min(rows)
    device = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda") and torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores)"
    )
    lines = [
        "# Data-parallel scaling (torchrun, DDP)",
        "",
        f"`python benchmarks/ddp_scaling.py {shlex.join(sys.argv[1:])}`",
        "",
        f"KD seed_teacher -> seed_student, {args.data} ({args.train_size} training images), global batch "
        f"{args.batch_size}, last of {args.epochs} epochs timed (evaluation excluded). Device: {device}, "
        f"{args.threads} thread(s) per process; {platform.machine()} {platform.system()}, torch {torch.__version__}."
        + (f" {args.note}." if args.note else ""),
        "",
        "| processes | images/s | speed-up | efficiency |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for p, r in rows.items():
        speedup = r["images_per_second"] / rows[min(rows)]["images_per_second"]
        lines.append(
            f"| {p} | {r['images_per_second']:.0f} | {speedup:.2f}x | {r['images_per_second'] / (base * p) * 100:.0f}% |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
