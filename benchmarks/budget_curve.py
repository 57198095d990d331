"""How accuracy grows with the time budget: the seed pair, student alone and distilled.

    python benchmarks/budget_curve.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --teacher-checkpoint runs/cifar10_seed/teacher/checkpoint.pt \
        --budgets 1m 2m 4m 8m 16m --seeds 0 1 --kinds alone live cached

For each seed and budget it trains the seed student with ``train.budget`` set to that budget:
alone, distilled from the live teacher, and distilled from a teacher cache (the recipe of
configs/cifar10_seed.yaml, override with --set). The three are compared at equal student
wall time. Per seed, the student-alone runs go first; the cache then holds one more epoch
than the longest of them reached (so the cached student is never cut short by it), is built
once (its build time is reported, and amortised over the budgets that share it: the views of
epoch e are the same at every budget) and serves every budget. Writes a markdown table
(epochs reached, wall time, test top-1 per kind, the cache's cost) with the command and the
machine to --out.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from machine import machine_description, publish

import kdistill
from kdistill.checkpoint import load_model
from kdistill.config import load_config, parse_duration
from kdistill.runs import load_data

KINDS = ("alone", "live", "cached")


def run_student(cfg, ds, teacher, kind: str, budget: str, seed: int, cache) -> kdistill.Result:
    """The seed student trained for ``budget`` (e.g. "2m"): alone, or distilled from the live
    teacher, or from ``cache``."""
    torch.manual_seed(seed)
    student = kdistill.create_model(cfg.student.name, num_classes=ds.num_classes, **cfg.student.kwargs)
    tcfg = cfg.train_for("student" if kind == "alone" else "distill").model_copy(
        update={"budget": parse_duration(budget)}
    )
    desc = f"{kind} {budget} seed {seed}"
    if kind == "alone":
        return kdistill.train(student, ds, config=tcfg, data=cfg.data, seed=seed, desc=desc)
    d = cfg.distill
    return kdistill.distill(
        teacher,
        student,
        ds,
        methods=d.methods,
        alpha=d.alpha,
        config=tcfg,
        data=cfg.data,
        seed=seed,
        desc=desc,
        teacher_cache=cache,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None, help="decoded-data cache folder (data.data_dir)")
    ap.add_argument("--teacher-checkpoint", required=True)
    ap.add_argument("--budgets", nargs="+", default=["1m", "2m", "4m", "8m", "16m"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "budget.md"))
    args = ap.parse_args()

    extra = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    cfg = load_config("cifar10_seed", [f"data.dataset={args.data}", *extra, *args.overrides])
    ds = load_data(cfg)
    teacher, checkpoint = load_model(Path(args.teacher_checkpoint))
    rows, caches = [], {}
    for seed in args.seeds:
        runs: dict[tuple[str, str], kdistill.Result] = {}
        for kind in (k for k in KINDS if k in args.kinds):
            cache = None
            if kind == "cached":
                reached = [r.budget["epochs"] for (k, _), r in runs.items() if k == "alone"]
                epochs = math.ceil(max(reached)) + 1 if reached else 100
                started = time.perf_counter()
                cache = kdistill.cache_teacher(teacher, ds, epochs=epochs, data=cfg.data, seed=seed)
                caches[seed] = (epochs, time.perf_counter() - started)
            for text in args.budgets:
                runs[kind, text] = run_student(cfg, ds, teacher, kind, text, seed, cache)
        rows += [(seed, text, runs) for text in args.budgets]

    lines = [
        f"# Accuracy vs time budget: {checkpoint['model_spec']['name']} -> {cfg.student.name}",
        "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(torch.device('cpu'))}; data {ds.name}.",
        "",
        "| seed | budget | " + " | ".join(f"{k}: epochs | {k}: top-1" for k in args.kinds) + " |",
        "| --- | --- | " + " | ".join("---: | ---:" for _ in args.kinds) + " |",
    ]
    for seed, text, runs in rows:
        cells = [f"{runs[k, text].budget['epochs']:.1f} | {runs[k, text].metrics['top1']:.2f}%" for k in args.kinds]
        lines.append(f"| {seed} | {text} | " + " | ".join(cells) + " |")
    for seed, (epochs, seconds) in caches.items():
        lines.append("")
        lines.append(
            f"Teacher cache, seed {seed}: {epochs} epochs of views, built in {seconds:.0f} s once for the "
            f"{len(args.budgets)} budgets ({seconds / len(args.budgets):.0f} s each, amortised)."
        )
    publish(lines, args.out)


if __name__ == "__main__":
    main()
