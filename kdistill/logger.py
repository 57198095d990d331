"""Per-epoch metrics of a training phase, in the formats people read them with.

``metrics.jsonl`` (one JSON object per epoch) is the record the reports read;
``metrics.csv`` holds the same numbers for spreadsheets and pandas; with
``train.tensorboard: true`` (CLI ``--tensorboard``) every number is also a TensorBoard
scalar under ``<phase dir>/tensorboard`` (``tensorboard --logdir runs/``). TensorBoard is an
optional extra, imported only when asked for.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from kdistill.errors import CheckpointError, ConfigError
from kdistill.files import atomic_write_text

TENSORBOARD_HINT = "install it with: pip install 'kdistill[tensorboard]'"


def tensorboard_writer(log_dir: Path):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing to ``log_dir``; a clear error when
    the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            f"train.tensorboard is on but the tensorboard package is not installed; {TENSORBOARD_HINT}"
        ) from None
    return SummaryWriter(log_dir=str(log_dir))


def scalar_tag(key: str) -> str:
    """metrics.jsonl keys -> TensorBoard tags grouped by split: train_loss -> train/loss."""
    for prefix in ("train_", "test_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}"  # lr, images_per_second, train_seconds: statistics of training


def to_csv(rows: list[dict[str, Any]]) -> str:
    """Rows (dicts) as CSV text; columns are the union of the rows' keys in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: v for k, v in row.items() if not isinstance(v, (dict, list))})
    return out.getvalue()


class MetricsLog:
    """Writes each epoch's record to metrics.jsonl, metrics.csv and (optionally) TensorBoard."""

    def __init__(self, run_dir: Path | None, history: list[dict[str, Any]], tensorboard: bool = False):
        self.run_dir = run_dir
        self.rows = list(history)
        self.writer = None
        if run_dir is None:
            return
        # rewritten from the checkpoint's history: epochs after the last checkpoint are redone
        # (nothing is written before the first epoch of a new run: a run that fails before
        # it leaves no metrics files behind)
        if self.rows or (run_dir / "metrics.jsonl").exists():
            atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.rows), "metrics")
            atomic_write_text(run_dir / "metrics.csv", to_csv(self.rows), "metrics")
        if tensorboard:
            self.writer = tensorboard_writer(run_dir / "tensorboard")

    def append(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        if self.run_dir is None:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:  # a line cut short by a kill is rewritten on resume
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(
                f"cannot write metrics {path}: {e.strerror or e}; resume from the last checkpoint once fixed"
            ) from None
        atomic_write_text(self.run_dir / "metrics.csv", to_csv(self.rows), "metrics")  # columns may grow: rewrite
        if self.writer is not None:
            step = int(record["epoch"])
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(scalar_tag(key), value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
