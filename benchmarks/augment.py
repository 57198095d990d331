"""Training-batch throughput of the two augmentations, side by side in one run.

    python benchmarks/augment.py --sizes 32 64 --device cpu

For each image size S it measures images/s of ``TrainLoader.batch``, the one place where a
training input is made (gather of the batch's images, augmentation, conversion to float
and normalisation into channels_last), on synthetic uint8 images of S x S pixels:

- ``pad_crop``: zero padding (4 px) + random crop at S + flip;
- ``random_resized_crop``: a random box (scale 0.35-1, ratio 3/4-4/3) resampled
  bilinearly to S + flip.

The two alternate batch by batch within every round, so both see the same machine load;
the ratio is the median of the rounds' ratios. Prints a markdown table with the command,
torch version, thread count and machine. ``--quick`` checks that everything runs.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
from machine import machine_description

from kdistill.data.loader import Normalize, ResizedCrop, TrainLoader

PROG = "benchmarks/augment.py"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loaders(size: int, n: int, batch_size: int, device: torch.device) -> dict[str, TrainLoader]:
    """The same images and labels behind both augmentations."""
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    normalize = Normalize([0.5] * 3, [0.25] * 3, device, channels_last=True)
    common = dict(batch_size=batch_size, device=device, normalize=normalize, seed=0)
    return {
        "pad_crop": TrainLoader(images, labels, padding=4, **common),
        "random_resized_crop": TrainLoader(images, labels, resized_crop=ResizedCrop(size), **common),
    }


def measure(loaders: dict[str, TrainLoader], steps: int, rounds: int) -> dict[str, list[float]]:
    """images/s of each loader in each round, ``steps`` batches per loader per round."""
    device = next(iter(loaders.values())).device
    views = {name: loader.device_views(0) for name, loader in loaders.items()}
    batch_size = next(iter(loaders.values())).batch_size
    n = len(next(iter(loaders.values())).labels)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for r in range(rounds + 1):  # round 0 warms up
        seconds = dict.fromkeys(loaders, 0.0)
        for step in range(steps):
            start = (step * batch_size) % max(1, n - batch_size + 1)
            for name, loader in loaders.items():
                idx = views[name].order[start : start + batch_size]
                _sync(device)
                t0 = time.perf_counter()
                loader.batch(idx, views[name])
                _sync(device)
                seconds[name] += time.perf_counter() - t0
        if r:
            for name in loaders:
                rates[name].append(steps * batch_size / seconds[name])
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="image sizes in pixels")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=4096, help="images behind each loader")
    parser.add_argument("--steps", type=int, default=20, help="batches per augmentation per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 steps, 1 round: check that it runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.rounds = 2, 1
    if min(args.sizes) < 1 or args.batch_size > args.images:
        print(f"{PROG}: sizes must be positive and --batch-size at most --images", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    command = " ".join(["python", PROG, *map(shlex.quote, argv if argv is not None else sys.argv[1:])])
    print(f"Command: `{command}`  ")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(device)}; ", end="")
    print(f"batch {args.batch_size}, median (min-max) of {args.rounds} rounds of {args.steps} batches\n")
    print("| size | pad_crop img/s | random_resized_crop img/s | ratio rrc / pad_crop |")
    print("| ---: | ---: | ---: | ---: |")
    for size in args.sizes:
        rates = measure(loaders(size, args.images, args.batch_size, device), args.steps, args.rounds)
        pad, rrc = rates["pad_crop"], rates["random_resized_crop"]
        ratios = [b / a for a, b in zip(pad, rrc)]

        def show(r: list[float]) -> str:
            return f"{statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f})"

        print(f"| {size} | {show(pad)} | {show(rrc)} | {statistics.median(ratios):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
