"""How accuracy grows with the time budget: the seed pair, student alone and distilled.

    python benchmarks/budget_curve.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --teacher-checkpoint runs/cifar10_seed/teacher/checkpoint.pt --budgets 1m 2m 5m 10m

For each budget it trains the seed student alone and distilled from the teacher (live,
KD T = 4, alpha 0.5, the recipe of configs/cifar10_seed.yaml, override with --set), each
with ``train.budget`` set to that budget, and writes a markdown table (steps and epochs
reached, wall time, test top-1) with the command and machine to --out.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from machine import machine_description

import kdistill
from kdistill.checkpoint import load_model
from kdistill.config import load_config, parse_duration
from kdistill.runs import load_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--teacher-checkpoint", required=True)
    ap.add_argument("--budgets", nargs="+", default=["1m", "2m", "5m", "10m"])
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "budget.md"))
    args = ap.parse_args()

    # KD, as when benchmarks/results/budget.md was measured (the config itself now uses DKD)
    cfg = load_config(
        "cifar10_seed", [f"data.dataset={args.data}", "distill.methods={kd: {temperature: 4.0}}", *args.overrides]
    )
    ds = load_data(cfg)
    teacher, _ = load_model(Path(args.teacher_checkpoint))
    rows = []
    for text in args.budgets:
        seconds = parse_duration(text)
        runs = {}
        for kind in ("baseline", "distilled"):
            torch.manual_seed(cfg.seed)
            student = kdistill.create_model(cfg.student.name, num_classes=ds.num_classes)
            tcfg = cfg.train_for("student" if kind == "baseline" else "distill").model_copy(update={"budget": seconds})
            if kind == "baseline":
                runs[kind] = kdistill.train(
                    student, ds, config=tcfg, data=cfg.data, seed=cfg.seed, desc=f"{kind} {text}"
                )
            else:
                d = cfg.distill
                runs[kind] = kdistill.distill(
                    teacher,
                    student,
                    ds,
                    methods=d.methods,
                    alpha=d.alpha,
                    config=tcfg,
                    data=cfg.data,
                    seed=cfg.seed,
                    desc=f"{kind} {text}",
                )
        rows.append((text, runs))
    lines = [
        "# Accuracy vs time budget: seed_teacher → seed_student",
        "",
        f"Command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(torch.device('cpu'))}; data {ds.name}.",
        "",
        "| budget | student alone: epochs | top-1 | distilled: epochs | top-1 | wall (distilled) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for text, runs in rows:
        b, d = runs["baseline"], runs["distilled"]
        lines.append(
            f"| {text} | {b.budget['epochs']:.1f} | {b.metrics['top1']:.2f}% | {d.budget['epochs']:.1f} | {d.metrics['top1']:.2f}% | {d.budget['wall_seconds']:.0f} s |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
