"""One report comparing several study runs (methods, temperatures, seeds) side by side:
``report.md``, ``report.html``, ``figures/`` and ``comparison.csv`` (every model of every
run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdistill.errors import ReportError
from kdistill.files import atomic_write_text
from kdistill.logger import to_csv
from kdistill.report.document import Block, Figure, Heading, Note, Paragraph, Table, write_documents
from kdistill.report.figures import (
    FIGURES,
    plot_class_deltas,
    plot_curves,
    plot_pareto,
    plot_reliability,
)
from kdistill.report.format import fmt_num, nested
from kdistill.report.phases import label
from kdistill.report.run_report import Run, headline, load_run, model_rows, pareto_points
from kdistill.stats import describe_gain, t_interval


def default_comparison_dir(runs: list[Run]) -> Path:
    return Path("reports") / "-vs-".join(r.name for r in runs)[:120]


def write_comparison(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """One report comparing several study runs (e.g. methods or temperatures): a table per
    run, accuracy against cost of every model, the distilled students' training curves,
    calibration and per-class gains side by side. Returns the path of report.md."""
    runs = _load_runs(run_dirs)
    out = Path(out_dir) if out_dir else default_comparison_dir(runs)
    out.mkdir(parents=True, exist_ok=True)
    statistics = over_runs(runs)
    cost = cost_over_runs(runs)
    blocks = [
        *_summary_blocks(runs),
        *_statistics_blocks(runs, statistics),
        *_cost_blocks(cost),
        *_figure_blocks(runs, out),
    ]
    summary = {"runs": [str(r.path) for r in runs], "statistics": statistics, "cost": cost}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2), "summary")
    csv_rows = [{**r, "settings": run.settings()} for run in runs for r in model_rows(run)]
    atomic_write_text(out / "comparison.csv", to_csv(csv_rows), "comparison")
    blocks.append(
        Note(
            "Written by kdistill from the runs' summary.json and metrics.jsonl; every model's numbers are in comparison.csv."
        )
    )
    return write_documents(blocks, out, f"kdistill comparison: {', '.join(r.name for r in runs)}")


def _load_runs(run_dirs: list[Path]) -> list[Run]:
    """The runs, named by their folders (by their paths where two folders share a name)."""
    if len(run_dirs) < 2:
        raise ReportError("a comparison needs at least two run directories")
    runs = [load_run(Path(d)) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):  # same folder name under different parents: use the paths
        for r in runs:
            r.display = str(r.path)
        names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"run directory {names[0]} given twice; compare different runs")
    return runs


def _summary_blocks(runs: list[Run]) -> list[Block]:
    """The runs' settings and one table row per run: what distillation bought in each."""
    headers = [
        "run",
        "data",
        "distillation",
        "epochs",
        "teacher top-1",
        "baseline top-1",
        "distilled top-1",
        "gain (points)",
        "gap closed",
        "distilled ECE",
        "agreement with teacher",
        "int8 top-1",
        "student CPU latency b=1",
    ]
    return [
        Heading(f"kdistill comparison of {len(runs)} runs"),
        Paragraph("Runs: " + ", ".join(f"**{r.name}** ({r.settings()}, seed {r.summary['seed']})" for r in runs) + "."),
        Heading("What distillation bought in each run", 2),
        Table(headers, [_summary_row(run) for run in runs], right=set(range(3, 13))),
        Note(
            "Gain: distilled minus baseline test top-1 of the same run; gap closed: gain as a share of teacher minus baseline. "
            "Runs on the same data with the same seed share their teacher and baseline recipe, so their distilled students "
            "differ by the distillation settings alone."
        ),
    ]


def over_runs(runs: list[Run]) -> dict[str, Any]:
    """Each model's test top-1 as mean and standard deviation over the runs, the gain of each
    run (with its own interval and McNemar's p where the run recorded them), and the mean
    gain's t-interval over the runs."""
    top1 = {p: [r.models[p]["test"]["top1"] for r in runs] for p in ("teacher", "baseline", "distilled")}
    per_run = []
    for r in runs:
        stats = r.summary.get("statistics") or {}
        entry = {"run": r.name, "seed": r.summary.get("seed"), "gain": headline(r.summary)["gain_top1"]}
        if "gain" in stats:
            entry.update(low=stats["gain"]["low"], high=stats["gain"]["high"], mcnemar_p=stats["mcnemar"]["p_value"])
        per_run.append(entry)
    models = {}
    for phase, values in top1.items():
        t = t_interval(values)
        models[phase] = {"mean": t["mean"], "std": t["std"], "values": values}
    return {"models": models, "runs": per_run, "gain": t_interval([e["gain"] for e in per_run])}


