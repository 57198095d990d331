"""The fast recipe against the seed study, side by side in one run: wall time and accuracy.

    python benchmarks/time_to_accuracy.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --seeds 0 1 --out benchmarks/results/time_to_accuracy_runs.md

Runs ``kdistill run`` one study after another, alternating so that a drift in the machine's
speed falls on both: the fast study (configs/cifar10_seed_fast.yaml) of the first seed, the
reference study (configs/cifar10_seed.yaml, with --reference-set overrides) of the first
seed, then the fast study of every other seed. Each study's wall time is that of the whole
``kdistill run`` command (training, evaluation, profiling, ONNX/int8 export, report). Writes
a markdown table (per study: wall time, each phase's training time, test top-1 of the
teacher, the student alone and the distilled student, flip TTA beside) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_description, publish

PHASES = ("teacher", "baseline", "distilled")


def run_study(config: str, seed: int, name: str, args, extra: list[str]) -> dict:
    out = Path(args.output_dir)
    cmd = ["kdistill", "run", "--config", config, "--data", args.data, "--seed", str(seed), "--name", name]
    cmd += ["--output-dir", str(out)] + (["--data-dir", args.data_dir] if args.data_dir else [])
    for item in extra:
        cmd += ["--set", item]
    print("$", shlex.join(cmd), flush=True)
    started = time.perf_counter()
    # an empty torch.compile cache: every study compiles (train.compile_teacher) from scratch,
    # as on a user's first run
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        subprocess.run(cmd, check=True, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    summary = json.loads((out / name / "summary.json").read_text())
    summary["command_seconds"] = time.perf_counter() - started
    return summary


def row(label: str, seed: int, s: dict) -> str:
    m = s["models"]
    cells = [f"{m[p]['train_seconds']:.0f} s" for p in PHASES]
    accs = [
        f"{m[p]['test']['top1']:.2f}%" + (f" ({m[p]['test']['top1_tta']:.2f}%)" if "top1_tta" in m[p]["test"] else "")
        for p in PHASES
    ]
    return f"| {label} | {seed} | {s['wall_seconds']:.0f} s | " + " | ".join(cells + accs) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--fast", default="configs/cifar10_seed_fast.yaml")
    ap.add_argument("--reference", default="configs/cifar10_seed.yaml")
    ap.add_argument("--reference-set", action="append", default=[], help="KEY=VALUE for the reference study")
    ap.add_argument("--fast-set", action="append", default=[], help="KEY=VALUE for the fast studies")
    ap.add_argument("--output-dir", default="runs/time_to_accuracy")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "time_to_accuracy_runs.md"))
    args = ap.parse_args()

    first, *others = args.seeds
    fast = {first: run_study(args.fast, first, f"fast_s{first}", args, args.fast_set)}
    reference = run_study(args.reference, first, f"reference_s{first}", args, args.reference_set)
    for seed in others:
        fast[seed] = run_study(args.fast, seed, f"fast_s{seed}", args, args.fast_set)

    lines = [
        "# Time to accuracy: the fast recipe against the seed study",
        "",
        f"Command: `python {shlex.join(sys.argv)}`",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_description(torch.device('cpu'))}.",
        "",
        "| study | seed | whole study | training: teacher | student alone | distilled | test top-1 (flip TTA): teacher | student alone | distilled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        row(f"reference ({args.reference} {' '.join(args.reference_set)})".replace(" )", ")"), first, reference),
        *(row(f"fast ({args.fast} {' '.join(args.fast_set)})".replace(" )", ")"), seed, s) for seed, s in fast.items()),
    ]
    mean = sum(s["wall_seconds"] for s in fast.values()) / len(fast)
    top = {p: sum(s["models"][p]["test"]["top1"] for s in fast.values()) / len(fast) for p in PHASES}
    lines += [
        "",
        f"Fast study, mean of seeds {', '.join(map(str, fast))}: {mean:.0f} s, "
        f"{mean / reference['wall_seconds']:.2f}x the reference's {reference['wall_seconds']:.0f} s; "
        f"teacher {top['teacher']:.2f}%, student alone {top['baseline']:.2f}%, distilled {top['distilled']:.2f}%.",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
