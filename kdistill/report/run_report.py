"""The report of one study run (``kdistill run``), written from its run directory alone:
``report.md``, ``report.html``, figures in ``figures/`` (``curves.png`` at the top) and
``summary.csv`` (one row per model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdistill.errors import ReportError
from kdistill.files import atomic_write_text
from kdistill.logger import to_csv
from kdistill.report.document import Block, Figure, Heading, Note, Paragraph, Table, write_documents
from kdistill.report.figures import (
    FIGURES,
    plot_class_deltas,
    plot_confusions,
    plot_curves,
    plot_pareto,
    plot_reliability,
)
from kdistill.report.format import fmt_bytes, fmt_count, fmt_num, nested
from kdistill.report.phases import COLORS, PHASES, label, phase_order
from kdistill.stats import describe_gain


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """The two numbers that matter: what distillation bought and what the student costs.
    ``gap_closed`` (the gain as a share of teacher minus student alone) is None when the
    teacher is not better than the student alone: then there is no gap to close."""
    t, b, d = (summary["models"][p] for p in PHASES)
    gap = t["test"]["top1"] - b["test"]["top1"]
    return {
        "gain_top1": d["test"]["top1"] - b["test"]["top1"],
        "gap_closed": (d["test"]["top1"] - b["test"]["top1"]) / gap if gap > 0 else None,  # JSON null
        "params_fraction": d["profile"]["parameters"] / t["profile"]["parameters"],
        "macs_fraction": d["profile"]["macs"] / t["profile"]["macs"],
        "latency_fraction": d["profile"]["latency_b1"]["median_ms"] / t["profile"]["latency_b1"]["median_ms"],
    }


def headline_sentence(summary: dict[str, Any]) -> str:
    """The headline in words, true in every sign case: a gain, a loss or no change, a student
    that beat its teacher, and a teacher that is no better than the student alone (warned)."""
    h = headline(summary)
    t, b, d = (summary["models"][p]["test"]["top1"] for p in PHASES)
    gain = h["gain_top1"]
    if gain > 0:
        what = f"**Distillation bought {gain:+.2f} points of test top-1** over the same student trained alone"
    elif gain < 0:
        what = f"**Distillation cost {-gain:.2f} points of test top-1** against the same student trained alone"
    else:
        what = "**Distillation left test top-1 unchanged** against the same student trained alone"
    if t <= b:
        what += f" (**warning: the teacher, {t:.2f}%, is not better than the student alone, {b:.2f}%**: it has little to teach; train it longer or choose a stronger one)"
    elif d > t:
        what += f" (the distilled student, {d:.2f}%, beat its teacher, {t:.2f}%)"
    elif gain > 0:
        what += f" ({h['gap_closed'] * 100:.0f}% of the teacher–student gap closed)"
    elif gain < 0:
        what += f" (the teacher–student gap widened from {t - b:.2f} to {t - d:.2f} points)"
    steps = (summary.get("budget_plan") or {}).get("student_steps")
    if steps:  # a budgeted study: what the comparison was made at
        what += f", both students trained for {steps} steps"
    return (
        f"{what}, **at {h['params_fraction'] * 100:.1f}% of the teacher's parameters and {h['macs_fraction'] * 100:.1f}% of its MACs** "
        f"({h['latency_fraction'] * 100:.0f}% of its batch-1 CPU latency)."
    )


def gain_words(summary: dict[str, Any]) -> str:
    """The gain with its interval in words (from ``summary["statistics"]``), e.g. "+2.20
    points (95% CI +0.90 to +3.50, paired bootstrap over 1000 test images)"; the bare gain for
    a run written before intervals were recorded."""
    stats = summary.get("statistics") or {}
    if "gain" not in stats:
        return f"{headline(summary)['gain_top1']:+.2f} points"
    return describe_gain(stats["gain"], f"paired bootstrap over {stats['gain']['n']} test images")


def interval_sentence(summary: dict[str, Any]) -> str | None:
    """How sure the gain is, in one sentence for the report (None for older runs)."""
    stats = summary.get("statistics") or {}
    if "gain" not in stats:
        return None
    m = stats["mcnemar"]
    return (
        f"How sure: the gain is {gain_words(summary)}. McNemar's exact test on the images the two students disagree on "
        f"(the distilled one right and the baseline wrong on {m['only_b']}, the reverse on {m['only_a']}): "
        f"p = {m['p_value']:.3g}. One seed: another seed moves both students; `kdistill run --seed N` for more."
    )


def cost_sentence(summary: dict[str, Any]) -> str | None:
    """What the gain cost: each trained phase's training time and images/s, and the study's
    wall time (None for a summary without them)."""
    models = summary.get("models") or {}
    phases = [(p, m) for p, m in models.items() if m.get("train_seconds")]
    if not phases or "wall_seconds" not in summary:
        return None
    parts = ", ".join(
        f"{label(p)}{' (fine-tuning)' if m.get('finetuned') else ''} {m['train_seconds']:.0f} s "
        f"({m['images_per_second']:.0f} img/s{_at_size(m, models)})"
        for p, m in phases
    )
    text = f"What it cost: training {parts}; the whole study {summary['wall_seconds']:.0f} s of wall time."
    views = (models.get("distilled") or {}).get("teacher_views")
    if views:
        text += (
            f" The distilled student's views repeated every {views['period']} epoch(s): its teacher ran over them once "
            f"({views['build_seconds']:.0f} s, in its training time)."
        )
    cache = (models.get("distilled") or {}).get("teacher_cache")
    if cache:
        text += (
            f" The distilled student read its teacher's logits from a teacher cache ({cache['epochs']} epoch(s) of views) "
            + (f"built in {cache['build_seconds']:.0f} s " if cache.get("build_seconds") is not None else "built ")
            + "once for every run that reads it: not in its training time."
        )
    return text


def _at_size(model: dict[str, Any], models: dict[str, Any]) -> str:
    """`` at 64 px`` where the models take different input sizes, else nothing."""
    sizes = {m.get("input_size") for m in models.values()}
    return f" at {model['input_size']} px" if len(sizes) > 1 and model.get("input_size") else ""


# ----------------------------------------------------------------------------- run directories


@dataclass
class Run:
    """What a report needs from one run directory."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    display: str = ""  # the run's name in a comparison (default: the folder's name)
    out_dir: Path | None = None  # where its report goes (default: the run directory)

    @property
    def out(self) -> Path:
        return self.out_dir or self.path

    @property
    def name(self) -> str:
        return self.display or self.path.name

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.summary["models"]

    def settings(self) -> str:
        """The distillation settings in one line, e.g. ``kd (temperature 2.0), alpha 0.9``."""
        d = self.config.get("distill") or {}
        methods = d.get("methods") or {}
        parts = []
        for name, options in methods.items():
            opts = ", ".join(f"{k} {v}" for k, v in (options or {}).items() if k != "weight" or v != 1.0)
            parts.append(f"{name} ({opts})" if opts else name)
        text = " + ".join(parts) or self.summary.get("method", "?")
        if "alpha" in d:
            text += f", alpha {d['alpha']}"
        return text


