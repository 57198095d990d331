"""Data sets larger than memory: the memory-mapped store against in-memory tensors.

    python benchmarks/data_scale.py --data PATH/cifar10-jpeg.tar.gz --sizes 32 64 128 \
        --out benchmarks/results/data_scale.md

For each image size S it builds the data store of the data set decoded (upscaled) to S px
in a fresh folder (``--work``; the build's time and its peak anonymous memory are measured
in a process of its own), then measures, each in a fresh process so that memory peaks do
not mix:

- training images/s of the memory-mapped path (kdistill's ``TrainLoader`` reading each
  batch's images from the store) against the in-memory path (the images copied into the
  process, packed once for the crop/flip gather, as kdistill trained before the store),
  after the store was read once so that the page cache holds it: (i) the data pipeline
  alone (gather, crop, flip, normalise of batches of ``--batch``), (ii) training steps of
  kdistill's ``seed_student`` (forward, backward, SGD); both paths alternate ``--rounds`` times in one
  process and each ratio is the median of the rounds' ratios;
- the peak anonymous memory (``RssAnon``, sampled after every batch) of one process
  training ``--rss-steps`` pipeline steps per path, and of each of two DDP ranks (torchrun's
  environment, gloo) training from the one store.

``--compare N`` limits the in-memory path (and, for fairness, the store path) of the speed
comparison to the first N training images (the in-memory path of 128 px needs ~6 GB);
``--quick`` checks that everything runs. Writes a markdown table to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine_description
from torch import nn

from kdistill import create_model
from kdistill.data.dataset import load_dataset
from kdistill.data.loader import Normalize, TrainLoader, crop_flip_packed, pack_pixels

PROG = "benchmarks/data_scale.py"
CPU = torch.device("cpu")


def rss_anon_mib() -> float:
    """This process's anonymous resident memory (heap, tensors; not mapped files), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PackedInMemory:
    """kdistill's training path before the store: the training images copied into the
    process and packed once, whole, a pixel per element; a batch is one gather of its crops."""

    def __init__(self, loader: TrainLoader):
        self.loader = loader
        images = loader.inputs[loader.rows] if loader.rows is not None else loader.inputs.clone()
        # the old ImageDataset held the images in memory too, next to the packed pixels
        self.images, self.pixels, self.channels = images, pack_pixels(images), images.shape[1]

    def epoch(self, epoch: int):
        lo = self.loader
        views = lo.device_views(epoch)
        for step in range(len(lo)):
            idx = views.order[step * lo.batch_size : (step + 1) * lo.batch_size]
            x = crop_flip_packed(self.pixels, idx, views.offsets[idx], views.flips[idx], lo.padding)
            yield lo.normalize(x, self.channels), lo.labels[idx]


def student(num_classes: int, image_size: int) -> nn.Module:
    """kdistill's small CNN student (seed_student) at this image size, channels_last."""
    torch.manual_seed(0)
    return create_model("seed_student", num_classes=num_classes, image_size=image_size).to(
        memory_format=torch.channels_last
    )


def _timed(batches, steps: int, model: nn.Module | None, opt) -> float:
    """Images/s over ``steps`` batches (after one warm-up batch), with a training step each
    if ``model`` is given."""
    it = iter(batches)
    done, start = 0, None
    for k in range(steps + 1):
        x, y = next(it)
        if model is not None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if k == 0:
            start = time.perf_counter()
        else:
            done += len(y)
    return done / (time.perf_counter() - start)


def _loader(ds, args, limit: int | None, packed: bool = True) -> TrainLoader:
    """kdistill's loader of the store (``packed``: its crops read the store's packed training
    pixels in place; else each batch is gathered from the store and packed, as before)."""
    norm = Normalize(*ds.mean_std(), CPU, channels_last=True)
    rows = torch.arange(min(limit, len(ds.train_labels))) if limit else None
    labels = ds.train_labels[rows] if rows is not None else ds.train_labels
    pixels = ds.train_pixels if packed else None
    return TrainLoader(ds.train_images, labels, args.batch, CPU, norm, seed=0, rows=rows, pixels=pixels)


