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
]
HEADERS = [
    "rank",
    "student",
    "method",
    "T",
    "alpha",
    "teacher",
    "test top-1",
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
    atomic_write_text(run_dir / "leaderboard.csv", _csv(rows), "leaderboard")
    plot_accuracy_vs_cost(rows, run_dir / "accuracy_vs_cost.png")
    blocks = [
        Heading(f"Sweep leaderboard: {run_dir.name}"),
        Paragraph(_summary(rows, cache_seconds, cache, wall_seconds)),
        Table(HEADERS, [_cells(rank, r) for rank, r in enumerate(rows, 1)], right={0, 3, 4, *range(6, len(HEADERS))}),
        Figure(Path("accuracy_vs_cost.png"), "accuracy vs cost"),
    ]
    write_documents(blocks, run_dir, f"Sweep leaderboard: {run_dir.name}", name="leaderboard")


def _csv(rows: list[dict]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for rank, row in enumerate(rows, 1):
        writer.writerow({"rank": rank, **{k: row[k] for k in COLUMNS[1:]}})
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
        f"{r['top5']:.2f}%",
        f"{r['agreement']:.2f}%",
        f"{r['parameters'] / 1e6:.2f} M",
        f"{r['macs'] / 1e6:.1f} M",
        str(r["epochs"]),
        f"{r['train_seconds']:.0f} s",
        f"{r['images_per_second']:.0f}",
    ]