def read_metrics(phase_dir: Path) -> list[dict[str, Any]]:
    path = phase_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ReportError(
            f"{run_dir} is not a finished run directory: {path} does not exist (it is written when `kdistill run` finishes)"
        )
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is unreadable: {e}") from None
    if not isinstance(summary, dict) or not all(p in summary.get("models", {}) for p in PHASES):
        raise ReportError(
            f"{path} is not the summary of a study run (expected models {', '.join(PHASES)}); reports cover `kdistill run` directories"
        )
    config = {}
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            config = {}
    histories = {}
    for phase_dir in sorted(
        (p for p in run_dir.iterdir() if (p / "metrics.jsonl").exists()), key=lambda p: phase_order(p.name)
    ):
        histories[phase_dir.name] = read_metrics(phase_dir)
    return Run(run_dir, summary, config if isinstance(config, dict) else {}, histories)


def model_rows(run: Run) -> list[dict[str, Any]]:
    """One flat row per model of a run: the numbers of summary.csv and of the tables."""
    rows = []
    for phase, m in run.models.items():
        p, t, a = m.get("profile", {}), m.get("test", {}), m.get("agreement", {})
        rows.append(
            {
                "run": run.name,
                "phase": phase,
                "model": m.get("model"),
                "top1": t.get("top1"),
                "top1_tta": t.get("top1_tta"),  # flip test-time augmentation (train.eval_tta)
                "top1_raw": t.get("top1_raw"),  # the trained weights' own, when the model is their average (train.ema)
                "top5": t.get("top5"),
                "nll": t.get("nll"),
                "ece": t.get("ece"),
                "agreement_top1": a.get("agreement_top1", 100.0 if phase == "teacher" else None),
                "mean_kl": a.get("mean_kl", 0.0 if phase == "teacher" else None),
                "parameters": p.get("parameters"),
                "macs": p.get("macs"),
                "disk_bytes": p.get("disk_bytes"),
                "cpu_latency_b1_ms": nested(p, "latency_b1", "median_ms"),
                "cpu_latency_b1_p90_ms": nested(p, "latency_b1", "p90_ms"),
                "cpu_throughput_b256": nested(p, "throughput_b256", "images_per_second"),
                "gpu_latency_b1_ms": nested(p, "gpu", "latency_b1", "median_ms"),
                "gpu_throughput_b256": nested(p, "gpu", "throughput_b256", "images_per_second"),
                "input_size": m.get("input_size"),  # the side of the images the model takes
                "train_seconds": m.get("train_seconds"),
                "train_images_per_second": m.get("images_per_second"),
                "epochs": m.get("epochs"),
            }
        )
    return rows


