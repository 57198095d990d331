"""Reports, written from run directories alone.

``write_report(run_dir)`` turns a finished ``kdistill run`` into ``report.md`` and a
self-contained ``report.html`` (the same content, images embedded as data URIs, no external
asset and no script), with figures in ``figures/`` (``curves.png`` stays at the top), and
``summary.csv`` (one row per model). ``write_comparison(run_dirs)`` puts several runs
(methods, temperatures, seeds) side by side in one report.

Both documents are rendered from one list of blocks (headings, paragraphs, tables,
figures), so the Markdown and the HTML always say the same thing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdistill.errors import ReportError
from kdistill.files import atomic_write_text
from kdistill.logger import to_csv

PHASES = ("teacher", "baseline", "distilled")
LABELS = {"teacher": "teacher", "baseline": "student alone (baseline)", "distilled": "student distilled"}
COLORS = {"teacher": "#1f77b4", "baseline": "#7f7f7f", "distilled": "#d62728"}
FIGURES = "figures"


def label(phase: str) -> str:
    if phase.startswith("generation"):
        return f"born-again generation {phase.removeprefix('generation')}"
    return LABELS.get(phase, phase)


def read_metrics(phase_dir: Path) -> list[dict[str, Any]]:
    path = phase_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt_int(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    """d[k1][k2]... or ``default`` where a key is missing (runs written by older versions)."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _num(value: Any, fmt: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{fmt}}{suffix}"


def headline(summary: dict[str, Any]) -> dict[str, float]:
    """The two numbers that matter: what distillation bought and what the student costs."""
    t, b, d = (summary["models"][p] for p in PHASES)
    return {
        "gain_top1": d["test"]["top1"] - b["test"]["top1"],
        "gap_closed": (d["test"]["top1"] - b["test"]["top1"]) / (t["test"]["top1"] - b["test"]["top1"])
        if t["test"]["top1"] != b["test"]["top1"] else float("nan"),
        "params_fraction": d["profile"]["parameters"] / t["profile"]["parameters"],
        "macs_fraction": d["profile"]["macs"] / t["profile"]["macs"],
        "latency_fraction": d["profile"]["latency_b1"]["median_ms"] / t["profile"]["latency_b1"]["median_ms"],
    }


# ----------------------------------------------------------------------------- run directories


