"""Checkpoints: written atomically, loaded safely, self-describing.

A checkpoint is a plain dict of tensors and primitives, loaded with
``torch.load(..., weights_only=True)`` so a malicious file cannot run code. It records the
model's registry name and constructor arguments, so ``load_model(path)`` rebuilds the model
from the file alone, plus the preprocessing (mean/std, image size, class names) needed to
use it, and, for resuming, the optimizer state, epoch, RNG state and metrics so far.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.errors import CheckpointError
from kdistill.files import atomic_write
from kdistill.models import create_model
from kdistill.progress import log

FORMAT = "kdistill-checkpoint/1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (see :func:`atomic_write`): a crash or a full disk at any
    moment leaves the previous checkpoint or the new one, never a truncated mix."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), "checkpoint")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's message is a page of advice; the line naming the refused object is the one that matters
        first = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "unsafe content")
        raise CheckpointError(f"checkpoint {path} refused: it holds objects other than tensors and plain data ({first[:200]})") from None
    except Exception as e:  # torch.load fails in many ways on garbage (KeyError, IndexError, ...)
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated ({e.__class__.__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kdistill checkpoint (expected format {FORMAT!r})")
    return state


def state_dict_mismatch(error: RuntimeError) -> str:
    """The first concrete mismatch of a load_state_dict error (its first line is a header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch")[:300]


def build_model(spec: dict[str, Any]) -> nn.Module:
    try:
        return create_model(spec["name"], **spec.get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot rebuild model from checkpoint spec {spec!r}: {e}") from None


def load_model(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model stored in a checkpoint and load its weights. Returns (model, checkpoint)."""
    state = load_checkpoint(path, map_location)
    try:
        spec = state["model_spec"]
        weights = state["model"]
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} lacks the key {e.args[0]!r}") from None
    model = build_model(spec)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: weights do not fit model {spec.get('name')!r}: {state_dict_mismatch(e)}") from None
    if state.get("kind") == "mutual":  # the peers' weights are in the file too, but not a model of their own
        peers = [p.get("name") for p in state.get("peer_specs") or [] if p]
        log(
            f"note: {path} is a deep-mutual-learning checkpoint of {1 + len(peers)} models; using model 0 ({spec.get('name')}), "
            f"not its peer(s) {', '.join(map(str, peers)) or '(unnamed)'}"
        )
    return model, state