def pareto_points(run: Run, prefix: str = "", with_int8: bool = True) -> list[dict[str, Any]]:
    """The run's models (and its int8 student) as points of :func:`plot_pareto`."""
    points = []
    for phase, m in run.models.items():
        points.append(
            {
                "label": f"{prefix}{label(phase)}",
                "top1": m["test"]["top1"],
                "macs": nested(m, "profile", "macs"),
                "latency_ms": nested(m, "profile", "latency_b1", "median_ms"),
                "color": COLORS.get(phase, "#9467bd"),
            }
        )
    dep = run.summary.get("deployment") or {}
    if with_int8 and "int8" in dep:
        points.append(
            {
                "label": f"{prefix}distilled int8 (ONNX Runtime)",
                "top1": dep["int8"]["top1"],
                "macs": None,
                "latency_ms": nested(dep, "int8", "latency_b1", "median_ms"),
                "color": COLORS["distilled"],
                "marker": "s",
            }
        )
    return points


# ----------------------------------------------------------------------------- the report


def write_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write report.md, report.html, figures/*.png, curves.png and summary.csv for a finished
    study run, from its run directory alone, into the run directory (or ``out_dir``).
    Returns the path of report.md."""
    run = load_run(Path(run_dir))
    run.out_dir = Path(out_dir) if out_dir else None
    atomic_write_text(run.out / "summary.csv", to_csv(model_rows(run)), "summary")
    blocks = [
        *_overview_blocks(run),
        *_deployment_blocks(run),
        *_cost_and_curve_blocks(run),
        *_class_blocks(run),
        *_diagnostic_blocks(run),
        Note(
            f"Written by kdistill from {run.path.name}/ (summary.json, metrics.jsonl); the same numbers are in summary.csv."
        ),
    ]
    return write_documents(blocks, run.out, f"kdistill study: {run.summary['name']}")


def _overview_blocks(run: Run) -> list[Block]:
    """The data and settings, the headline, every model's numbers and the time budget."""
    summary, models = run.summary, run.models
    data = summary["data"]
    blocks: list[Block] = [
        Heading(f"kdistill study: {summary['name']}"),
        Paragraph(
            f"Data: **{data['dataset']}** ({data['train_size']} training, {data['test_size']} test images, {data['num_classes']} classes). "
            f"Distillation: **{run.settings()}**. Seed {summary['seed']}. Device: {summary['device']}. {summary.get('platform', '')}"
        ),
        Paragraph(headline_sentence(summary)),
        *([Paragraph(sentence)] if (sentence := interval_sentence(summary)) else []),
        *([Paragraph(sentence)] if (sentence := cost_sentence(summary)) else []),
        Heading("What each model is worth and what it costs", 2),
        _models_table(run),
        Note(
            "Accuracies are from the last epoch (not the best one). NLL: mean cross-entropy on the test set. ECE: expected "
            "calibration error over 15 equal-width confidence bins (0 is perfectly calibrated). Agreement: share of test images "
            "on which the model's top-1 class equals the teacher's; KL: mean KL(teacher || model) at T=1. Size: the float32 "
            "weights as saved by torch.save. Latency: median and 90th percentile of repeated forward passes after warm-up "
            "(throughput: images per second at batch 256)."
            + (
                " The teacher was loaded from a checkpoint, so its training time is not counted."
                if models["teacher"].get("from_checkpoint")
                else ""
            )
        ),
    ]
    if summary.get("budget_seconds"):
        reached = ", ".join(
            f"{label(phase)} {m['budget']['steps']} steps ({m['budget']['epochs']:.1f} epochs)"
            for phase, m in models.items()
            if m.get("budget")
        )
        blocks.append(
            Paragraph(
                f"Time budget: {summary['budget_seconds']:.0f} s; the study took {summary['wall_seconds']:.0f} s "
                f"({100 * summary['wall_seconds'] / summary['budget_seconds']:.0f}%). Reached: {reached}."
            )
        )
        blocks += budget_blocks(summary)
    return blocks


def budget_blocks(summary: dict[str, Any]) -> list[Block]:
    """How a budgeted study spent its budget: planned against spent, phase by phase, and
    what the two students were given (nothing for a study written before plans were kept)."""
    plan = summary.get("budget_plan")
    if not plan:
        return []
    models = summary["models"]
    steps = {p: (models.get(p, {}).get("budget") or {}).get("steps") for p in ("baseline", "distilled")}
    if steps["baseline"] is not None and steps["baseline"] == steps["distilled"]:
        fair = (
            f"**Both students: {steps['baseline']} steps** (the same batches, from the same initial weights), so the gain "
            f"is distillation's alone. Their training times, {models['baseline']['train_seconds']:.1f} s alone and "
            f"{models['distilled']['train_seconds']:.1f} s distilled, differ by what distillation costs (the teacher's "
            "forward passes, or the cache's lookups) and by the machine's load."
        )
    else:
        fair = (
            f"**Warning: the students did not get the same steps** (student alone {steps['baseline']}, distilled "
            f"{steps['distilled']}: the budget ran out), so the gain mixes distillation with the difference in training."
        )
    rows = [
        [
            label(phase),
            f"{p['planned_seconds']:.1f} s",
            _maybe(p.get("spent_seconds"), "{:.1f} s"),
            str(p["planned_steps"]),
            _maybe(p.get("steps"), "{}"),
            f"{p['step_seconds'] * 1000:.0f} ms",
        ]
        for phase, p in plan["phases"].items()
    ]
    e = plan["evaluation"]
    rows.append(
        [
            "evaluation, profiling, export, report",
            f"{e['planned_seconds']:.1f} s",
            f"{e['spent_seconds']:.1f} s",
            "",
            "",
            "",
        ]
    )
    rows.insert(
        0,
        ["loading and measuring", f"{plan['planning_seconds']:.1f} s", f"{plan['planning_seconds']:.1f} s", "", "", ""],
    )
    cache = plan.get("teacher_cache")
    if cache and cache.get("build_seconds") is not None:
        rows.append(
            [
                "teacher cache (built before, for every run that reads it)",
                "",
                f"{cache['build_seconds']:.1f} s",
                "",
                "",
                "",
            ]
        )
    return [
        Heading("How the budget was spent", 2),
        Paragraph(fair),
        Table(["phase", "planned", "spent", "planned steps", "steps", "measured step"], rows, right={1, 2, 3, 4, 5}),
        Note(
            "The plan: every phase's step was timed on a few steps before training, and the budget left after loading "
            "and measuring (less what the evaluation and report keep) was split so that every phase takes the same "
            "number of steps. Each phase then gets its share of the time left when it starts and plans its own steps "
            "from its measured speed; the distilled student trains for the student alone's steps."
            + (f" {plan['note']}." if plan.get("note") else "")
        ),
    ]


def _maybe(value: Any, pattern: str) -> str:
    return "" if value is None else pattern.format(value)


# optional top-1 columns of the models table, shown when a run measured them
EXTRA_TOP1 = {"top1_tta": "top-1 with flip TTA", "top1_raw": "top-1 without the weight average"}


def _models_table(run: Run) -> Table:
    """Accuracy, calibration, agreement and cost of every model (GPU columns if measured)."""
    gpu = any(r["gpu_latency_b1_ms"] is not None for r in model_rows(run))
    extra = [k for k in ("top1_tta", "top1_raw") if any(r[k] is not None for r in model_rows(run))]
    sizes = len({r["input_size"] for r in model_rows(run)}) > 1  # models at their own resolutions
    headers = [
        "model",
        "architecture",
        *(["input"] if sizes else []),
        "test top-1",
        *[EXTRA_TOP1[k] for k in extra],
        "top-5",
        "NLL",
        "ECE",
        "agreement with teacher",
        "KL to teacher",
        "parameters",
        "MACs",
        "size on disk",
        "CPU latency b=1 (median / p90)",
        "CPU throughput b=256",
    ]
    if gpu:
        headers += ["GPU latency b=1", "GPU throughput b=256"]
    headers += ["training time", "train img/s"]
    rows = []
    for r in model_rows(run):
        row = [
            label(r["phase"]),
            str(r["model"]),
            *([fmt_num(r["input_size"], ".0f", " px")] if sizes else []),
            fmt_num(r["top1"], ".2f", "%"),
            *[fmt_num(r[k], ".2f", "%") for k in extra],
            fmt_num(r["top5"], ".2f", "%"),
            fmt_num(r["nll"], ".3f"),
            fmt_num(r["ece"], ".3f"),
            fmt_num(r["agreement_top1"], ".2f", "%"),
            fmt_num(r["mean_kl"], ".4f"),
            fmt_count(r["parameters"]) if r["parameters"] is not None else "n/a",
            fmt_count(r["macs"]) if r["macs"] is not None else "n/a",
            fmt_bytes(r["disk_bytes"]),
            f"{fmt_num(r['cpu_latency_b1_ms'], '.2f')} / {fmt_num(r['cpu_latency_b1_p90_ms'], '.2f')} ms",
            fmt_num(r["cpu_throughput_b256"], ".0f", " img/s"),
        ]
        if gpu:
            row += [fmt_num(r["gpu_latency_b1_ms"], ".3f", " ms"), fmt_num(r["gpu_throughput_b256"], ".0f", " img/s")]
        row += [fmt_num(r["train_seconds"], ".0f", " s"), fmt_num(r["train_images_per_second"], ".0f")]
        rows.append(row)
    return Table(headers, rows, right=set(range(2, len(headers))))


def _deployment_blocks(run: Run) -> list[Block]:
    """The distilled student as PyTorch, ONNX and int8 model, or how to export it."""
    dep = run.summary.get("deployment")
    if not dep:
        return [
            Heading("Deployment", 2),
            Paragraph(
                "No ONNX export in this run (`deploy.onnx` off, or the export extra not installed: `pip install 'kdistill[export]'`). "
                "Export any checkpoint later with `kdistill export CHECKPOINT --format onnx --quantize static`."
            ),
        ]
    headers = [
        "distilled student as",
        "file",
        "test top-1",
        "top-1 identical to PyTorch",
        "max logit difference",
        "CPU latency b=1 (median / p90)",
        "CPU throughput b=256",
        "size on disk",
    ]
    d = run.models["distilled"]
    rows = [
        [
            "PyTorch (float32)",
            "checkpoint.pt",
            fmt_num(dep.get("pytorch_top1", d["test"]["top1"]), ".2f", "%"),
            "100.00%",
            "0",
            f"{fmt_num(nested(d, 'profile', 'latency_b1', 'median_ms'), '.2f')} / {fmt_num(nested(d, 'profile', 'latency_b1', 'p90_ms'), '.2f')} ms",
            fmt_num(nested(d, "profile", "throughput_b256", "images_per_second"), ".0f", " img/s"),
            fmt_bytes(nested(d, "profile", "disk_bytes")),
        ]
    ]
    for key, name in (
        ("onnx", "ONNX Runtime (float32)"),
        ("int8", f"ONNX Runtime int8 ({nested(dep, 'int8', 'mode', default='')})"),
    ):
        e = dep.get(key)
        if not e:
            continue
        rows.append(
            [
                name,
                Path(e["path"]).name,
                fmt_num(e["top1"], ".2f", "%"),
                fmt_num(e["top1_agreement"], ".2f", "%"),
                fmt_num(e["max_abs_diff"], ".1e"),
                f"{fmt_num(nested(e, 'latency_b1', 'median_ms'), '.2f')} / {fmt_num(nested(e, 'latency_b1', 'p90_ms'), '.2f')} ms",
                fmt_num(nested(e, "throughput_b256", "images_per_second"), ".0f", " img/s"),
                fmt_bytes(e.get("disk_bytes")),
            ]
        )
    note = (
        f"The ONNX file was verified with ONNX Runtime on {nested(dep, 'onnx', 'num_images', default='the')} test images "
        "(max |logit difference| <= 1e-4, identical top-1 on >= 99.9% required). Its inputs are float32 images normalised "
        "as documented in the file's metadata (`preprocessing`)."
    )
    if "int8" in dep:
        i8 = dep["int8"]
        how = (
            f"calibrated on {i8['calibration_images']} training images"
            if i8["mode"] == "static"
            else "activation ranges computed at run time"
        )
        note += f" The int8 model is post-training quantized ({i8['mode']}, {how}): {i8['top1'] - dep['pytorch_top1']:+.2f} points of top-1."
    return [
        Heading("Deployment: the distilled student on the CPU", 2),
        Table(headers, rows, right=set(range(2, 8))),
        Note(note),
    ]


def _cost_and_curve_blocks(run: Run) -> list[Block]:
    """Accuracy against cost (figures/pareto.png) and the training curves (curves.png)."""
    out = run.out
    pareto = plot_pareto(pareto_points(run), out / FIGURES / "pareto.png")
    plot_curves(run.histories, out / "curves.png")
    return [
        Heading("Accuracy against cost", 2),
        Figure(
            pareto.relative_to(out),
            "test top-1 against MACs and against CPU latency at batch 1; the green steps join the models no other model beats on both",
        ),
        Heading("Training curves", 2),
        Figure(
            Path("curves.png"),
            "training loss, top-1 accuracy (train dotted, test solid) and learning rate per epoch of every phase",
        ),
    ]


def _class_blocks(run: Run) -> list[Block]:
    """Per-class test top-1: the distilled student's gain over the baseline, figure and table."""
    models = run.models
    deltas = {
        cls: (nested(models, "distilled", "test", "per_class_top1", cls), base)
        for cls, base in nested(models, "baseline", "test", "per_class_top1", default={}).items()
    }
    blocks: list[Block] = [Heading("Which classes distillation helped", 2)]
    if deltas:
        fig = plot_class_deltas(
            {"distilled − baseline": {c: d - b for c, (d, b) in deltas.items() if d is not None}},
            run.out / FIGURES / "class_deltas.png",
        )
        blocks.append(
            Figure(
                fig.relative_to(run.out),
                "per-class test top-1 of the distilled student minus the baseline's, in points",
            )
        )
    rows = []
    for cls, (d, base) in deltas.items():
        t = nested(models, "teacher", "test", "per_class_top1", cls)
        rows.append(
            [
                cls,
                fmt_num(t, ".1f"),
                fmt_num(base, ".1f"),
                fmt_num(d, ".1f"),
                fmt_num(None if d is None else d - base, "+.1f"),
            ]
        )
    blocks.append(
        Table(["class", "teacher", "baseline", "distilled", "distilled − baseline"], rows, right={1, 2, 3, 4})
    )
    return blocks


def _diagnostic_blocks(run: Run) -> list[Block]:
    """Confusion matrices and the reliability diagram, where the run measured them."""
    out, models = run.out, run.models
    blocks: list[Block] = []
    classes = nested(models, "baseline", "test", "classes") or list(
        nested(models, "baseline", "test", "per_class_top1", default={})
    )
    matrices = {label(p): m["test"]["confusion"] for p, m in models.items() if "confusion" in m.get("test", {})}
    if matrices and classes:
        fig = plot_confusions(matrices, classes, out / FIGURES / "confusion.png")
        blocks += [
            Heading("Confusion matrices", 2),
            Figure(fig.relative_to(out), "test confusion matrices, % of each true class (rows)"),
        ]
    calibrations = {
        label(p): {**m["test"]["calibration"], "color": COLORS.get(p)}
        for p, m in models.items()
        if "calibration" in m.get("test", {})
    }
    if calibrations:
        fig = plot_reliability(calibrations, out / FIGURES / "reliability.png")
        blocks += [
            Heading("Calibration", 2),
            Figure(
                fig.relative_to(out),
                "reliability diagram: accuracy against confidence per bin; below, the share of test images per bin",
            ),
        ]
    return blocks
