"""Training throughput of distillation, three ways in one run.

    python benchmarks/throughput.py --data cifar10 --pair seed_teacher:seed_student \
        --pair resnet56:resnet20 --out benchmarks/results/throughput.md

For each teacher/student pair it measures steady-state training images/s of

(a) kdistill's full pipeline: :func:`kdistill.distill` itself (in-memory uint8 data,
    batched crop/flip/normalise on the device, teacher, student, optimizer, the engine's
    statistics), on ``steps`` batches per epoch: one warm-up epoch, then one timed epoch
    per repeat (the engine's own per-epoch timing, evaluation excluded);
(b) the model-only ceiling: the same distillation step (same task, loss, optimizer,
    memory format) on one pre-made batch, no data work at all;
(c) a reference loop in the style of the PyTorch knowledge-distillation tutorial, in plain
    torch: a per-sample ``Dataset`` doing per-image crop/flip/normalise, a ``DataLoader``
    with 2 worker processes, NCHW models, ``loss.item()`` every step;

The teacher of a pair may be a trained kdistill checkpoint (``--pair runs/t/checkpoint.pt:seed_student``),
which runs at the input it was trained at (``teacher.input_size``: e.g. 64 px while the
student takes the data's 32 px);
and, unless ``--no-cache``, (a) and (b) again with a teacher cache (the student alone
reads the teacher's logits). Same models, batch size, optimizer (SGD, Nesterov, weight
decay) and loss ((1 - alpha) CE + alpha T^2 KL, alpha 0.9, T 4) everywhere. Each number
is the median of ``repeats`` timed runs of ``steps`` steps after warm-up.

Prints a markdown table with the exact command, torch version, thread count and machine,
and writes it to ``--out``. ``--quick`` checks that everything runs (5 steps, 1 repeat).
Errors the user can fix are one line on stderr and exit status 2 (``--debug``: traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from machine import machine_description

from kdistill.cli import run_reporting_errors
from kdistill.data.dataset import ImageDataset

ALPHA, TEMPERATURE = 0.9, 4.0
WARMUP_STEPS = 3
PROG = "benchmarks/throughput.py"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _subset(ds: ImageDataset, n: int, seed: int = 0) -> ImageDataset:
    """``n`` training images (a seeded random subset) and a token test split: the harness
    measures training, and evaluation after each epoch should cost next to nothing."""
    if n > len(ds.train_labels):
        raise ValueError(
            f"the benchmark needs {n} training images; {ds.name} has {len(ds.train_labels)}: lower --steps or --batch-size"
        )
    keep = torch.randperm(len(ds.train_labels), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return dataclasses.replace(
        ds,
        train_images=ds.train_images[keep],
        train_labels=ds.train_labels[keep],
        test_images=ds.test_images[:100],
        test_labels=ds.test_labels[:100],
        val_images=None,
        val_labels=None,
    )


def _models(
    teacher_name: str, student_name: str, num_classes: int, seed: int = 0
) -> tuple[torch.nn.Module, torch.nn.Module]:
    from kdistill.checkpoint import load_model
    from kdistill.models import create_model

    torch.manual_seed(seed)
    if Path(teacher_name).suffix == ".pt":  # a trained teacher's checkpoint, at its own input (teacher.input_size)
        teacher = load_model(Path(teacher_name))[0]
    else:
        teacher = create_model(teacher_name, num_classes=num_classes)
    return teacher, create_model(student_name, num_classes=num_classes)


def _train_config(batch_size: int, epochs: int, channels_last: bool, compile: bool):
    from kdistill.api import make_train_config

    return make_train_config(batch_size=batch_size, epochs=epochs, channels_last=channels_last, compile=compile)


def measure_pipeline(
    teacher_name, student_name, ds, *, batch_size, steps, repeats, device, cache, channels_last, compile
) -> list[float]:
    """(a): kdistill.distill on ``steps`` batches per epoch; one warm-up epoch, then one
    timed epoch per repeat. Returns images/s of the timed epochs."""
    from kdistill import api
    from kdistill.config import DataConfig

    sub = _subset(ds, steps * batch_size)
    teacher, student = _models(teacher_name, student_name, ds.num_classes)
    epochs = 1 + repeats
    teacher_cache = None
    if cache:
        teacher_cache = api.cache_teacher(teacher, sub, epochs=epochs, device=device, channels_last=channels_last)
    cfg = _train_config(batch_size, epochs, channels_last, compile)
    r = api.distill(
        teacher,
        student,
        sub,
        methods={"kd": {"temperature": TEMPERATURE}},
        alpha=ALPHA,
        config=cfg,
        data=DataConfig(),
        device=device,
        teacher_cache=teacher_cache,
        desc="bench (a)" + (" cached" if cache else ""),
    )
    return [h["images_per_second"] for h in r.history[1:]]


def measure_ceiling(
    teacher_name, student_name, ds, *, batch_size, steps, repeats, device, cache, channels_last, compile
) -> list[float]:
    """(b): the same task, loss and optimizer on one pre-made batch: no data work."""
    from kdistill import api
    from kdistill.config import DataConfig
    from kdistill.engine import autocast_for, build_optimizer
    from kdistill.methods import MethodContext, build_methods
    from kdistill.models.base import feature_shapes
    from kdistill.tasks import Distillation

    teacher, student = _models(teacher_name, student_name, ds.num_classes)
    cfg = _train_config(batch_size, 1, channels_last, compile)
    sub = _subset(ds, batch_size)
    prepared = api.prepare_data(sub, cfg=cfg, device=device, data=DataConfig(), seed=0)
    loader = prepared.loader
    batch = loader.batch(torch.arange(batch_size, device=device), loader.device_views(0))  # made once
    teacher.to(device)
    student.to(device)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    teacher_cache = None
    if cache:
        teacher_cache = api.cache_teacher(teacher, sub, epochs=1, device=device, channels_last=channels_last)
    context = MethodContext(
        feature_shapes(student, sub.image_shape),
        feature_shapes(teacher, sub.image_shape),
        ds.num_classes,
        batch_size,
        1,
    )
    task = Distillation(
        student,
        teacher,
        build_methods({"kd": {"temperature": TEMPERATURE}}, context),
        ALPHA,
        1 - ALPHA,
        teacher_cache=teacher_cache,
    )
    task.to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    if compile:
        student.compile()
    optimizer = build_optimizer(task.parameters(), cfg)
    task.train()
    amp = autocast_for(device, cfg.amp)

    def step() -> None:
        with amp:
            _, losses = task(batch, 0.0)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    rates = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
    return rates


class TutorialDataset(torch.utils.data.Dataset):
    """Per-sample data as in the PyTorch tutorials: HWC uint8 images, transformed one at a
    time (ToTensor, RandomCrop(32, padding=4), RandomHorizontalFlip, Normalize) in plain torch."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, mean: list[float], std: list[float], padding: int = 4
    ):
        self.images = (
            images.permute(0, 2, 3, 1).contiguous().numpy()
        )  # (N, H, W, C), as torchvision's CIFAR10 keeps them
        self.labels = labels.tolist()
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.padding = padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div(255)  # ToTensor: (C, H, W) in [0, 1]
        _, h, w = x.shape
        p = self.padding
        x = F.pad(x, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        x = x[:, dy : dy + h, dx : dx + w]  # RandomCrop
        if torch.rand(1).item() < 0.5:
            x = x.flip(2)  # RandomHorizontalFlip
        return (x - self.mean) / self.std, self.labels[i]  # Normalize


def measure_reference(teacher_name, student_name, ds, *, batch_size, steps, repeats, device, workers) -> list[float]:
    """(c): the tutorial-style loop. Each repeat starts a fresh epoch iterator (workers
    start as in every epoch of such a loop); its first batches are the untimed warm-up."""
    from kdistill.api import make_train_config
    from kdistill.engine import build_optimizer

    sub = _subset(ds, (WARMUP_STEPS + steps) * batch_size)
    mean, std = ds.mean_std()
    loader = torch.utils.data.DataLoader(
        TutorialDataset(sub.train_images, sub.train_labels, mean, std),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    teacher, student = _models(teacher_name, student_name, ds.num_classes)
    teacher.to(device).eval()
    student.to(device).train()
    optimizer = build_optimizer(student.parameters(), make_train_config(batch_size=batch_size))
    T = TEMPERATURE
    rates = []
    for _ in range(repeats):
        running_loss = 0.0
        it = iter(loader)
        for i in range(WARMUP_STEPS + steps):
            if i == WARMUP_STEPS:
                _sync(device)
                t0 = time.perf_counter()
            x, y = next(it)
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t_logits = teacher(x)
            s_logits = student(x)
            soft_targets = F.softmax(t_logits / T, dim=-1)
            soft_prob = F.log_softmax(s_logits / T, dim=-1)
            kd = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size(0) * T**2
            loss = ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s_logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
        _sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - t0))
        del it
    return rates


