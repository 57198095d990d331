"""Shared pieces of the reliability tests: a tiny ImageFolder tree cut from the real sample,
and helpers to build bad inputs."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdistill.data.dataset import ImageDataset

REPO = Path(__file__).resolve().parents[2]


def png_bytes(array: np.ndarray) -> bytes:
    """(3, H, W) uint8 -> PNG bytes (lossless, so decoding gives the array back)."""
    buf = io.BytesIO()
    Image.fromarray(array.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def tiny_png(colour: tuple[int, int, int] = (10, 20, 30), size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def sample_tree(mini: ImageDataset, root: Path, train_per_class: int, test_per_class: int) -> Path:
    """An ImageFolder tree of the first images of every class of the bundled sample."""
    files = {}
    for split, images, labels, n in (
        ("train", mini.train_images, mini.train_labels, train_per_class),
        ("test", mini.test_images, mini.test_labels, test_per_class),
    ):
        for k, cls in enumerate(mini.classes):
            idx = (labels == k).nonzero().flatten()[:n]
            for j in idx.tolist():
                files[f"{split}/{cls}/{j:05d}.png"] = png_bytes(images[j].numpy())
    return write_tree(root, files)


@pytest.fixture(scope="session")
def tiny_tree(mini: ImageDataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 training and 50 test images (20 / 5 per class) of real CIFAR-10 as PNG files."""
    return sample_tree(mini, tmp_path_factory.mktemp("tiny") / "tree", 20, 5)


def cli_env() -> dict[str, str]:
    """Environment of a ``python -m kdistill`` subprocess: this checkout's code, one thread
    (bit-identical results across runs), the test session's decoded-image cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.pop("KDISTILL_KILLS", None)
    return env


PYTHON = sys.executable
