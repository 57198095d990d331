"""Splitting labelled files into train/validation/test: stratified, seeded and recorded.

Within each class, a file's place is decided by a hash of (seed, its name): the split is a
pure function of the file names and the seed, whatever order a file system or an archive
lists them in, and adding images to a class moves only a few of its others. Each class is
split in the same proportions (largest remainders, so every split's share of a class is
within one image of its fraction), and every split asked for gets at least one image of
every class.

The description of a split (:func:`describe`) is what checkpoints record: its fractions,
seed, per-split counts and a fingerprint of which file went where, so that a later run or
``kdistill evaluate`` on the same data uses the same test images, and a teacher trained on
another split is known.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from kdistill.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_VAL = 0.1  # data.split.val when a source has to be split and the config says nothing
DEFAULT_TEST = 0.1  # data.split.test likewise


def split_counts(n: int, val: float, test: float) -> dict[str, int]:
    """How many of a class's ``n`` images go to each split: largest remainders over the three
    targets (ties: test, then val, then train), then one image for a held-out split whose
    fraction is above zero but whose share rounded to none (taken from train)."""
    targets = {"test": test * n, "val": val * n, "train": (1 - val - test) * n}
    counts = {k: math.floor(t + 1e-9) for k, t in targets.items()}
    by_remainder = sorted(targets, key=lambda k: -(targets[k] - counts[k]))  # stable: ties keep the order above
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    for k, fraction in (("test", test), ("val", val)):
        if fraction > 0 and counts[k] == 0:
            counts[k], counts["train"] = 1, counts["train"] - 1
    return {k: counts[k] for k in SPLIT_NAMES}


def _rank(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{name}".encode()).digest()


def assign(
    by_class: dict[str, list[str]], val: float, test: float, seed: int, where: str
) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted names}} for ``by_class`` ({class: file names, unique}); a split
    with fraction 0 is left out (``train`` is always there). ``where`` names the source in
    errors: a class too small for every split to get one of its images is refused."""
    need = 1 + (val > 0) + (test > 0)
    out: dict[str, dict[str, list[str]]] = {s: {} for s in SPLIT_NAMES if s == "train" or {"val": val, "test": test}[s]}
    for cls in sorted(by_class):
        names = by_class[cls]
        if len(names) < need:
            wanted = "/".join(s for s in SPLIT_NAMES if s in out)
            raise DataError(
                f"{where}: class {cls!r} has {len(names)} image{'s' * (len(names) != 1)}; splitting it into {wanted} "
                f"needs at least {need} (one per split); add images or lower data.split's fractions"
            )
        order = sorted(names, key=lambda name: _rank(seed, name))
        counts = split_counts(len(names), val, test)
        start = 0
        for split in ("test", "val", "train"):  # the held-out splits first: their files move least as a class grows
            if split in out:
                out[split][cls] = sorted(order[start : start + counts[split]])
                start += counts[split]
    return out


def fingerprint(assignment: dict[str, dict[str, list[str]]]) -> str:
    """A digest of which file is in which split (16 hex digits)."""
    lines = sorted(
        f"{split}\t{cls}\t{name}"
        for split, classes in assignment.items()
        for cls, names in classes.items()
        for name in names
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def describe(assignment: dict[str, dict[str, list[str]]], how: dict[str, Any]) -> dict[str, Any]:
    """The record of a split: ``how`` it was made (fractions, seed, or that it came from the
    source's own folders or split column), each split's image count, and its fingerprint."""
    counts = {split: sum(len(v) for v in classes.values()) for split, classes in assignment.items()}
    return {**how, "counts": counts, "fingerprint": fingerprint(assignment)}


def check_not_empty(assignment: dict[str, dict[str, list[str]]], where: str) -> None:
    for split, classes in assignment.items():
        if not any(classes.values()):
            raise DataError(f"{where}: the {split} split is empty; expected at least one image in it")


def resolve(
    requested: dict[str, Any] | None, own: tuple[str, ...], val_size: int, where: str, origin: str = ""
) -> tuple[float, float, int] | None:
    """(val, test, seed) fractions to split a source's training files with, or None when
    nothing is to be split. ``requested`` is ``data.split`` (or a checkpoint's record of one);
    ``own`` names the splits the source brings itself (``test`` for a ``train/``+``test/``
    tree, those of a manifest's split column: ``origin`` says which); ``data.val_size`` (a count drawn later) stands
    in for the default validation fraction."""
    requested = requested or {}
    val, test, seed = requested.get("val"), requested.get("test"), requested.get("seed") or 0
    if val_size and val:
        raise DataError(
            f"data.split.val={val} and data.val_size={val_size} both hold out validation images; use one of them"
        )
    if val_size and "val" in own:
        raise DataError(f"data.val_size={val_size}: {where} has its own val split ({origin}); remove data.val_size")
    for split, fraction in (("test", test), ("val", val)):
        if split in own and fraction:
            raise DataError(
                f"data.split.{split}={fraction}: {where} has its own {split} split ({origin}); remove data.split.{split}"
                + (
                    " (data.split.val may still hold out validation images from its training images)"
                    if split == "test"
                    else ""
                )
            )
    if "test" in own:  # only validation images may be drawn, from the training files
        val = val or 0.0
        return (val, 0.0, seed) if val > 0 else None
    val = (0.0 if val_size else DEFAULT_VAL) if val is None else val
    test = DEFAULT_TEST if test is None else test
    if not 0 < test < 1 or not 0 <= val < 1 or val + test >= 1:
        raise DataError(
            f"data.split: val={val}, test={test}; expected 0 <= val, 0 < test and val + test < 1 (fractions of each class)"
        )
    return val, test, seed