def run_pair(
    teacher_name: str,
    student_name: str,
    ds: ImageDataset,
    *,
    batch_size: int,
    steps: int,
    repeats: int,
    device: torch.device,
    workers: int = 2,
    cache: bool = True,
    reference: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    rounds: int = 1,
) -> dict[str, Any]:
    """All measurements of one pair, ``rounds`` times in turn: a slow drift of the machine
    (other jobs, clocks) then shows in every measurement alike instead of in one of them.
    The ratios are the median over the rounds of each round's ratio of medians."""
    common = dict(batch_size=batch_size, steps=steps, repeats=repeats, device=device)
    opts = dict(channels_last=channels_last, compile=compile)
    runs: dict[str, list[float]] = {}
    per_round: list[dict[str, float]] = []
    for _ in range(rounds):
        this = {
            "pipeline": measure_pipeline(teacher_name, student_name, ds, cache=False, **common, **opts),
            "ceiling": measure_ceiling(teacher_name, student_name, ds, cache=False, **common, **opts),
        }
        if cache:
            this["pipeline_cached"] = measure_pipeline(teacher_name, student_name, ds, cache=True, **common, **opts)
            this["ceiling_cached"] = measure_ceiling(teacher_name, student_name, ds, cache=True, **common, **opts)
        if reference:
            this["reference"] = measure_reference(teacher_name, student_name, ds, workers=workers, **common)
        for k, v in this.items():
            runs.setdefault(k, []).extend(v)
        per_round.append({k: statistics.median(v) for k, v in this.items()})
    return {
        "teacher": teacher_name,
        "student": student_name,
        "runs": runs,
        "rounds": per_round,
        "median": {k: statistics.median(v) for k, v in runs.items()},
    }