def worker_speed(args) -> dict:
    """(i) pipeline and (ii) training images/s of both paths, alternating, in this process."""
    ds = load_dataset(args.data, args.size, args.work)
    store = _loader(ds, args, args.compare)
    per_batch = _loader(ds, args, args.compare, packed=False)
    memory = PackedInMemory(store)

    def batches(path: str, epoch: int):
        if path == "memory":
            return memory.epoch(epoch)
        return ((b.images, b.labels) for b in (store if path == "store" else per_batch).epoch(epoch))

    ratios: dict[str, list[float]] = {"pipeline": [], "train": []}
    rates: dict[str, list[float]] = {f"{k}_{p}": [] for k in ratios for p in ("store", "memory")}
    rates["pipeline_per_batch"], ratios["per_batch"] = [], []
    for r in range(args.rounds):
        for kind in ("pipeline", "train"):
            got = {}
            paths = ("store", "memory", "per_batch") if kind == "pipeline" else ("store", "memory")
            for path in paths if r % 2 == 0 else paths[::-1]:
                model = student(ds.num_classes, args.size) if kind == "train" else None
                opt = torch.optim.SGD(model.parameters(), lr=0.01) if model is not None else None
                steps = args.steps if kind == "pipeline" else args.train_steps
                got[path] = _timed(batches(path, r), steps, model, opt)
                rates[f"{kind}_{path}"].append(got[path])
            ratios[kind].append(got["store"] / got["memory"])
            if kind == "pipeline":
                ratios["per_batch"].append(got["per_batch"] / got["memory"])
    return {
        **{k: statistics.median(v) for k, v in rates.items()},
        **{f"ratio_{k}": statistics.median(v) for k, v in ratios.items()},
        "compared_images": len(store.labels),
    }


def worker_rss(args) -> dict:
    """Peak RssAnon while training ``--rss-steps`` pipeline steps of one path (under
    torchrun: this rank's share of every batch, from the one store)."""
    from kdistill import distributed

    distributed.ensure(CPU)
    base = rss_anon_mib()
    ds = distributed.local_main_first(lambda: load_dataset(args.data, args.size, args.work))
    norm = Normalize(*ds.mean_std(), CPU, channels_last=True)
    loader = TrainLoader(
        ds.train_images, ds.train_labels, args.batch, CPU, norm, shard=distributed.shard(), pixels=ds.train_pixels
    )
    batches = ((b.images, b.labels) for e in range(10**6) for b in loader.epoch(e))
    if args.path == "memory":
        memory = PackedInMemory(loader)
        batches = (xy for e in range(10**6) for xy in memory.epoch(e))
    peak = rss_anon_mib()
    for _, (x, _) in zip(range(args.rss_steps), batches):
        x.sum()  # touch the batch
        peak = max(peak, rss_anon_mib())
    return {"base_mib": base, "peak_mib": peak, "rank": int(os.environ.get("RANK", 0))}


def worker_build(args) -> dict:
    """The store's build time and this process's peak RssAnon meanwhile (sampled every 20 ms
    by a thread: the store's own pages are file-backed and not counted)."""
    peak, done = [rss_anon_mib()], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], rss_anon_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    ds = load_dataset(args.data, args.size, args.work)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    store = next(Path(args.work, "decoded").glob(f"*-{args.size}px-*.kdstore"))
    return {"seconds": seconds, "peak_anon_mib": peak[0], "bytes": store.stat().st_size, "train": len(ds.train_labels)}


