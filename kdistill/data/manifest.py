"""CSV and JSONL manifests: one image per row, as Kaggle-style data sets come.

A CSV starts with a header row naming its columns, ``path,label`` and optionally ``split``
(any order); a JSONL file holds one object per line with the keys ``path``, ``label`` and
optionally ``split``. Paths are relative to the manifest's folder; an absolute path or one
with ``..`` is refused (a manifest names files inside its own folder). Labels are class
names; JSON integers are accepted and read as their decimal names. Classes are the sorted
labels, numerically when every label is a whole number (so that ``2`` comes before ``10``
and label ``k`` stays class ``k``). A ``split`` value is ``train``, ``val`` or ``test``; without
a split column the rows are split by kdistill (:mod:`kdistill.data.split`).

Every problem is one line naming the manifest and the row: ``train.csv:17: path
'img/x.jpg' does not exist``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from kdistill.data import split as splitting
from kdistill.data.imagefolder import Listing
from kdistill.errors import DataError

MANIFEST_SUFFIXES = (".csv", ".jsonl")
REQUIRED = ("path", "label")
OPTIONAL = ("split",)


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the manifest, as an editor shows it
    path: str
    label: str
    split: str | None


def is_manifest(path: Path) -> bool:
    return path.name.lower().endswith(MANIFEST_SUFFIXES)


def _columns_error(where: str, got: list[str]) -> DataError:
    return DataError(
        f"{where}: columns {', '.join(map(repr, got))}; expected path and label, and optionally split (a header row "
        "'path,label' or 'path,label,split')"
    )


def _csv_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    reader = csv.reader(text.splitlines(keepends=True))
    header = [h.strip() for h in next(reader, [])]
    if not set(REQUIRED) <= set(header) or not set(header) <= {*REQUIRED, *OPTIONAL} or len(set(header)) != len(header):
        raise _columns_error(f"{manifest}:1", header)
    rows = []
    for values in reader:
        if not values:  # a blank line
            continue
        if len(values) != len(header):
            raise DataError(
                f"{manifest}:{reader.line_num}: {len(values)} column{'s' * (len(values) != 1)}; expected "
                f"{len(header)} ({','.join(header)})"
            )
        rows.append((reader.line_num, dict(zip(header, (v.strip() for v in values)))))
    return rows


def _jsonl_rows(manifest: Path, text: str) -> list[tuple[int, dict[str, str]]]:
    rows = []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{manifest}:{line}: not valid JSON ({e.msg}); expected one object per line") from None
        if not isinstance(obj, dict) or not set(REQUIRED) <= set(obj) or not set(obj) <= {*REQUIRED, *OPTIONAL}:
            raise _columns_error(f"{manifest}:{line}", list(obj) if isinstance(obj, dict) else [type(obj).__name__])
        for key, value in obj.items():
            ok = isinstance(value, str) or (key == "label" and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise DataError(
                    f"{manifest}:{line}: {key} {json.dumps(value)}; expected a string"
                    + (" or a whole number" if key == "label" else "")
                )
        rows.append((line, {k: str(v).strip() for k, v in obj.items()}))
    return rows


def read_rows(manifest: Path) -> list[Row]:
    """The rows of a manifest, checked: columns, paths inside its folder that exist, no
    path twice, known split names."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError:
        raise DataError(f"{manifest}: not UTF-8 text; expected a CSV or JSONL manifest") from None
    except OSError as e:
        raise DataError(f"{manifest}: cannot read ({e.strerror or e})") from None
    parsed = _csv_rows(manifest, text) if manifest.name.lower().endswith(".csv") else _jsonl_rows(manifest, text)
    folder, rows, seen = manifest.parent, [], {}
    for line, values in parsed:
        where, path = f"{manifest}:{line}", values["path"]
        posix = PurePosixPath(path.replace("\\", "/"))
        if not path or not values["label"]:
            raise DataError(f"{where}: empty {'path' if not path else 'label'}; expected a value in every row")
        if posix.is_absolute() or PureWindowsPath(path).is_absolute() or ".." in posix.parts:
            raise DataError(
                f"{where}: path {path!r} is absolute or contains '..'; expected a path inside {folder}, relative to the manifest"
            )
        split = values.get("split")
        if split is not None and split not in splitting.SPLIT_NAMES:
            raise DataError(f"{where}: split {split!r}; expected one of {', '.join(splitting.SPLIT_NAMES)}")
        key = posix.as_posix()
        if key in seen:
            raise DataError(f"{where}: path {path!r} is already on line {seen[key]}; expected each image once")
        if not (folder / key).is_file():
            raise DataError(f"{where}: path {path!r} does not exist")
        seen[key] = line
        rows.append(Row(line, key, values["label"], split))
    if not rows:
        raise DataError(f"{manifest}: no rows; expected a header and one row per image (path,label)")
    return rows


