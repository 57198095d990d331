"""Checkpoints: written atomically, loaded safely, self-describing.

A checkpoint is a plain dict of tensors and primitives, loaded with
``torch.load(..., weights_only=True)`` so a malicious file cannot run code. It records the
model's registry name and constructor arguments, so ``load_model(path)`` rebuilds the model
from the file alone, plus the preprocessing (mean/std, image size, class names) needed to
use it, and, for resuming, the optimizer state, epoch, RNG state and metrics so far.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.errors import CheckpointError, KDistillError
from kdistill.files import atomic_write
from kdistill.models import build
from kdistill.models.features import attach_stages
from kdistill.models.inputs import adapter_from, attach
from kdistill.progress import log

FORMAT = "kdistill-checkpoint/1"
CHECKPOINT_NAME = "checkpoint.pt"
# what a command that takes a checkpoint expects, said in its errors
EXPECTED = f"a {CHECKPOINT_NAME} written by kdistill train, run or distill"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` atomically (see :func:`atomic_write`): a crash or a full disk at any
    moment leaves the previous checkpoint or the new one, never a truncated mix."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f), "checkpoint")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(folder_message(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    kind = foreign_kind(path)
    if kind:
        raise CheckpointError(f"{path} is {kind}, not a checkpoint; expected {EXPECTED}")
    try:
        with warnings.catch_warnings():  # torch warns before refusing a TorchScript archive
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice (including turning weights_only off, which
        # would let the file run code): name only what the file asked to load
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e))
        what = f"it would load {found.group(1)}" if found else "it is not made of tensors and plain data alone"
        raise CheckpointError(
            f"checkpoint {path} refused: it holds objects other than tensors and plain data ({what}); expected {EXPECTED}"
        ) from None
    except Exception as e:  # torch.load fails in many ways on garbage (KeyError, IndexError, ...)
        raise CheckpointError(
            f"checkpoint {path} is unreadable or truncated ({e.__class__.__name__}: {str(e)[:200]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not a kdistill checkpoint (it lacks format {FORMAT!r}); expected {EXPECTED}"
        )
    return state


def folder_message(path: Path, shown: int = 6) -> str:
    """Why a folder is not a checkpoint, naming the checkpoints in it (two levels down at most:
    a run directory's phases, a sweep's or a mutual run's models)."""
    if (path / CHECKPOINT_NAME).is_file():
        return f"{path} is a folder, not a checkpoint; pass the checkpoint it holds: {path / CHECKPOINT_NAME}"
    found = sorted([*path.glob(f"*/{CHECKPOINT_NAME}"), *path.glob(f"*/*/{CHECKPOINT_NAME}")])
    what = "a run directory" if (path / "config.yaml").is_file() else "a folder"
    if not found:
        return f"{path} is {what}, not a checkpoint, and holds no {CHECKPOINT_NAME}; expected {EXPECTED}"
    listed = ", ".join(str(p) for p in found[:shown]) + (
        f" and {len(found) - shown} more" if len(found) > shown else ""
    )
    return f"{path} is {what}, not a checkpoint; it holds {listed}"


# file signatures of things often mistaken for a checkpoint
_SIGNATURES = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"\x1f\x8b": "a gzip archive",
    b"\x93NUMPY": "a NumPy array file",
    b"\x89HDF": "an HDF5 file",
}


def foreign_kind(path: Path) -> str | None:
    """What a file that is not a PyTorch file is ("an ONNX model", "a text file", ...);
    None for a zip archive or pickle that may be one (torch.load then judges it)."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head.startswith(b"\x80"):  # a pickle: PyTorch's legacy format
        return None
    if path.suffix == ".onnx" or _looks_like_onnx(head):
        return "an ONNX model"
    text = _text(head)
    if text is not None:
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return f"a text file (it starts {first!r})" if first else "a text file"
    kind = next((k for magic, k in _SIGNATURES.items() if head.startswith(magic)), None)
    return kind or "neither a zip archive nor a pickle (the formats of PyTorch files)"


def _zip_kind(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None  # a cut PyTorch file, perhaps: torch.load says it is truncated
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        return "a TorchScript archive"
    if not any(n.endswith("data.pkl") for n in names):
        return "a zip archive that is not a PyTorch file"
    return None


def _looks_like_onnx(head: bytes) -> bool:
    """An ONNX ModelProto starts with its ir_version (field 1, a small varint) and then a
    length-delimited field (producer name, graph, opset import, ...)."""
    return (
        len(head) > 2 and head[0] == 0x08 and head[1] < 0x80 and head[2] in (0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42)
    )


def _text(head: bytes) -> str | None:
    if b"\x00" in head:
        return None
    for cut in range(4):  # the 4096 bytes may end inside a multi-byte character
        try:
            return head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None


def state_dict_mismatch(error: RuntimeError) -> str:
    """The first concrete mismatch of a load_state_dict error (its first line is a header)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 else lines[0] if lines else "mismatch")[:300]


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The architecture a checkpoint's spec names, without pretrained or loaded weights (the
    checkpoint's weights replace them): a source rebuilds from its record (a Hugging Face
    config, a TorchScript file checked against its sha256), not from the network."""
    if not isinstance(spec, dict):
        raise CheckpointError(
            "the checkpoint names no model (model_spec is empty): it holds the weights of a model built "
            "outside kdistill (e.g. given to the Python API); build that model and load checkpoint['model'] into it"
        )
    try:
        kwargs = dict(spec.get("kwargs", {}))
        model = build(spec["name"], kwargs.pop("num_classes", 10), kwargs, record=spec.get("source"))[0]
        return attach_stages(attach(model, adapter_from(spec.get("input")), f"model {spec['name']!r}"), spec)
    except KDistillError as e:
        raise CheckpointError(f"cannot rebuild the checkpoint's model: {e}") from None
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
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit model {spec.get('name')!r}: {state_dict_mismatch(e)}"
        ) from None
    if state.get("kind") == "mutual":  # the peers' weights are in the file too, but not a model of their own
        peers = [p.get("name") for p in state.get("peer_specs") or [] if p]
        log(
            f"note: {path} is a deep-mutual-learning checkpoint of {1 + len(peers)} models; using model 0 ({spec.get('name')}), "
            f"not its peer(s) {', '.join(map(str, peers)) or '(unnamed)'}"
        )
    return model, state
