"""A sweep's leaderboard (``kdistill sweep``): ``leaderboard.csv`` (one row per
configuration, best first), ``leaderboard.md`` and a self-contained ``leaderboard.html``
(the same document), and ``accuracy_vs_cost.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from kdistill.files import atomic_write_text
from kdistill.report.document import Figure, Heading, Paragraph, Table, write_documents
from kdistill.report.figures import plot_accuracy_vs_cost
from kdistill.stats import mcnemar, paired_bootstrap, unpack_outcomes, wilson_interval

COLUMNS = [
    "rank",
    "name",
    "student",
    "method",
    "temperature",
    "alpha",
    "teacher",
    "top1",
    "top5",
    "agreement",
    "parameters",
    "macs",
    "epochs",
    "train_seconds",
    "images_per_second",
    "top1_low",
    "top1_high",
    "vs_best",
    "vs_best_low",
    "vs_best_high",
    "vs_best_p",
]
HEADERS = [
    "rank",
    "student",
    "method",
    "T",
    "alpha",
    "teacher",
    "test top-1",
    "95% CI",
    "vs best (95% CI)",
    "McNemar p",
    "top-5",
    "agreement with teacher",
    "parameters",
    "MACs",
    "epochs",
    "training time",
    "img/s",
]


def write_leaderboard(
    run_dir: Path, rows: list[dict], *, cache_seconds: float, cache: str | None, wall_seconds: float
) -> None:
    """The leaderboard of ``rows`` (the configurations' summaries, best first) in ``run_dir``.
    ``cache``: the teacher cache's description (``TeacherCache.describe()``), None without one;
    ``cache_seconds``: the time it took to build (0: it was loaded)."""
    rows = [{**r, **_statistics(r, rows[0])} for r in rows]
    atomic_write_text(run_dir / "leaderboard.csv", _csv(rows), "leaderboard")
    plot_accuracy_vs_cost(rows, run_dir / "accuracy_vs_cost.png")
    blocks = [
        Heading(f"Sweep leaderboard: {run_dir.name}"),
        Paragraph(_summary(rows, cache_seconds, cache, wall_seconds)),
        Paragraph(_how_sure(rows)),
        Table(HEADERS, [_cells(rank, r) for rank, r in enumerate(rows, 1)], right={0, 3, 4, *range(6, len(HEADERS))}),
        Figure(Path("accuracy_vs_cost.png"), "accuracy vs cost"),
    ]
    write_documents(blocks, run_dir, f"Sweep leaderboard: {run_dir.name}", name="leaderboard")


def _statistics(row: dict, best: dict) -> dict:
    """The row's top-1 interval over its test images (Wilson) and its paired difference to
    the best row on the same images (bootstrap interval, McNemar's p); None where the row's
    summary carries no per-image outcomes (a sweep finished by an older kdistill)."""
    out = dict.fromkeys(COLUMNS[-6:])
    if not row.get("test_correct"):
        return out
    right = unpack_outcomes(row["test_correct"])
    top1 = wilson_interval(int(right.sum()), len(right))
    out.update(top1_low=top1["low"], top1_high=top1["high"])
    if best is not row and best.get("test_correct"):
        best_right = unpack_outcomes(best["test_correct"])
        if len(best_right) == len(right):
            diff = paired_bootstrap(best_right, right)
            out.update(
                vs_best=diff["mean"],
                vs_best_low=diff["low"],
                vs_best_high=diff["high"],
                vs_best_p=mcnemar(best_right, right)["p_value"],
            )
    return out


def _how_sure(rows: list[dict]) -> str:
    """Which configurations the best one is distinguishable from, in words."""
    n = next((r["test_correct"]["n"] for r in rows if r.get("test_correct")), None)
    if n is None:
        return "No per-image results were recorded, so no intervals (a sweep finished by an older kdistill)."
    text = (
        f"Intervals: 95% Wilson interval of each top-1 over the {n} test images; 'vs best' is the paired "
        "difference to the best configuration on the same images (percentile bootstrap 95% CI) and McNemar's exact p."
    )
    close = [r["name"] for r in rows[1:] if r.get("vs_best_p") is not None and r["vs_best_p"] >= 0.05]
    if len(rows) > 1:
        text += (
            f" {len(close)} of the other {len(rows) - 1} configurations are not distinguishable from the best "
            f"(p >= 0.05){': ' + ', '.join(close) if close else ''}."
        )
    return text


def _csv(rows: list[dict]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({"rank": rank, **{k: row.get(k) for k in COLUMNS[1:]}})
    return table.getvalue()


def _summary(rows: list[dict], cache_seconds: float, cache: str | None, wall_seconds: float) -> str:
    """How many configurations, the wall time and what the teacher cache cost."""
    text = f"{len(rows)} configurations, sorted by test top-1 (last epoch). Wall time of this invocation {wall_seconds:.0f} s"
    if cache is not None and cache_seconds:
        served = sum(r["teacher"] == "cache" for r in rows)
        text += f"; the teacher cache ({cache}) took {cache_seconds:.0f} s to build and served every 'cache' row"
        if served:  # its cost is paid once: amortised over the runs that share it
            text += (
                f" ({cache_seconds / served:.1f} s per run over the {served} that read it, not in their training time)"
            )
    elif cache is not None:
        text += f"; teacher cache: {cache}"
    return text + "."


def _cells(rank: int, r: dict) -> list[str]:
    return [
        str(rank),
        r["student"],
        r["method"],
        f"{r['temperature']:g}" if r["temperature"] is not None else "–",
        f"{r['alpha']:g}",
        r["teacher"],
        f"{r['top1']:.2f}%",
        f"{r['top1_low']:.1f}–{r['top1_high']:.1f}" if r["top1_low"] is not None else "–",
        f"{r['vs_best']:+.2f} ({r['vs_best_low']:+.2f} to {r['vs_best_high']:+.2f})"
        if r["vs_best"] is not None
        else "–",
        f"{r['vs_best_p']:.3g}" if r["vs_best_p"] is not None else "–",
        f"{r['top5']:.2f}%",
        f"{r['agreement']:.2f}%",
        f"{r['parameters'] / 1e6:.2f} M",
        f"{r['macs'] / 1e6:.1f} M",
        str(r["epochs"]),
        f"{r['train_seconds']:.0f} s",
        f"{r['images_per_second']:.0f}",
    ]
