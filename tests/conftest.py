"""Shared fixtures: an isolated decoded-image cache and the bundled CIFAR-10 sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kdistill
from kdistill.data.dataset import ImageDataset


def _vision_libraries_missing() -> str | None:
    """Why torchvision or timm cannot be used here, None when both import."""
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or a torchvision built for another torch build
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``vision`` need torchvision and timm. Where they do not import, they are
    deselected, and the run says so at its end: ``scripts/test`` (the README's test command,
    which CI runs) runs them in a second environment where they do."""
    vision = [item for item in items if item.get_closest_marker("vision")]
    why = _vision_libraries_missing() if vision else None
    if why is None:
        return
    config.hook.pytest_deselected(items=vision)
    items[:] = [item for item in items if not item.get_closest_marker("vision")]
    config.stash[_VISION_NOTE] = (
        f"{len(vision)} tests marked 'vision' were deselected: torchvision/timm do not import here ({why}); "
        "scripts/test runs them in a second environment (.venv-vision)"
    )


_VISION_NOTE = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _VISION_NOTE in config.stash:
        terminalreporter.write_line(config.stash[_VISION_NOTE])


@pytest.fixture(scope="session", autouse=True)
def kdistill_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every subprocess it starts) caches decoded images in a temporary
    folder, never in ~/.cache; the folder lives for the whole session so that the bundled
    sample is decoded once."""
    cache = tmp_path_factory.mktemp("kdistill-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDISTILL_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def mini(kdistill_cache: Path) -> ImageDataset:
    """The bundled real CIFAR-10 sample: 5000 train / 1000 test 32x32 images, 10 classes."""
    return kdistill.load_dataset("cifar10-mini")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of tiny tensors (a batch of 2 through a deep model is
    hundreds of tiny ops): thread-pool handoffs dominate them, and on a busy 2-core machine
    they made single tests take 10-30 s instead of a fraction of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def seeded() -> None:
    torch.manual_seed(0)