def _cell(result: dict, key: str) -> str:
    if key not in result["runs"]:
        return "–"
    v = result["runs"][key]
    return f"{statistics.median(v):,.0f} ({min(v):,.0f}–{max(v):,.0f})"


def ratio(result: dict, a: str, b: str) -> float | None:
    """Median over the rounds of each round's median of ``a`` over its median of ``b``."""
    rounds = result.get("rounds") or [result["median"]]
    if a not in rounds[0] or b not in rounds[0]:
        return None
    return statistics.median(r[a] / r[b] for r in rounds)


def _ratio(result: dict, a: str, b: str) -> str:
    value = ratio(result, a, b)
    return "–" if value is None else f"{value:.2f}"


def format_markdown(results: list[dict], *, command: str, settings: dict[str, Any], device: torch.device) -> str:
    lines = [
        "# Distillation training throughput (`benchmarks/throughput.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(device)}; device {device}; "
        f"allocator: {settings['allocator']}; data {settings['data']}; batch {settings['batch_size']}; "
        f"{settings['steps']} timed steps per repeat after warm-up, median of {settings['repeats']} repeats"
        + (
            f" in each of {settings['rounds']} rounds (ratios: median of the rounds' ratios)"
            if settings.get("rounds", 1) > 1
            else ""
        )
        + "; "
        f"channels_last {settings['channels_last']}, compile {settings['compile']}; reference loop with {settings['workers']} DataLoader workers.",
        "",
        "Images/s of training, median (min–max) of the repeats. (a) kdistill's full pipeline (`kdistill.distill`); "
        "(b) the model-only ceiling: the same step on a pre-made batch; (c) a PyTorch-tutorial-style loop "
        "(per-sample Dataset with per-image crop/flip/normalise, DataLoader workers, NCHW, `loss.item()` per step).",
        "",
        "| pair | teacher | (a) pipeline | (b) ceiling | (c) reference | (a)/(b) | (a)/(c) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        pair = f"{r['teacher']} → {r['student']}"
        lines.append(
            f"| {pair} | live | {_cell(r, 'pipeline')} | {_cell(r, 'ceiling')} | {_cell(r, 'reference')} | {_ratio(r, 'pipeline', 'ceiling')} | {_ratio(r, 'pipeline', 'reference')} |"
        )
        if "pipeline_cached" in r["runs"]:
            lines.append(
                f"| {pair} | cache | {_cell(r, 'pipeline_cached')} | {_cell(r, 'ceiling_cached')} | {_cell(r, 'reference')} | "
                f"{_ratio(r, 'pipeline_cached', 'ceiling_cached')} | {_ratio(r, 'pipeline_cached', 'reference')} |"
            )
    cached = [r for r in results if "pipeline_cached" in r["median"]]
    if cached:
        lines += [
            "",
            "Cost of a distillation epoch with the teacher cache, as a fraction of the live-teacher epoch (pipeline (a)):",
            "",
        ]
        for r in cached:
            lines.append(f"- {r['teacher']} → {r['student']}: {ratio(r, 'pipeline', 'pipeline_cached'):.2f}x")
    return "\n".join(lines) + "\n"


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> str:
    """Run every pair; return the markdown table, also written to ``args.out``. ``argv``:
    the script's arguments, recorded in the table as the command."""
    from kdistill.data.dataset import load_dataset
    from kdistill.engine import select_device
    from kdistill.errors import ConfigError
    from kdistill.perf import tune_allocator

    if args.no_mallopt:
        os.environ["KDISTILL_NO_MALLOPT"] = "1"
    allocator = (
        "glibc defaults"
        if args.no_mallopt
        else ("tuned with mallopt (kdistill.perf)" if tune_allocator() else "platform default")
    )
    if args.quick:
        args.steps, args.repeats, args.rounds = min(args.steps, 5), 1, 1
    if args.rounds < 1 or args.repeats < 1 or args.steps < 1:
        raise ConfigError(
            f"--steps, --repeats and --rounds must be at least 1; got {args.steps}, {args.repeats}, {args.rounds}"
        )
    pairs = []
    for text in args.pair or ["seed_teacher:seed_student"]:
        teacher, sep, student = text.partition(":")
        if not sep or not teacher or not student:
            raise ConfigError(f"--pair {text!r}: expected TEACHER:STUDENT, e.g. resnet56:resnet20")
        pairs.append((teacher, student))
    from kdistill.models import MODELS

    for name in {n for p in pairs for n in p}:
        if name not in MODELS and not (Path(name).suffix == ".pt" and Path(name).is_file()):
            raise ConfigError(
                f"--pair: unknown model {name!r}; expected one of: {', '.join(sorted(MODELS))}, or a teacher checkpoint (.pt file)"
            )
    device = select_device(args.device)
    ds = load_dataset(args.data, data_dir=Path(args.data_dir) if args.data_dir else None)
    needed = (WARMUP_STEPS + args.steps) * args.batch_size
    if needed > len(ds.train_labels):
        raise ConfigError(
            f"--steps {args.steps} x --batch-size {args.batch_size} needs {needed} training images; {args.data} has {len(ds.train_labels)}"
        )
    results = []
    for teacher, student in pairs:
        try:
            results.append(
                run_pair(
                    teacher,
                    student,
                    ds,
                    batch_size=args.batch_size,
                    steps=args.steps,
                    repeats=args.repeats,
                    device=device,
                    workers=args.workers,
                    cache=not args.no_cache,
                    reference=not args.no_reference,
                    channels_last=not args.no_channels_last,
                    compile=args.compile,
                    rounds=args.rounds,
                )
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
    settings = {
        "allocator": allocator,
        "data": f"{ds.name} ({len(ds.train_labels)} training images)",
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "channels_last": not args.no_channels_last,
        "compile": args.compile,
        "workers": args.workers,
    }
    command = f"python {PROG} " + " ".join(shlex.quote(a) for a in argv)
    text = format_markdown(results, command=command, settings=settings, device=device)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="training images/s: kdistill's pipeline vs the model-only ceiling vs a tutorial-style loop",
    )
    p.add_argument(
        "--pair",
        action="append",
        metavar="TEACHER:STUDENT",
        help="models to measure (repeatable; default seed_teacher:seed_student); TEACHER may be a kdistill checkpoint "
        "(.pt), e.g. a teacher trained at its own input size",
    )
    p.add_argument(
        "--data", default="cifar10-mini", help="data set (default cifar10-mini; cifar10 for the published numbers)"
    )
    p.add_argument("--data-dir", help="download and cache folder")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=30, help="timed steps per repeat (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure everything this many times in turn (default 1); ratios: median of the rounds' ratios",
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop (default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true", help="skip the teacher-cache measurements")
    p.add_argument("--no-reference", action="store_true", help="skip the reference loop (c)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW instead of channels_last in (a) and (b)")
    p.add_argument("--compile", action="store_true", help="torch.compile the student in (a) and (b)")
    p.add_argument(
        "--no-mallopt",
        action="store_true",
        help="leave glibc's allocator at its defaults (to measure what the tuning buys)",
    )
    p.add_argument(
        "--quick", action="store_true", help="5 steps, 1 repeat: checks that everything runs, not a measurement"
    )
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """Print the table; 0 on success, 2 with a one-line error the user can fix."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return run_reporting_errors(lambda: print(run_benchmark(args, argv), end=""), PROG, args.debug)


if __name__ == "__main__":
    sys.exit(main())