def _statistics_blocks(runs: list[Run], statistics: dict[str, Any]) -> list[Block]:
    """The gain over the runs with its t-interval, each model's mean and spread, each run's gain."""
    seeds = {r.summary.get("seed") for r in runs}
    basis = f"t-interval over {len(runs)} runs" + (" with different seeds" if len(seeds) == len(runs) else "")
    rows = [
        [label(p), fmt_num(m["mean"], ".2f", "%"), fmt_num(m["std"], ".2f")] for p, m in statistics["models"].items()
    ]
    per_run = [
        [
            e["run"],
            fmt_num(e["seed"], "d"),
            fmt_num(e["gain"], "+.2f"),
            fmt_num(e.get("low"), "+.2f"),
            fmt_num(e.get("high"), "+.2f"),
            fmt_num(e.get("mcnemar_p"), ".3g"),
        ]
        for e in statistics["runs"]
    ]
    return [
        Heading("How sure the gain is", 2),
        Paragraph(f"Over these runs the distillation gain is **{describe_gain(statistics['gain'], basis)}**."),
        Table(["model", "mean test top-1", "standard deviation"], rows, right={1, 2}),
        Table(
            ["run", "seed", "gain (points)", "95% CI low", "95% CI high", "McNemar p"], per_run, right=set(range(1, 6))
        ),
        Note(
            "The mean and its interval mean something when the runs differ only in their seed. Each run's own interval "
            "(paired bootstrap over its test images) and McNemar's exact test cover the test set's sampling only."
        ),
    ]


PHASES = ("teacher", "baseline", "distilled")


def cost_over_runs(runs: list[Run]) -> dict[str, Any]:
    """What each run cost: each phase's training seconds and images/s (None where the run
    did not train that phase, e.g. a teacher shared with another seed) and the run's wall
    time; the totals over the runs."""
    per_run = []
    for r in runs:
        phases = {}
        for p in PHASES:
            m = r.models.get(p) or {}
            trained = bool(m.get("train_seconds"))
            phases[p] = {
                "train_seconds": m["train_seconds"] if trained else None,
                "images_per_second": m.get("images_per_second") if trained else None,
            }
        cache = (r.models.get("distilled") or {}).get("teacher_cache")
        per_run.append(
            {"run": r.name, "phases": phases, "wall_seconds": r.summary.get("wall_seconds"), "teacher_cache": cache}
        )
    total = {p: sum(e["phases"][p]["train_seconds"] or 0 for e in per_run) for p in PHASES}
    caches = {
        e["teacher_cache"]["path"]: e["teacher_cache"]["build_seconds"] or 0 for e in per_run if e["teacher_cache"]
    }
    total["teacher_cache_seconds"] = sum(caches.values())  # each cache built once, however many runs read it
    walls = [e["wall_seconds"] for e in per_run]
    total["wall_seconds"] = sum(walls) if None not in walls else None
    return {"runs": per_run, "total": total}


