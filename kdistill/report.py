"""The study's report, written from the run directory alone: report.md and curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdistill.checkpoint import atomic_write_text

PHASES = ("teacher", "baseline", "distilled")
LABELS = {"teacher": "teacher", "baseline": "student alone (baseline)", "distilled": "student distilled"}


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


def plot_curves(run_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for phase in sorted((p.name for p in run_dir.iterdir() if (p / "metrics.jsonl").exists()), key=_order):
        rows = read_metrics(run_dir / phase)
        if not rows:
            continue
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["train_loss"] for r in rows], label=label(phase))
        axes[1].plot(epochs, [r["test_top1"] for r in rows], label=f"{label(phase)} (test)")
        if "val_top1" in rows[0]:
            axes[1].plot(epochs, [r["val_top1"] for r in rows], "--", label=f"{label(phase)} (val)")
        axes[2].plot(epochs, [r["lr"] for r in rows], label=label(phase))
    for ax, title in zip(axes, ("training loss", "top-1 accuracy (%)", "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _order(phase: str) -> tuple[int, int]:
    if phase in PHASES:
        return (PHASES.index(phase), 0)
    return (len(PHASES), int(phase.removeprefix("generation") or 0) if phase.startswith("generation") else 0)


def write_report(run_dir: Path) -> Path:
    """Write report.md (and curves.png) for a finished study run from its summary.json."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    models = summary["models"]
    h = headline(summary)
    lines = [
        f"# kdistill study: {summary['name']}",
        "",
        f"Data: **{summary['data']['dataset']}** ({summary['data']['train_size']} training, "
        f"{summary['data']['test_size']} test images, {summary['data']['num_classes']} classes). "
        f"Method: **{summary['method']}**. Seed {summary['seed']}. Device: {summary['device']}.",
        "",
        f"**Distillation bought {h['gain_top1']:+.2f} points of test top-1** over the same student trained alone "
        f"({h['gap_closed'] * 100:.0f}% of the teacher–student gap closed), "
        f"**at {h['params_fraction'] * 100:.1f}% of the teacher's parameters and {h['macs_fraction'] * 100:.1f}% of its MACs** "
        f"({h['latency_fraction'] * 100:.0f}% of its batch-1 CPU latency).",
        "",
        "| model | architecture | test top-1 | top-5 | agreement with teacher | KL to teacher | parameters | MACs | CPU latency (b=1) | CPU throughput (b=256) | training time | train img/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase, m in models.items():
        p = m["profile"]
        agree = m.get("agreement", {})
        lines.append(
            f"| {label(phase)} | {m['model']} | {m['test']['top1']:.2f}% | {m['test']['top5']:.2f}% | "
            f"{agree.get('agreement_top1', 100.0):.2f}% | {agree.get('mean_kl', 0.0):.4f} | {_fmt_int(p['parameters'])} | "
            f"{_fmt_int(p['macs'])} | {p['latency_b1']['median_ms']:.2f} ms | {p['throughput_b256']['images_per_second']:.0f} img/s | "
            f"{m['train_seconds']:.0f} s | {m['images_per_second']:.0f} |"
        )
    if summary.get("budget_seconds"):
        reached = ", ".join(
            f"{label(phase)} {m['budget']['steps']} steps ({m['budget']['epochs']:.1f} epochs)" for phase, m in models.items() if m.get("budget")
        )
        lines += [
            "",
            f"Time budget: {summary['budget_seconds']:.0f} s; the study took {summary['wall_seconds']:.0f} s "
            f"({100 * summary['wall_seconds'] / summary['budget_seconds']:.0f}%). Reached: {reached}.",
        ]
    lines += [
        "",
        "Accuracies are from the last epoch (not the best one). Agreement: share of test images on which the model's "
        "top-1 class equals the teacher's; KL: mean KL(teacher || model) at T=1. Latency: median of repeated "
        "batch-1 forward passes on the CPU after warm-up. "
        + ("The teacher was loaded from a checkpoint, so its training time is not counted." if models["teacher"].get("from_checkpoint") else ""),
        "",
        "## Per-class test accuracy (%)",
        "",
        "| class | teacher | baseline | distilled | distilled − baseline |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for cls, base in models["baseline"]["test"]["per_class_top1"].items():
        t = models["teacher"]["test"]["per_class_top1"].get(cls, float("nan"))
        d = models["distilled"]["test"]["per_class_top1"].get(cls, float("nan"))
        lines.append(f"| {cls} | {t:.1f} | {base:.1f} | {d:.1f} | {d - base:+.1f} |")
    curves = run_dir / "curves.png"
    plot_curves(run_dir, curves)
    lines += ["", "## Training curves", "", f"![training curves]({curves.name})", ""]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out
