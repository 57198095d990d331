"""Every distillation method on the same footing: seed pair, full CIFAR-10, same recipe.

    python benchmarks/methods_cifar10.py --data ../shared/data/cifar10-jpeg.tar.gz --seeds 0 1

A row name may carry the method's options: dkd:beta=2, dkd:paper:beta=2 (see parse_row).
Or one process per seed (--seeds 0 --out a.md, --seeds 1 --out b.md), then --merge a.json b.json.

For each seed it trains the teacher and the baseline student once (or loads the teacher
with --teacher-checkpoint, a list with one per seed), then distills a fresh student with
each method, all with the recipe of configs/cifar10_seed.yaml (override with --set), and
writes a markdown table (mean and spread over seeds of last-epoch test top-1, agreement
with the teacher, wall time) to benchmarks/results/methods_cifar10.md. Run by hand; it
takes hours on a CPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

import kdistill
from kdistill.checkpoint import load_model
from kdistill.config import load_config
from kdistill.data.loader import EvalData, Normalize
from kdistill.engine import predict
from kdistill.errors import KDistillError, TrainingError
from kdistill.evaluate import agreement
from kdistill.methods import parse_method_options
from kdistill.methods.dkd import scaled_warmup_epochs
from kdistill.runs import load_data
from kdistill.stats import mcnemar, pack_outcomes, paired_bootstrap, t_interval, unpack_outcomes

BASELINE = "baseline (CE only)"
# the paper's recommended extra CE for feature methods: CE 1 + method (alpha = 1)
FEATURE_RECIPE = {"alpha": 1.0, "ce_weight": 1.0}


def method_options(name: str, epochs: int) -> dict:
    """Paper defaults, except DKD's warm-up: 20 of the paper's 240 epochs, scaled to this schedule."""
    return {"warmup_epochs": scaled_warmup_epochs(epochs)} if name == "dkd" else {}


def parse_row(name: str) -> tuple[str, bool, dict]:
    """A row name: METHOD, then optional ``:paper`` (CE 1 + the method, its paper's loss
    weights, instead of the config's alpha) and ``:KEY=VALUE,...`` (the method's options,
    values parsed as YAML), e.g. ``dkd:beta=2`` or ``dkd:paper:beta=2,temperature=2``."""
    method, *parts = name.split(":")
    if method not in kdistill.METHODS:
        raise SystemExit(
            f"--methods {name!r}: unknown method {method!r}; expected one of: {', '.join(kdistill.METHODS)}"
        )
    paper, options = False, {}
    for part in parts:
        if part == "paper":
            paper = True
            continue
        for item in part.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise SystemExit(f"--methods {name!r}: expected :paper or :KEY=VALUE[,KEY=VALUE], got {part!r}")
            options[key] = yaml.safe_load(value)
    return method, paper, options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=list(kdistill.METHODS),
        help="names; NAME:paper = CE 1 + the method (its paper's weights)",
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--teacher-checkpoint", nargs="*", default=[])
    ap.add_argument(
        "--teacher-cache",
        action="store_true",
        help="logit methods read one teacher cache per seed (kdistill cache-teacher)",
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods_cifar10.md"))
    ap.add_argument(
        "--merge", nargs="+", metavar="JSON", help="only write one table from the .json files of earlier runs"
    )
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, Path(args.out))

    for name in args.methods:  # every row's options are checked before hours of training
        method, _, options = parse_row(name)
        try:
            parse_method_options(method, options)
        except ValueError as e:
            raise SystemExit(f"--methods {name!r}: {e}") from None
    cfg = load_config("cifar10_seed", [f"data.dataset={args.data}", *args.overrides])
    out = Path(args.out)
    # every finished run is kept here at once: a killed benchmark restarts where it stopped
    partial = out.with_suffix(".partial.json")
    done: dict[str, dict] = json.loads(partial.read_text()) if partial.exists() else {}
    rows: dict[str, list[dict]] = {}
    for i, seed in enumerate(args.seeds):
        cfg = cfg.model_copy(update={"seed": seed})
        ds = load_data(cfg)
        torch.manual_seed(seed)
        if args.teacher_checkpoint:
            teacher, _ = load_model(Path(args.teacher_checkpoint[i]))
        else:
            teacher = kdistill.create_model(cfg.teacher.name)
            kdistill.train(teacher, ds, config=cfg.train_for("teacher"), seed=seed, desc=f"teacher s{seed}")
        mean, std = ds.mean_std()
        device = next(teacher.parameters()).device
        teacher_logits = predict(
            teacher, EvalData(ds.test_images, ds.test_labels, 500, device, Normalize(mean, std, device, False))
        )

        def student(seed: int = seed, name: str = cfg.student.name) -> torch.nn.Module:
            torch.manual_seed(seed)  # every student of a seed starts from the same weights
            return kdistill.create_model(name)

        cache, cache_seconds = None, 0.0
        # "dkd:paper": the method with its paper's loss weights (CE 1 + method) instead of the config's alpha
        logit_methods = [m for m in args.methods if not kdistill.METHODS[parse_row(m)[0]].needs_features]
        cache_users = [m for m in logit_methods if f"{seed}:{m}" not in done]  # the runs that share the cache's cost
        if args.teacher_cache and cache_users:
            t0 = time.perf_counter()  # one teacher pass over the run's augmented views, shared by every logit method
            cache = kdistill.cache_teacher(teacher, ds, epochs=cfg.train.epochs, seed=seed)
            cache_seconds = time.perf_counter() - t0

        for name in [BASELINE, *args.methods]:
            key = f"{seed}:{name}"
            if key in done:
                rows.setdefault(name, []).append(done[key])
                continue
            logit_method = name in logit_methods
            method, paper_recipe, options = parse_row(name)
            t0 = time.perf_counter()
            try:
                if name == BASELINE:
                    r = kdistill.train(
                        student(), ds, config=cfg.train_for("student"), seed=seed, desc=f"baseline s{seed}"
                    )
                else:
                    r = kdistill.distill(
                        teacher,
                        student(),
                        ds,
                        methods={method: {**method_options(method, cfg.train.epochs), **options}},
                        config=cfg.train_for("distill"),
                        seed=seed,
                        desc=f"{name} s{seed}",
                        teacher_cache=cache if logit_method else None,
                        **({"alpha": cfg.distill.alpha} if logit_method and not paper_recipe else FEATURE_RECIPE),
                    )
                # a cached run's time includes its share of the one teacher pass
                shared = cache_seconds / len(cache_users) if args.teacher_cache and logit_method else 0.0
                agree = agreement(r.test_logits, teacher_logits)["agreement_top1"]
                row = {
                    "seed": seed,
                    "top1": r.metrics["top1"],
                    # which test images it got right: McNemar's test against the baseline of the seed
                    "test_correct": pack_outcomes((r.test_logits.argmax(1).cpu() == ds.test_labels).numpy()),
                    "agreement": agree,
                    "seconds": time.perf_counter() - t0 + shared,
                }
            except TrainingError as e:  # a collapsed or non-finite run is a result too
                row = {
                    "seed": seed,
                    "top1": None,
                    "failed": str(e).split(": ", 1)[-1].split(". ")[0],
                    "seconds": time.perf_counter() - t0,
                }
            done[key] = row
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(done, indent=2))
            rows.setdefault(name, []).append(row)
        top1 = (teacher_logits.argmax(1) == ds.test_labels).float().mean().item() * 100
        rows.setdefault("teacher", []).append({"seed": seed, "top1": top1, "agreement": 100.0, "seconds": 0.0})

    recipe = (
        f"configs/cifar10_seed.yaml ({cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.train.optimizer.lr}); "
        f"logit methods with alpha {cfg.distill.alpha}, feature methods with CE 1 + method (paper defaults; DKD's warm-up "
        f"{method_options('dkd', cfg.train.epochs)['warmup_epochs']} epochs, 20/240 of the schedule as in the paper). "
        + (
            "Logit methods read one teacher cache per seed (its time is shared among them). "
            if args.teacher_cache
            else ""
        )
        + f"Teacher: {', '.join(args.teacher_checkpoint) or 'trained per seed with the same recipe'}."
    )
    command = "python benchmarks/methods_cifar10.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_table({"commands": [command], "recipe": [recipe], "seeds": args.seeds, "rows": rows}, out)


def write_table(result: dict, out: Path) -> None:
    """The markdown table (and its data as JSON next to it)."""
    rows = result["rows"]
    base = {r["seed"]: r for r in rows[BASELINE]}
    lines = [
        "# Distillation methods on CIFAR-10, seed_teacher -> seed_student",
        "",
        *(f"Command: `{c}`" for c in result["commands"]),
        "",
        *(f"Recipe: {r}" for r in dict.fromkeys(result["recipe"])),
        "",
        f"Seeds: {sorted(set(result['seeds']))}. Last-epoch test top-1: mean ± standard deviation (n - 1) over "
        "seeds. Gain: each seed's difference to the baseline student of the same seed, their mean and its 95% "
        "confidence interval (t-interval over seeds; with one seed a paired bootstrap over the test images). "
        "McNemar: the exact p-value of each seed's paired test against that seed's baseline on the test images "
        "(– where the run did not record its per-image results).",
        "",
        "| method | test top-1 (%) | gain per seed | mean gain (95% CI) | McNemar p per seed "
        "| agreement with teacher (%) | wall time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, rs in rows.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        seconds = f"{statistics.mean(r['seconds'] for r in rs):.0f}"
        failed = [f"seed {r['seed']}: {r['failed']}" for r in rs if r["top1"] is None]
        if failed:
            lines.append(f"| {name} | {'; '.join(failed)} | | | | | {seconds} |")
            continue
        gains = "" if name in ("teacher", BASELINE) else _gain_cells(rs, base)
        lines.append(
            f"| {name} | {_spread([r['top1'] for r in rs])} | {gains or ' | | '} | "
            f"{_spread([r['agreement'] for r in rs])} | {seconds} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))


def _spread(values: list[float]) -> str:
    """Mean ± sample standard deviation over seeds (one seed: its value)."""
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def _gain_cells(rs: list[dict], base: dict[int, dict]) -> str:
    """Per-seed gains, their mean with its 95% interval and each seed's McNemar p, as three cells."""
    gains = [r["top1"] - base[r["seed"]]["top1"] for r in rs]
    outcomes = [
        (unpack_outcomes(base[r["seed"]]["test_correct"]), unpack_outcomes(r["test_correct"]))
        if r.get("test_correct") and base[r["seed"]].get("test_correct")
        else None
        for r in rs
    ]
    interval = t_interval(gains)
    if len(gains) == 1 and outcomes[0] is not None:
        interval = paired_bootstrap(*outcomes[0])
    mean = f"{statistics.mean(gains):+.2f}"
    if interval.get("low") is not None:
        mean += f" ({interval['low']:+.2f} to {interval['high']:+.2f})"
    p_values = ", ".join(f"{mcnemar(*o)['p_value']:.2g}" if o is not None else "–" for o in outcomes)
    return f"{', '.join(f'{g:+.2f}' for g in gains)} | {mean} | {p_values}"


def merge(paths: list[str], out: Path) -> None:
    """One table from runs made separately (e.g. one process per seed)."""
    merged: dict = {"commands": [], "recipe": [], "seeds": [], "rows": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        if "rows" not in part:  # the .partial.json of a run that has not finished: its finished runs
            rows: dict[str, list[dict]] = {}
            for key, row in part.items():
                rows.setdefault(key.split(":", 1)[1], []).append(row)
            part = {
                "commands": [f"(finished runs of an unfinished benchmark, from {path})"],
                "recipe": [],
                "seeds": sorted({r["seed"] for rs in rows.values() for r in rs}),
                "rows": rows,
            }
        merged["commands"] += part["commands"]
        merged["recipe"] += part["recipe"]
        merged["seeds"] += part["seeds"]
        for name, rs in part["rows"].items():
            merged["rows"].setdefault(name, []).extend(rs)
    merged["commands"].append("python benchmarks/methods_cifar10.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    write_table(merged, out)


if __name__ == "__main__":
    try:
        main()
    except KDistillError as e:  # bad data, config or checkpoint: one line, not a traceback
        raise SystemExit(f"error: {e}") from None