def _cost_blocks(cost: dict[str, Any]) -> list[Block]:
    """Each run's phases: training time and images/s, and its wall time; the totals."""

    def phase(entry: dict[str, Any]) -> str:
        if entry["train_seconds"] is None:
            return "–"
        return f"{entry['train_seconds']:.0f} s ({fmt_num(entry['images_per_second'], '.0f')} img/s)"

    def cache(entry: dict[str, Any]) -> str:
        c = entry["teacher_cache"]
        if not c:
            return "–"
        return f"{fmt_num(c['build_seconds'], '.0f', ' s')} ({c['epochs']} epochs of views)"

    rows = [
        [e["run"], *(phase(e["phases"][p]) for p in PHASES), cache(e), fmt_num(e["wall_seconds"], ".0f", " s")]
        for e in cost["runs"]
    ]
    total = cost["total"]
    rows.append(
        [
            "total",
            *(f"{total[p]:.0f} s" for p in PHASES),
            f"{total['teacher_cache_seconds']:.0f} s" if total["teacher_cache_seconds"] else "–",
            fmt_num(total["wall_seconds"], ".0f", " s"),
        ]
    )
    headers = ["run", *(f"{label(p)}: training" for p in PHASES), "teacher cache: built", "whole run (wall)"]
    return [
        Heading("What each run cost", 2),
        Table(headers, rows, right={1, 2, 3, 4, 5}),
        Note(
            "Training: each phase's training time and its median training images/s (– where the run did not train "
            "that phase: a teacher shared with another run, a checkpoint given). Teacher cache: the time it took to "
            "build the cache the distilled student read its teacher's logits from, once for every run that reads it "
            "(not in the distilled student's training time; the total counts each cache once). Whole run: the wall "
            "time of the run, evaluation, profiling, export and report included."
        ),
    ]


def _summary_row(run: Run) -> list[str]:
    h = headline(run.summary)
    m = run.models
    dep = run.summary.get("deployment") or {}
    return [
        run.name,
        run.summary["data"]["dataset"],
        run.settings(),
        fmt_num(nested(m, "distilled", "epochs"), "d"),
        fmt_num(m["teacher"]["test"]["top1"], ".2f", "%"),
        fmt_num(m["baseline"]["test"]["top1"], ".2f", "%"),
        fmt_num(m["distilled"]["test"]["top1"], ".2f", "%"),
        fmt_num(h["gain_top1"], "+.2f"),
        fmt_num(h["gap_closed"] * 100 if h["gap_closed"] is not None else None, ".0f", "%"),
        fmt_num(nested(m, "distilled", "test", "ece"), ".3f"),
        fmt_num(nested(m, "distilled", "agreement", "agreement_top1"), ".2f", "%"),
        fmt_num(nested(dep, "int8", "top1"), ".2f", "%"),
        fmt_num(nested(m, "distilled", "profile", "latency_b1", "median_ms"), ".2f", " ms"),
    ]


def _figure_blocks(runs: list[Run], out: Path) -> list[Block]:
    """Accuracy against cost, the distilled students' curves, per-class gains, calibration."""
    fig_dir = out / FIGURES
    points = [p for run in runs for p in pareto_points(run, prefix=f"{run.name}: ", with_int8=False)]
    histories = {run.name: run.histories.get("distilled", []) for run in runs}
    blocks: list[Block] = [
        Heading("Accuracy against cost", 2),
        Figure(
            plot_pareto(points, fig_dir / "pareto.png").relative_to(out),
            "test top-1 of every model of every run against MACs and CPU latency at batch 1",
        ),
        Heading("Training curves of the distilled students", 2),
        Figure(
            plot_curves(histories, fig_dir / "curves.png", {n: n for n in histories}).relative_to(out),
            "training loss, top-1 accuracy and learning rate per epoch of each run's distilled student",
        ),
    ]
    deltas = {}
    for run in runs:
        base = nested(run.models, "baseline", "test", "per_class_top1", default={})
        dist = nested(run.models, "distilled", "test", "per_class_top1", default={})
        deltas[run.name] = {c: dist[c] - base[c] for c in base if c in dist}
    if all(deltas.values()):
        fig = plot_class_deltas(deltas, fig_dir / "class_deltas.png")
        names = list(deltas)
        rows = [[c, *(fmt_num(deltas[n].get(c), "+.1f") for n in names)] for c in next(iter(deltas.values()))]
        blocks += [
            Heading("Which classes distillation helped", 2),
            Figure(
                fig.relative_to(out),
                "per-class test top-1 of each run's distilled student minus its baseline, in points",
            ),
            Table(["class", *names], rows, right=set(range(1, len(names) + 1))),
        ]
    calibrations = {
        run.name: run.models["distilled"]["test"]["calibration"]
        for run in runs
        if "calibration" in run.models["distilled"]["test"]
    }
    if calibrations:
        fig = plot_reliability(calibrations, fig_dir / "reliability.png")
        blocks += [
            Heading("Calibration of the distilled students", 2),
            Figure(fig.relative_to(out), "reliability diagram of each run's distilled student"),
        ]
    return blocks