@dataclass
class Run:
    """What a report needs from one run directory."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    display: str = ""  # the run's name in a comparison (default: the folder's name)

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


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ReportError(f"{run_dir} is not a finished run directory: {path} does not exist (it is written when `kdistill run` finishes)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is unreadable: {e}") from None
    if not isinstance(summary, dict) or not all(p in summary.get("models", {}) for p in PHASES):
        raise ReportError(f"{path} is not the summary of a study run (expected models {', '.join(PHASES)}); reports cover `kdistill run` directories")
    config = {}
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except yaml.YAMLError:
            config = {}
    histories = {}
    for phase_dir in sorted((p for p in run_dir.iterdir() if (p / "metrics.jsonl").exists()), key=lambda p: _order(p.name)):
        histories[phase_dir.name] = read_metrics(phase_dir)
    return Run(run_dir, summary, config if isinstance(config, dict) else {}, histories)


def _order(phase: str) -> tuple[int, int]:
    if phase in PHASES:
        return (PHASES.index(phase), 0)
    return (len(PHASES), int(phase.removeprefix("generation") or 0) if phase.startswith("generation") else 0)


# ----------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def plot_curves(histories: dict[str, list[dict[str, Any]]], out: Path, names: dict[str, str] | None = None) -> Path:
    """Training loss, top-1 accuracy (train dotted, test solid, val dashed) and learning rate per epoch."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, rows in histories.items():
        if not rows:
            continue
        name = (names or {}).get(key, label(key))
        epochs = [r["epoch"] for r in rows]
        marker = "o" if len(rows) <= 20 else None  # short runs: show the epochs themselves
        line = axes[0].plot(epochs, [r["train_loss"] for r in rows], marker=marker, color=COLORS.get(key), label=name)[0]
        color = line.get_color()
        axes[1].plot(epochs, [r.get("test_top1", float("nan")) for r in rows], marker=marker, color=color, label=f"{name} (test)")
        if "train_top1" in rows[0]:
            axes[1].plot(epochs, [r["train_top1"] for r in rows], ":", color=color, label=f"{name} (train)")
        if "val_top1" in rows[0]:
            axes[1].plot(epochs, [r["val_top1"] for r in rows], "--", color=color, label=f"{name} (val)")
        axes[2].plot(epochs, [r["lr"] for r in rows], marker=marker, color=color, label=name)
    for ax, title in zip(axes, ("training loss", "top-1 accuracy (%)", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points (cost, accuracy) not beaten by another that is cheaper or equal and at least
    as accurate, sorted by cost."""
    front, best = [], -math.inf
    for cost, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((cost, acc))
            best = acc
    return front


def plot_pareto(points: list[dict[str, Any]], out: Path) -> Path:
    """Accuracy vs MACs and accuracy vs CPU latency (batch 1), with the Pareto front.
    ``points``: dicts with label, top1, macs (None: not on the MACs plot), latency_ms, color."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in ((axes[0], "macs", "MACs per image (log scale)"), (axes[1], "latency_ms", "CPU latency at batch 1, ms (log scale)")):
        shown = [p for p in points if p.get(key)]
        for p in shown:
            ax.scatter(p[key], p["top1"], s=60, color=p.get("color", "#333333"), marker=p.get("marker", "o"), zorder=3)
            ax.annotate(p["label"], (p[key], p["top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = pareto_front([(p[key], p["top1"]) for p in shown])
        if len(front) > 1:
            ax.step([c for c, _ in front], [a for _, a in front], where="post", color="#2ca02c", alpha=0.6, label="Pareto front")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs latency")
    return _save(fig, out)


def plot_confusions(matrices: dict[str, list[list[int]]], classes: list[str], out: Path) -> Path:
    """Row-normalised confusion matrices (% of each true class), one panel per model."""
    import numpy as np

    plt = _pyplot()
    n = len(matrices)
    k = len(classes)
    side = max(4.0, 0.38 * k + 1.5)
    fig, axes = plt.subplots(1, n, figsize=(side * n, side), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        m = np.asarray(matrix, dtype=float)
        m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=100)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white" if m[i, j] > 50 else "black")
            ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(k), classes, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(name)
    return _save(fig, out)


def plot_reliability(calibrations: dict[str, dict[str, Any]], out: Path) -> Path:
    """Reliability diagram: accuracy vs confidence per bin (the diagonal is perfect
    calibration), with the share of predictions per bin below."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", alpha=0.5, label="perfect calibration")
    bins = 15
    for i, (name, c) in enumerate(calibrations.items()):
        bins = c["bins"]
        counts = c["bin_count"]
        total = max(sum(counts), 1)
        keep = [b for b in range(bins) if counts[b] > 0]
        color = c.get("color")
        top.plot([c["bin_confidence"][b] for b in keep], [c["bin_accuracy"][b] for b in keep], "o-", color=color, label=f"{name} (ECE {c['ece']:.3f})")
        width = 1 / bins / (len(calibrations) + 1)
        centers = [(b + 0.5) / bins for b in range(bins)]
        bottom.bar([x + (i - (len(calibrations) - 1) / 2) * width for x in centers], [100 * n / total for n in counts], width=width, color=color)
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"reliability diagram ({bins} confidence bins)")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("confidence (top-1 softmax probability)")
    bottom.set_ylabel("% of images")
    bottom.grid(alpha=0.3)
    return _save(fig, out)


def plot_class_deltas(deltas: dict[str, dict[str, float]], out: Path) -> Path:
    """Per-class test accuracy of the distilled student minus the baseline's (points), sorted."""
    plt = _pyplot()
    series = list(deltas.items())
    classes = sorted(series[0][1], key=lambda c: series[0][1][c])
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes) + 2), 4))
    width = 0.8 / len(series)
    for i, (name, d) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(classes))]
        values = [d.get(c, float("nan")) for c in classes]
        colors = ["#2ca02c" if v >= 0 else "#d62728" for v in values] if len(series) == 1 else None
        ax.bar(xs, values, width=width, color=colors, label=name if len(series) > 1 else None)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("distilled − baseline (points)")
    ax.set_title("which classes distillation helped (per-class test top-1)")
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, out)