def _classes(labels: set[str]) -> list[str]:
    if all(label.isdecimal() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def signature(manifest: Path, rows: list[Row]) -> str:
    """Identity of a manifest's data: its own bytes and each named file's size and time."""
    digest = hashlib.sha256(manifest.read_bytes())
    for row in rows:
        st = (manifest.parent / row.path).stat()
        digest.update(f"{row.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "manifest-" + digest.hexdigest()


def read_manifest(manifest: Path, split: dict | None = None, val_size: int = 0) -> tuple[Listing, str]:
    """The :class:`Listing` of a manifest, split by its split column or by kdistill, and the
    manifest's signature (for the decoded-image cache)."""
    rows = read_rows(manifest)
    has_column = any(r.split is not None for r in rows)
    train_rows = [r for r in rows if r.split in ("train", None)] if has_column else rows
    classes = _classes({r.label for r in train_rows})
    if len(classes) < 2:
        raise DataError(
            f"{manifest}: found a single class {classes} in the training rows; a classifier needs at least 2"
        )
    known = set(classes)
    for r in rows:
        if r.label not in known:  # only val/test rows can get here
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise DataError(
                f"{manifest}:{r.line}: label {r.label!r} ({r.split} row) is not a class of the training rows ({shown})"
            )
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for r in train_rows:
        by_class[r.label].append(r.path)
    own = tuple(s for s in ("val", "test") if any(r.split == s for r in rows)) if has_column else ()
    if has_column and "test" not in own:
        own = (*own, "test")  # a split column decides the test images, even when it names none (refused below)
    how = splitting.resolve(split, own, val_size, str(manifest), "its split column")
    given = {s: _by_class(rows, s, classes) for s in own}
    if how is not None:
        val, test, seed = how
        made = splitting.assign(by_class, val, test, seed, str(manifest))
        assigned = {**made, **given}
        how_made = {"val": val, "test": test or None, "seed": seed}
    else:
        assigned, how_made = {"train": by_class, **given}, {"val": None, "test": None, "seed": None}
    splitting.check_not_empty(assigned, str(manifest))
    layout = "manifest split column" if has_column else "manifest"
    record = splitting.describe(assigned, {"layout": layout, **how_made})
    line_of = {r.path: r.line for r in rows}
    label = {c: i for i, c in enumerate(classes)}
    splits = {
        s: [(p, label[c], f"{manifest}:{line_of[p]}: {p}") for c in classes for p in sorted(assigned[s].get(c, []))]
        for s in splitting.SPLIT_NAMES
        if s in assigned
    }
    return Listing(classes, splits, lambda key: _read(manifest, key, line_of[key]), record), signature(manifest, rows)


def _by_class(rows: list[Row], split: str, classes: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in classes}
    for r in rows:
        if r.split == split:
            out[r.label].append(r.path)
    return out


def _read(manifest: Path, key: str, line: int) -> bytes:
    try:
        return (manifest.parent / key).read_bytes()
    except OSError as e:
        raise DataError(f"{manifest}:{line}: cannot read {key!r} ({e.strerror or e})") from None
