"""The figures of the reports: matplotlib set up once (the non-interactive Agg backend,
imported on first use), every plot saved as a PNG at 100 dpi."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np

from kdistill.report.phases import COLORS, label

FIGURES = "figures"  # a report's folder of figures, next to report.md


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend (imported here, not at start-up: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, out: Path) -> Path:
    """Lay out ``fig``, write it to ``out`` (creating its folder) and close it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    return out


def plot_curves(histories: dict[str, list[dict[str, Any]]], out: Path, names: dict[str, str] | None = None) -> Path:
    """Training loss, top-1 accuracy (train dotted, test solid, val dashed) and learning rate per epoch."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for key, rows in histories.items():
        if not rows:
            continue
        name = (names or {}).get(key, label(key))
        epochs = [r["epoch"] for r in rows]
        marker = "o" if len(rows) <= 20 else None  # short runs: show the epochs themselves
        line = axes[0].plot(epochs, [r["train_loss"] for r in rows], marker=marker, color=COLORS.get(key), label=name)[
            0
        ]
        color = line.get_color()
        subset = f", subset of {rows[0]['test_subset']}" if "test_subset" in rows[0] else ""  # train.eval_subset
        axes[1].plot(
            epochs,
            [r.get("test_top1", float("nan")) for r in rows],
            marker=marker,
            color=color,
            label=f"{name} (test{subset})",
        )
        if "train_top1" in rows[0]:
            axes[1].plot(epochs, [r["train_top1"] for r in rows], ":", color=color, label=f"{name} (train)")
        if "val_top1" in rows[0]:
            subset = f", subset of {rows[0]['val_subset']}" if "val_subset" in rows[0] else ""
            axes[1].plot(epochs, [r["val_top1"] for r in rows], "--", color=color, label=f"{name} (val{subset})")
        axes[2].plot(epochs, [r["lr"] for r in rows], marker=marker, color=color, label=name)
    for ax, title in zip(axes, ("training loss", "top-1 accuracy (%)", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save(fig, out)


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
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    for ax, key, xlabel in (
        (axes[0], "macs", "MACs per image (log scale)"),
        (axes[1], "latency_ms", "CPU latency at batch 1, ms (log scale)"),
    ):
        shown = [p for p in points if p.get(key)]
        for p in shown:
            ax.scatter(p[key], p["top1"], s=60, color=p.get("color", "#333333"), marker=p.get("marker", "o"), zorder=3)
            ax.annotate(p["label"], (p[key], p["top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        front = pareto_front([(p[key], p["top1"]) for p in shown])
        if len(front) > 1:
            ax.step(
                [c for c, _ in front],
                [a for _, a in front],
                where="post",
                color="#2ca02c",
                alpha=0.6,
                label="Pareto front",
            )
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_title("accuracy vs compute")
    axes[1].set_title("accuracy vs latency")
    return save(fig, out)


def plot_confusions(matrices: dict[str, list[list[int]]], classes: list[str], out: Path) -> Path:
    """Row-normalised confusion matrices (% of each true class), one panel per model."""
    n = len(matrices)
    k = len(classes)
    side = max(4.0, 0.38 * k + 1.5)
    fig, axes = pyplot().subplots(1, n, figsize=(side * n, side), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        m = np.asarray(matrix, dtype=float)
        m = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, cmap="Blues", vmin=0, vmax=100)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[i, j] > 50 else "black",
                    )
            ax.set_xticks(range(k), classes, rotation=90, fontsize=7)
            ax.set_yticks(range(k), classes, fontsize=7)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(name)
    return save(fig, out)


def plot_reliability(calibrations: dict[str, dict[str, Any]], out: Path) -> Path:
    """Reliability diagram: accuracy vs confidence per bin (the diagonal is perfect
    calibration), with the share of predictions per bin below."""
    fig, (top, bottom) = pyplot().subplots(2, 1, figsize=(6.5, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", alpha=0.5, label="perfect calibration")
    bins = 15
    for i, (name, c) in enumerate(calibrations.items()):
        bins = c["bins"]
        counts = c["bin_count"]
        total = max(sum(counts), 1)
        keep = [b for b in range(bins) if counts[b] > 0]
        color = c.get("color")
        top.plot(
            [c["bin_confidence"][b] for b in keep],
            [c["bin_accuracy"][b] for b in keep],
            "o-",
            color=color,
            label=f"{name} (ECE {c['ece']:.3f})",
        )
        width = 1 / bins / (len(calibrations) + 1)
        centers = [(b + 0.5) / bins for b in range(bins)]
        bottom.bar(
            [x + (i - (len(calibrations) - 1) / 2) * width for x in centers],
            [100 * n / total for n in counts],
            width=width,
            color=color,
        )
    top.set_ylabel("accuracy in bin")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_title(f"reliability diagram ({bins} confidence bins)")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="upper left")
    bottom.set_xlabel("confidence (top-1 softmax probability)")
    bottom.set_ylabel("% of images")
    bottom.grid(alpha=0.3)
    return save(fig, out)


def plot_class_deltas(deltas: dict[str, dict[str, float]], out: Path) -> Path:
    """Per-class test accuracy of the distilled student minus the baseline's (points), sorted."""
    series = list(deltas.items())
    classes = sorted(series[0][1], key=lambda c: series[0][1][c])
    fig, ax = pyplot().subplots(figsize=(max(6, 0.45 * len(classes) + 2), 4))
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
    return save(fig, out)


def plot_accuracy_vs_cost(rows: list[dict[str, Any]], out: Path) -> Path:
    """A sweep's configurations: test top-1 against training time and against the
    student's MACs, one marker per student architecture."""
    fig, axes = pyplot().subplots(1, 2, figsize=(12, 4.5))
    students = sorted({r["student"] for r in rows})
    markers = dict(zip(students, "osD^v<>ph*"))
    for ax, key, xlabel in (
        (axes[0], "train_seconds", "training time (s)"),
        (axes[1], "macs", "student MACs per image (millions)"),
    ):
        for s in students:
            pts = [r for r in rows if r["student"] == s]
            xs = [r[key] / (1e6 if key == "macs" else 1) for r in pts]
            ax.scatter(xs, [r["top1"] for r in pts], marker=markers.get(s, "o"), label=s)
            for r, x in zip(pts, xs):
                ax.annotate(
                    r["name"].removeprefix(f"{s}-"),
                    (x, r["top1"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("accuracy vs training cost")
    axes[1].set_title("accuracy vs inference cost")
    return save(fig, out)