# ----------------------------------------------------------------------------- documents


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: set[int] = field(default_factory=set)  # right-aligned (numeric) columns


@dataclass
class Figure:
    path: Path  # relative to the document's folder
    alt: str


Block = tuple[str, Any]  # ("h1" | "h2" | "p" | "note", text) or ("table", Table) or ("figure", Figure)


def render_markdown(blocks: list[Block]) -> str:
    out = []
    for kind, value in blocks:
        if kind == "h1":
            out.append(f"# {value}")
        elif kind == "h2":
            out.append(f"## {value}")
        elif kind in ("p", "note"):
            out.append(value)
        elif kind == "table":
            out.append("| " + " | ".join(value.headers) + " |")
            out.append("| " + " | ".join("---:" if i in value.right else "---" for i in range(len(value.headers))) + " |")
            out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in value.rows]
        elif kind == "figure":
            out.append(f"![{value.alt}]({value.path.as_posix()})")
        out.append("")
    return "\n".join(out)


def _inline_html(text: str) -> str:
    """Escaped text with the Markdown subset the reports use: **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; }
th { background: #f3f5f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
p.note { color: #555; font-size: 0.9em; }
code { background: #f3f5f7; padding: 0 3px; border-radius: 3px; }
"""


def render_html(blocks: list[Block], base: Path, title: str) -> str:
    """One self-contained HTML page: inline CSS, images as base64 data URIs, no script."""
    body = []
    for kind, value in blocks:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline_html(value)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(value)}</p>")
        elif kind == "note":
            body.append(f'<p class="note">{_inline_html(value)}</p>')
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in value.headers)
            rows = "".join(
                "<tr>" + "".join(f'<td class="num">{_inline_html(c)}</td>' if i in value.right else f"<td>{_inline_html(c)}</td>" for i, c in enumerate(row)) + "</tr>"
                for row in value.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "figure":
            data = base64.b64encode((base / value.path).read_bytes()).decode("ascii")
            alt = html.escape(value.alt, quote=True)
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{alt}"><figcaption>{html.escape(value.alt)}</figcaption></figure>')
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _write_documents(blocks: list[Block], out_dir: Path, title: str) -> Path:
    md = out_dir / "report.md"
    atomic_write_text(md, render_markdown(blocks), "report")
    atomic_write_text(out_dir / "report.html", render_html(blocks, out_dir, title), "report")
    return md


# ----------------------------------------------------------------------------- one run


def model_rows(run: Run) -> list[dict[str, Any]]:
    """One flat row per model of a run: the numbers of summary.csv and of the tables."""
    rows = []
    for phase, m in run.models.items():
        p, t, a = m.get("profile", {}), m.get("test", {}), m.get("agreement", {})
        rows.append({
            "run": run.name, "phase": phase, "model": m.get("model"), "top1": t.get("top1"), "top5": t.get("top5"),
            "nll": t.get("nll"), "ece": t.get("ece"),
            "agreement_top1": a.get("agreement_top1", 100.0 if phase == "teacher" else None),
            "mean_kl": a.get("mean_kl", 0.0 if phase == "teacher" else None),
            "parameters": p.get("parameters"), "macs": p.get("macs"), "disk_bytes": p.get("disk_bytes"),
            "cpu_latency_b1_ms": _get(p, "latency_b1", "median_ms"), "cpu_latency_b1_p90_ms": _get(p, "latency_b1", "p90_ms"),
            "cpu_throughput_b256": _get(p, "throughput_b256", "images_per_second"),
            "gpu_latency_b1_ms": _get(p, "gpu", "latency_b1", "median_ms"), "gpu_throughput_b256": _get(p, "gpu", "throughput_b256", "images_per_second"),
            "train_seconds": m.get("train_seconds"), "train_images_per_second": m.get("images_per_second"), "epochs": m.get("epochs"),
        })
    return rows


def _comparison_table(run: Run) -> Table:
    gpu = any(r["gpu_latency_b1_ms"] is not None for r in model_rows(run))
    headers = ["model", "architecture", "test top-1", "top-5", "NLL", "ECE", "agreement with teacher", "KL to teacher",
               "parameters", "MACs", "size on disk", "CPU latency b=1 (median / p90)", "CPU throughput b=256"]
    if gpu:
        headers += ["GPU latency b=1", "GPU throughput b=256"]
    headers += ["training time", "train img/s"]
    rows = []
    for r in model_rows(run):
        row = [
            label(r["phase"]), str(r["model"]), _num(r["top1"], ".2f", "%"), _num(r["top5"], ".2f", "%"), _num(r["nll"], ".3f"),
            _num(r["ece"], ".3f"), _num(r["agreement_top1"], ".2f", "%"), _num(r["mean_kl"], ".4f"),
            _fmt_int(r["parameters"]) if r["parameters"] is not None else "n/a", _fmt_int(r["macs"]) if r["macs"] is not None else "n/a",
            _fmt_bytes(r["disk_bytes"]),
            f"{_num(r['cpu_latency_b1_ms'], '.2f')} / {_num(r['cpu_latency_b1_p90_ms'], '.2f')} ms", _num(r["cpu_throughput_b256"], ".0f", " img/s"),
        ]
        if gpu:
            row += [_num(r["gpu_latency_b1_ms"], ".3f", " ms"), _num(r["gpu_throughput_b256"], ".0f", " img/s")]
        row += [_num(r["train_seconds"], ".0f", " s"), _num(r["train_images_per_second"], ".0f")]
        rows.append(row)
    return Table(headers, rows, right=set(range(2, len(headers))))


def _deployment_blocks(run: Run) -> list[Block]:
    dep = run.summary.get("deployment")
    if not dep:
        return [
            ("h2", "Deployment"),
            ("p", "No ONNX export in this run (`deploy.onnx` off, or the export extra not installed: `pip install 'kdistill[export]'`). "
                  "Export any checkpoint later with `kdistill export CHECKPOINT --format onnx --quantize static`."),
        ]
    headers = ["distilled student as", "file", "test top-1", "top-1 identical to PyTorch", "max logit difference",
               "CPU latency b=1 (median / p90)", "CPU throughput b=256", "size on disk"]
    d = run.models["distilled"]
    rows = [[
        "PyTorch (float32)", "checkpoint.pt", _num(dep.get("pytorch_top1", d["test"]["top1"]), ".2f", "%"), "100.00%", "0",
        f"{_num(_get(d, 'profile', 'latency_b1', 'median_ms'), '.2f')} / {_num(_get(d, 'profile', 'latency_b1', 'p90_ms'), '.2f')} ms",
        _num(_get(d, "profile", "throughput_b256", "images_per_second"), ".0f", " img/s"), _fmt_bytes(_get(d, "profile", "disk_bytes")),
    ]]
    for key, name in (("onnx", "ONNX Runtime (float32)"), ("int8", f"ONNX Runtime int8 ({_get(dep, 'int8', 'mode', default='')})")):
        e = dep.get(key)
        if not e:
            continue
        rows.append([
            name, Path(e["path"]).name, _num(e["top1"], ".2f", "%"), _num(e["top1_agreement"], ".2f", "%"), _num(e["max_abs_diff"], ".1e"),
            f"{_num(_get(e, 'latency_b1', 'median_ms'), '.2f')} / {_num(_get(e, 'latency_b1', 'p90_ms'), '.2f')} ms",
            _num(_get(e, "throughput_b256", "images_per_second"), ".0f", " img/s"), _fmt_bytes(e.get("disk_bytes")),
        ])
    note = (
        f"The ONNX file was verified with ONNX Runtime on {_get(dep, 'onnx', 'num_images', default='the')} test images "
        "(max |logit difference| <= 1e-4, identical top-1 on >= 99.9% required). Its inputs are float32 images normalised "
        "as documented in the file's metadata (`preprocessing`)."
    )
    if "int8" in dep:
        i8 = dep["int8"]
        how = f"calibrated on {i8['calibration_images']} training images" if i8["mode"] == "static" else "activation ranges computed at run time"
        note += f" The int8 model is post-training quantized ({i8['mode']}, {how}): {i8['top1'] - dep['pytorch_top1']:+.2f} points of top-1."
    return [("h2", "Deployment: the distilled student on the CPU"), ("table", Table(headers, rows, right=set(range(2, 8)))), ("note", note)]


def _pareto_points(run: Run, prefix: str = "", with_int8: bool = True) -> list[dict[str, Any]]:
    points = []
    for phase, m in run.models.items():
        points.append({
            "label": f"{prefix}{label(phase)}", "top1": m["test"]["top1"], "macs": _get(m, "profile", "macs"),
            "latency_ms": _get(m, "profile", "latency_b1", "median_ms"), "color": COLORS.get(phase, "#9467bd"),
        })
    dep = run.summary.get("deployment") or {}
    if with_int8 and "int8" in dep:
        points.append({"label": f"{prefix}distilled int8 (ONNX Runtime)", "top1": dep["int8"]["top1"], "macs": None,
                       "latency_ms": _get(dep, "int8", "latency_b1", "median_ms"), "color": COLORS["distilled"], "marker": "s"})
    return points


def write_report(run_dir: Path) -> Path:
    """Write report.md, report.html, figures/*.png, curves.png and summary.csv for a finished
    study run, from its run directory alone. Returns the path of report.md."""
    run = load_run(Path(run_dir))
    out = run.path
    summary, models = run.summary, run.models
    h = headline(summary)
    data = summary["data"]
    fig_dir = out / FIGURES

    atomic_write_text(out / "summary.csv", to_csv(model_rows(run)), "summary")
    blocks: list[Block] = [
        ("h1", f"kdistill study: {summary['name']}"),
        ("p", f"Data: **{data['dataset']}** ({data['train_size']} training, {data['test_size']} test images, {data['num_classes']} classes). "
              f"Distillation: **{run.settings()}**. Seed {summary['seed']}. Device: {summary['device']}. {summary.get('platform', '')}"),
        ("p", f"**Distillation bought {h['gain_top1']:+.2f} points of test top-1** over the same student trained alone "
              f"({_num(h['gap_closed'] * 100, '.0f', '%')} of the teacher–student gap closed), "
              f"**at {h['params_fraction'] * 100:.1f}% of the teacher's parameters and {h['macs_fraction'] * 100:.1f}% of its MACs** "
              f"({h['latency_fraction'] * 100:.0f}% of its batch-1 CPU latency)."),
        ("h2", "What each model is worth and what it costs"),
        ("table", _comparison_table(run)),
        ("note", "Accuracies are from the last epoch (not the best one). NLL: mean cross-entropy on the test set. ECE: expected "
                 "calibration error over 15 equal-width confidence bins (0 is perfectly calibrated). Agreement: share of test images "
                 "on which the model's top-1 class equals the teacher's; KL: mean KL(teacher || model) at T=1. Size: the float32 "
                 "weights as saved by torch.save. Latency: median and 90th percentile of repeated forward passes after warm-up "
                 "(throughput: images per second at batch 256)."
                 + (" The teacher was loaded from a checkpoint, so its training time is not counted." if models["teacher"].get("from_checkpoint") else "")),
    ]
    if summary.get("budget_seconds"):
        reached = ", ".join(
            f"{label(phase)} {m['budget']['steps']} steps ({m['budget']['epochs']:.1f} epochs)" for phase, m in models.items() if m.get("budget")
        )
        blocks.append(("p", f"Time budget: {summary['budget_seconds']:.0f} s; the study took {summary['wall_seconds']:.0f} s "
                            f"({100 * summary['wall_seconds'] / summary['budget_seconds']:.0f}%). Reached: {reached}."))
    blocks += _deployment_blocks(run)

    blocks += [("h2", "Accuracy against cost"), ("figure", Figure(plot_pareto(_pareto_points(run), fig_dir / "pareto.png").relative_to(out),
                "test top-1 against MACs and against CPU latency at batch 1; the green steps join the models no other model beats on both"))]

    plot_curves(run.histories, out / "curves.png")
    blocks += [("h2", "Training curves"), ("figure", Figure(Path("curves.png"), "training loss, top-1 accuracy (train dotted, test solid) and learning rate per epoch of every phase"))]

    classes = _get(models, "baseline", "test", "classes") or list(_get(models, "baseline", "test", "per_class_top1", default={}))
    deltas = {
        cls: (_get(models, "distilled", "test", "per_class_top1", cls), base)
        for cls, base in _get(models, "baseline", "test", "per_class_top1", default={}).items()
    }
    blocks += [("h2", "Which classes distillation helped")]
    if deltas:
        fig = plot_class_deltas({"distilled − baseline": {c: d - b for c, (d, b) in deltas.items() if d is not None}}, fig_dir / "class_deltas.png")
        blocks.append(("figure", Figure(fig.relative_to(out), "per-class test top-1 of the distilled student minus the baseline's, in points")))
    rows = []
    for cls, (d, base) in deltas.items():
        t = _get(models, "teacher", "test", "per_class_top1", cls)
        rows.append([cls, _num(t, ".1f"), _num(base, ".1f"), _num(d, ".1f"), _num(None if d is None else d - base, "+.1f")])
    blocks.append(("table", Table(["class", "teacher", "baseline", "distilled", "distilled − baseline"], rows, right={1, 2, 3, 4})))

    matrices = {label(p): m["test"]["confusion"] for p, m in models.items() if "confusion" in m.get("test", {})}
    if matrices and classes:
        fig = plot_confusions(matrices, classes, fig_dir / "confusion.png")
        blocks += [("h2", "Confusion matrices"), ("figure", Figure(fig.relative_to(out), "test confusion matrices, % of each true class (rows)"))]
    calibrations = {label(p): {**m["test"]["calibration"], "color": COLORS.get(p)} for p, m in models.items() if "calibration" in m.get("test", {})}
    if calibrations:
        fig = plot_reliability(calibrations, fig_dir / "reliability.png")
        blocks += [("h2", "Calibration"), ("figure", Figure(fig.relative_to(out), "reliability diagram: accuracy against confidence per bin; below, the share of test images per bin"))]
    blocks += [("note", f"Written by kdistill from {run.path.name}/ (summary.json, metrics.jsonl); the same numbers are in summary.csv.")]
    return _write_documents(blocks, out, f"kdistill study: {summary['name']}")


# ----------------------------------------------------------------------------- several runs


def default_comparison_dir(runs: list[Run]) -> Path:
    return Path("reports") / "-vs-".join(r.name for r in runs)[:120]


def write_comparison(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """One report comparing several study runs (e.g. methods or temperatures): a table per
    run, accuracy against cost of every model, the distilled students' training curves,
    calibration and per-class gains side by side. Returns the path of report.md."""
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
    out = Path(out_dir) if out_dir else default_comparison_dir(runs)
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / FIGURES

    rows, csv_rows = [], []
    for run in runs:
        h = headline(run.summary)
        m = run.models
        dep = run.summary.get("deployment") or {}
        rows.append([
            run.name, run.summary["data"]["dataset"], run.settings(), _num(_get(m, "distilled", "epochs"), "d"),
            _num(m["teacher"]["test"]["top1"], ".2f", "%"), _num(m["baseline"]["test"]["top1"], ".2f", "%"),
            _num(m["distilled"]["test"]["top1"], ".2f", "%"), _num(h["gain_top1"], "+.2f"), _num(h["gap_closed"] * 100, ".0f", "%"),
            _num(_get(m, "distilled", "test", "ece"), ".3f"), _num(_get(m, "distilled", "agreement", "agreement_top1"), ".2f", "%"),
            _num(_get(dep, "int8", "top1"), ".2f", "%"), _num(_get(m, "distilled", "profile", "latency_b1", "median_ms"), ".2f", " ms"),
        ])
        for r in model_rows(run):
            csv_rows.append({**r, "settings": run.settings()})
    blocks: list[Block] = [
        ("h1", f"kdistill comparison of {len(runs)} runs"),
        ("p", "Runs: " + ", ".join(f"**{r.name}** ({r.settings()}, seed {r.summary['seed']})" for r in runs) + "."),
        ("h2", "What distillation bought in each run"),
        ("table", Table(["run", "data", "distillation", "epochs", "teacher top-1", "baseline top-1", "distilled top-1", "gain (points)",
                         "gap closed", "distilled ECE", "agreement with teacher", "int8 top-1", "student CPU latency b=1"], rows, right=set(range(3, 13)))),
        ("note", "Gain: distilled minus baseline test top-1 of the same run; gap closed: gain as a share of teacher minus baseline. "
                 "Runs on the same data with the same seed share their teacher and baseline recipe, so their distilled students "
                 "differ by the distillation settings alone."),
    ]
    points = []
    for run in runs:
        points += _pareto_points(run, prefix=f"{run.name}: ", with_int8=False)
    blocks += [("h2", "Accuracy against cost"), ("figure", Figure(plot_pareto(points, fig_dir / "pareto.png").relative_to(out),
                "test top-1 of every model of every run against MACs and CPU latency at batch 1"))]
    histories = {run.name: run.histories.get("distilled", []) for run in runs}
    blocks += [("h2", "Training curves of the distilled students"), ("figure", Figure(plot_curves(histories, fig_dir / "curves.png", {n: n for n in histories}).relative_to(out),
                "training loss, top-1 accuracy and learning rate per epoch of each run's distilled student"))]
    deltas = {}
    for run in runs:
        base = _get(run.models, "baseline", "test", "per_class_top1", default={})
        dist = _get(run.models, "distilled", "test", "per_class_top1", default={})
        deltas[run.name] = {c: dist[c] - base[c] for c in base if c in dist}
    if all(deltas.values()):
        fig = plot_class_deltas(deltas, fig_dir / "class_deltas.png")
        blocks += [("h2", "Which classes distillation helped"), ("figure", Figure(fig.relative_to(out), "per-class test top-1 of each run's distilled student minus its baseline, in points"))]
        classes = list(next(iter(deltas.values())))
        blocks.append(("table", Table(["class", *names], [[c, *(_num(deltas[n].get(c), "+.1f") for n in deltas)] for c in classes], right=set(range(1, len(names) + 1)))))
    calibrations = {run.name: run.models["distilled"]["test"]["calibration"] for run in runs if "calibration" in run.models["distilled"]["test"]}
    if calibrations:
        fig = plot_reliability(calibrations, fig_dir / "reliability.png")
        blocks += [("h2", "Calibration of the distilled students"), ("figure", Figure(fig.relative_to(out), "reliability diagram of each run's distilled student"))]
    atomic_write_text(out / "comparison.csv", to_csv(csv_rows), "comparison")
    blocks += [("note", "Written by kdistill from the runs' summary.json and metrics.jsonl; every model's numbers are in comparison.csv.")]
    return _write_documents(blocks, out, f"kdistill comparison: {', '.join(names)}")