def _run(argv: list[str], size: int, args, *, ddp: bool = False, **extra) -> list[dict]:
    """Run this script as a worker (or two torchrun ranks); their JSON results."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [PROG, "--worker", "--size", str(size), "--data", str(args.data), "--work", str(args.work)]
        cmd += ["--result", out, *argv]
        for k, v in {**vars(args), **extra}.items():
            if k in ("batch", "steps", "train_steps", "rounds", "rss_steps", "compare", "path") and v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v)]
        if ddp:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *cmd]
        else:
            cmd = [sys.executable, *cmd]
        env = {**os.environ, "KDISTILL_QUIET": "1"}
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[1])
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]


def measure(args) -> list[dict]:
    rows = []
    for size in args.sizes:
        build = _run(["--task", "build"], size, args)[0]
        print(f"{size} px: store built in {build['seconds']:.1f} s", file=sys.stderr)
        _warm(args.work, size)
        speed = _run(["--task", "speed"], size, args)[0]
        print(f"{size} px: {speed}", file=sys.stderr)
        rss = {path: _run(["--task", "rss"], size, args, path=path)[0] for path in ("store", "memory")}
        ddp = _run(["--task", "rss"], size, args, ddp=True, path="store")
        rows.append({"size": size, "build": build, "speed": speed, "rss": rss, "ddp": ddp})
        print(f"{size} px: rss {rss}, ddp {ddp}", file=sys.stderr)
    return rows


def _warm(work: Path, size: int) -> None:
    """Read the store once: the page cache holds it for the timed runs."""
    store = next(Path(work, "decoded").glob(f"*-{size}px-*.kdstore"))
    with open(store, "rb") as f:
        while f.read(1 << 24):
            pass


def write_table(rows: list[dict], args, command: str) -> str:
    lines = [
        "| size | store (GiB) | build (s) | build peak RssAnon (MiB) | pipeline img/s store / memory (ratio) "
        "| pipeline img/s, store gathered and packed per batch (ratio to memory) "
        "| train img/s store / memory (ratio) | peak RssAnon MiB: store / memory | two DDP ranks (store) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        s, b = r["speed"], r["build"]
        ddp = " / ".join(f"{d['peak_mib']:.0f}" for d in r["ddp"])
        lines.append(
            f"| {r['size']} px | {b['bytes'] / 2**30:.2f} | {b['seconds']:.0f} | {b.get('peak_anon_mib', float('nan')):.0f} "
            f"| {s['pipeline_store']:,.0f} / {s['pipeline_memory']:,.0f} ({s['ratio_pipeline']:.2f}) "
            f"| {s['pipeline_per_batch']:,.0f} ({s['ratio_per_batch']:.2f}) "
            f"| {s['train_store']:,.0f} / {s['train_memory']:,.0f} ({s['ratio_train']:.2f}) "
            f"| {r['rss']['store']['peak_mib']:.0f} / {r['rss']['memory']['peak_mib']:.0f} | {ddp} |"
        )
    head = (
        f"`{command}`\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(CPU)}; "
        f"batch {args.batch}; speed: median of {args.rounds} alternating rounds of {args.steps} pipeline / "
        f"{args.train_steps} training steps over the first {rows[0]['speed']['compared_images']:,} training images; "
        f"RSS: peak over {args.rss_steps} pipeline steps.\n\n"
    )
    return head + "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="an ImageFolder archive or folder (e.g. cifar10-jpeg.tar.gz)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--work", type=Path, help="folder for the stores (default: a temporary one, removed after)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40, help="timed pipeline steps per round")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rss-steps", type=int, default=200, help="pipeline steps of each memory measurement")
    p.add_argument("--compare", type=int, help="training images of the speed comparison (default all)")
    p.add_argument("--out", type=Path)
    p.add_argument("--quick", action="store_true", help="a few steps, to check that everything runs")
    # the worker processes' own options
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", choices=["build", "speed", "rss"], help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--path", choices=["store", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.train_steps, args.rounds, args.rss_steps = 3, 2, 2, 5
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    args.data = Path(args.data).resolve()
    if args.worker:
        task = {"build": worker_build, "speed": worker_speed, "rss": worker_rss}[args.task]
        result = task(args)
        (args.result / f"{args.task}{os.environ.get('RANK', '0')}.json").write_text(json.dumps(result))
        from kdistill import distributed

        distributed.leave()
        return
    command = "python " + " ".join([PROG, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        args.work = (args.work or Path(tmp)).resolve()
        table = write_table(measure(args), args, command)
    print(table)
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()
