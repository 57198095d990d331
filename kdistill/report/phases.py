"""The models of a study run: their names in run directories, labels and colours."""

from __future__ import annotations

PHASES = ("teacher", "baseline", "distilled")
LABELS = {"teacher": "teacher", "baseline": "student alone (baseline)", "distilled": "student distilled"}
COLORS = {"teacher": "#1f77b4", "baseline": "#7f7f7f", "distilled": "#d62728"}


def label(phase: str) -> str:
    """A phase as the reports name it; born-again generations by their number."""
    if phase.startswith("generation"):
        return f"born-again generation {phase.removeprefix('generation')}"
    return LABELS.get(phase, phase)


def phase_order(phase: str) -> tuple[int, int]:
    """Sort key: teacher, baseline, distilled, then the generations in order."""
    if phase in PHASES:
        return (PHASES.index(phase), 0)
    return (len(PHASES), int(phase.removeprefix("generation") or 0) if phase.startswith("generation") else 0)
