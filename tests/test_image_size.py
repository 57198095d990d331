"""Any image size: the resize policy at decode time, the batched random-resized-crop (against
a per-image reference), its boxes, evaluation's centre crop, the teacher cache's replay of
the new views, and a model trained on 48 px images."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kdistill
from kdistill.api import augmentation, make_train_config, prepare_data
from kdistill.cli import main
from kdistill.config import DataConfig, load_config
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.data.imagefolder import _decode
from kdistill.data.loader import (
    EvalData,
    Normalize,
    ResizedCrop,
    TrainLoader,
    centre_crop,
    epoch_views,
    pack_pixels,
    resized_crop_flip,
    resized_crop_flip_packed,
    sample_boxes,
)
from kdistill.errors import CacheError, ConfigError, DataError
from kdistill.runs import run_identity
from kdistill.teacher_cache import fingerprint

CPU = torch.device("cpu")


def _reference(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """One image at a time: crop the box, resize it with F.interpolate, flip."""
    out = []
    for image, (top, left, h, w), flip in zip(images, boxes.tolist(), flips.tolist()):
        crop = image[None, :, top : top + h, left : left + w].float()
        x = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        out.append(x.flip(-1) if flip else x)
    return torch.cat(out)


# ------------------------------------------------------------------ random-resized-crop
@pytest.mark.parametrize("channels", [3, 10])  # packed pixels, and the per-value path (> 8 channels)
@pytest.mark.parametrize("size", [7, 24, 56])  # downscaling, both, upscaling
def test_resized_crop_matches_per_image_interpolate(channels: int, size: int) -> None:
    g = torch.Generator().manual_seed(channels * 100 + size)
    images = torch.randint(0, 256, (12, channels, 40, 30), dtype=torch.uint8, generator=g)
    boxes = sample_boxes(12, 40, 30, (0.08, 1.0), (3 / 4, 4 / 3), g)
    boxes[0] = torch.tensor([0, 0, 40, 30])  # the whole image
    boxes[1] = torch.tensor([39, 29, 1, 1])  # a single pixel in the corner
    boxes[2] = torch.tensor([5, 0, 2, 30])  # a thin strip
    flips = torch.rand(12, generator=g) < 0.5
    out = resized_crop_flip(images, boxes, flips, size)
    assert out.shape == (12, channels, size, size) and out.dtype == torch.float32
    # the same bilinear formula as F.interpolate, in another order of float operations
    torch.testing.assert_close(out, _reference(images, boxes, flips, size), rtol=0, atol=1e-3)


def test_resized_crop_of_the_whole_image_at_its_size_is_exact() -> None:
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 16, 16]] * 3)
    flips = torch.tensor([False, True, False])
    out = resized_crop_flip(images, boxes, flips, 16)
    expected = torch.where(flips[:, None, None, None], images.flip(-1), images).float()
    assert torch.equal(out, expected)


def test_packed_resized_crop_takes_the_indexed_images() -> None:
    images = torch.randint(0, 256, (10, 3, 20, 24), dtype=torch.uint8)
    idx = torch.tensor([7, 2, 2, 9])
    boxes = torch.tensor([[0, 0, 20, 24], [3, 4, 10, 12], [3, 4, 10, 12], [19, 0, 1, 24]])
    flips = torch.tensor([True, False, True, False])
    packed = resized_crop_flip_packed(pack_pixels(images), idx, boxes, flips, 16)
    assert packed.shape == (4, 4, 16, 16)  # RGB packed into 4 bytes: the 4th channel is padding
    assert packed.is_contiguous(memory_format=torch.channels_last)
    assert (packed[:, 3] == 0).all()
    assert torch.equal(packed[:, :3], resized_crop_flip(images[idx], boxes, flips, 16))
    # a flip mirrors the output exactly
    assert torch.equal(packed[2], packed[1].flip(-1))


def test_sample_boxes_follow_scale_and_ratio() -> None:
    H, W, n = 300, 400, 4000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = sample_boxes(n, H, W, scale, ratio, torch.Generator().manual_seed(0))
    assert boxes.dtype == torch.int64 and boxes.shape == (n, 4)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    # area and aspect ratio in range, up to the rounding of h and w to whole pixels
    area, aspect = (h * w).double() / (H * W), w.double() / h
    assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1]
    assert aspect.min() >= ratio[0] * 0.98 and aspect.max() <= ratio[1] * 1.02
    assert area.min() < 0.1 and area.max() > 0.95  # the range is used, not a corner of it
    # log-uniform in a range symmetric around 1 (a wide image favours wide boxes among those
    # that fit, as in torchvision: so a square image here)
    square = sample_boxes(n, 320, 320, scale, ratio, torch.Generator().manual_seed(0))
    assert abs((square[:, 3].double() / square[:, 2]).log().mean()) < 0.02
    # the position is uniform over the room left: both ends are reached
    assert (top == 0).any() and (top + h == H).any() and (left == 0).any() and (left + w == W).any()
    again = sample_boxes(n, H, W, scale, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(boxes, again)


def test_sample_boxes_fall_back_to_the_centre() -> None:
    # a square of 90-100% of a 10 x 100 image never fits: the centred 10 x 10 box instead
    boxes = sample_boxes(50, 10, 100, (0.9, 1.0), (1.0, 1.0), torch.Generator().manual_seed(1))
    assert (boxes == torch.tensor([0, 45, 10, 10])).all()
    # a tall image and a wide-only ratio range: the full width, the height clamped to the ratio
    boxes = sample_boxes(5, 100, 10, (0.9, 1.0), (2.0, 3.0), torch.Generator().manual_seed(1))
    assert (boxes == torch.tensor([47, 0, 5, 10])).all()


def test_epoch_views_with_boxes_are_replayable() -> None:
    crop = ResizedCrop(24, (0.35, 1.0), (3 / 4, 4 / 3))
    a = epoch_views(200, 3, 5, 0, True, crop, (48, 64))
    b = epoch_views(200, 3, 5, 0, True, crop, (48, 64))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a.boxes.shape == (200, 4) and 0 < a.flips.sum() < 200
    # the same order as pad-and-crop's epoch: the shuffle is drawn first
    assert torch.equal(a.order, epoch_views(200, 3, 5, 4, True).order)
    assert not torch.equal(epoch_views(200, 3, 6, 0, True, crop, (48, 64)).boxes, a.boxes)
    assert not torch.equal(epoch_views(200, 4, 5, 0, True, crop, (48, 64)).boxes, a.boxes)
    no_flip = epoch_views(200, 3, 5, 0, False, crop, (48, 64))
    assert not no_flip.flips.any() and torch.equal(no_flip.boxes, a.boxes)


# ------------------------------------------------------------------ the loader and evaluation
def _images(n: int = 40, side: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % 4


def test_train_loader_random_resized_crop_batches() -> None:
    images, labels = _images()
    norm = Normalize([0.5] * 3, [0.25] * 3, CPU, channels_last=True)
    crop = ResizedCrop(16, (0.2, 1.0), (0.5, 2.0))
    loader = TrainLoader(images, labels, 8, CPU, norm, seed=2, resized_crop=crop)
    assert loader.resized_crop == crop and loader.size == 16
    views = loader.views(1)
    batches = list(loader.epoch(1))
    assert len(batches) == 5
    for step, batch in enumerate(batches):
        idx = views.order[step * 8 : (step + 1) * 8]
        assert torch.equal(batch.indices, idx)
        assert batch.images.shape == (8, 3, 16, 16)
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        expected = norm(resized_crop_flip(images[idx], views.boxes[idx], views.flips[idx], 16))
        torch.testing.assert_close(batch.images, expected, rtol=0, atol=1e-5)
    # the same epoch again: the same batches (a resumed run replays them)
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, loader.epoch(1)))
    # without a normalisation the crops come back as uint8, as pad-and-crop's do
    raw = TrainLoader(images, labels, 8, CPU, None, seed=2, resized_crop=crop)
    first = next(iter(raw.epoch(1)))
    idx = views.order[:8]
    assert first.images.dtype == torch.uint8
    assert torch.equal(first.images, resized_crop_flip(images[idx], views.boxes[idx], views.flips[idx], 16).round())


def test_unaugmented_and_evaluation_images_are_centre_cropped() -> None:
    images, labels = _images(8, 24)
    loader = TrainLoader(images, labels, 4, CPU, None, augment=False, resized_crop=ResizedCrop(16))
    batch = next(iter(loader.epoch(0)))
    assert torch.equal(batch.images, images[batch.indices][:, :, 4:20, 4:20])
    evals = EvalData(images, labels, 3, CPU, None, size=16)
    assert torch.cat([b.images for b in evals]).equal(images[:, :, 4:20, 4:20])
    assert torch.cat([b.images for b in evals.subset(2, 6)]).equal(images[2:6, :, 4:20, 4:20])
    assert centre_crop(images, 24) is not None and torch.equal(centre_crop(images, 24), images)
    assert torch.equal(centre_crop(images[:, :, :, :23], 21), images[:, :, 1:22, 1:22])
    with pytest.raises(ValueError, match="stored size"):
        TrainLoader(images, labels, 4, CPU, None, size=16)  # pad-and-crop at another size


def test_augmentation_settings_are_checked_against_the_stored_size() -> None:
    rrc = DataConfig(augmentation="random_resized_crop", train_size=24, image_size=48)
    assert augmentation(rrc, (3, 48, 48))["resized_crop"] == ResizedCrop(24, (0.35, 1.0), (3 / 4, 4 / 3))
    assert augmentation(DataConfig(), (3, 32, 32))["size"] is None  # pad-and-crop: the whole image, as before
    assert augmentation(DataConfig(augmentation="random_resized_crop"), (3, 40, 48))["size"] == 40
    with pytest.raises(DataError, match="train_size=24 is larger than the stored images"):
        augmentation(rrc, (3, 20, 20))
    with pytest.raises(DataError, match="pad_crop trains at the stored size"):
        augmentation(DataConfig(train_size=24, image_size=24), (3, 32, 32))


@pytest.mark.parametrize(
    ("override", "detail"),
    [
        ("data.crop_scale=[0.5, 0.2]", "0 < low <= high <= 1"),
        ("data.crop_scale=[0, 1]", "0 < low <= high <= 1"),
        ("data.crop_ratio=[2, 1]", "0 < low <= high"),
        ("data.train_size=24", "needs augmentation: random_resized_crop"),
        ("data.augmentation=random_crop", "data.augmentation"),
        ("data.resize=stretch", "data.resize"),
    ],
)
def test_bad_image_size_settings_are_one_line(override: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", [override])
    message = str(info.value)
    assert detail in message and "\n" not in message


# ------------------------------------------------------------------ the resize policy at decode
def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _striped(width: int = 40, height: int = 20) -> np.ndarray:
    """Green bands on the outer quarters, red and blue halves of the centred square."""
    x = np.zeros((height, width, 3), dtype=np.uint8)
    x[:, :, 1] = 255
    x[:, width // 4 : width // 2] = (255, 0, 0)
    x[:, width // 2 : 3 * width // 4] = (0, 0, 255)
    return x


def test_crop_keeps_the_aspect_ratio_and_squash_stretches() -> None:
    data = _png(_striped())  # 40 wide, 20 high
    crop = _decode("x.png", data, 32, "crop").transpose(1, 2, 0).astype(int)  # (32, 32, 3)
    # the centred 20 x 20 square, scaled up: left half red, right half blue, no green band
    # (the edge columns blend a little with their outside neighbours, as resize-then-crop does)
    assert (crop[:, 1:15] == (255, 0, 0)).all() and (crop[:, 17:31] == (0, 0, 255)).all()
    assert crop[:, 1:31, 1].max() == 0 and crop[:, [0, 31], 1].max() < 64
    squash = _decode("x.png", data, 32, "squash").transpose(1, 2, 0).astype(int)
    # the whole image, twice as narrow: the green bands take the outer eight columns
    assert (squash[:, :7] == (0, 255, 0)).all() and (squash[:, 25:] == (0, 255, 0)).all()
    assert (squash[:, 9:15] == (255, 0, 0)).all()
    # a tall image is cropped the other way
    tall = _decode("t.png", _png(_striped().transpose(1, 0, 2).copy()), 16, "crop").transpose(1, 2, 0).astype(int)
    assert (tall[1:7] == (255, 0, 0)).all() and (tall[9:15] == (0, 0, 255)).all()


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_an_image_at_the_size_is_untouched(resize: str) -> None:
    array = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(_decode("x.png", _png(array), 32, resize), array.transpose(2, 0, 1))


@pytest.mark.slow  # decodes the 6000 JPEGs again
def test_bundled_sample_is_the_same_under_both_policies(mini: ImageDataset) -> None:
    squashed = load_dataset("cifar10-mini", resize="squash")
    assert torch.equal(squashed.train_images, mini.train_images)
    assert torch.equal(squashed.test_images, mini.test_images)


def _folder(root: Path, side: tuple[int, int] = (64, 48), per_class: int = 12) -> Path:
    """Two classes of non-square images: bright squares on dark (class a) and dark on bright (b)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for label, cls in enumerate("ab"):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                x = rng.integers(0, 60, (side[1], side[0], 3), dtype=np.uint8)
                top, left = rng.integers(0, side[1] // 2), rng.integers(0, side[0] // 2)
                x[top : top + side[1] // 2, left : left + side[0] // 2] = 220
                Image.fromarray(x if label == 0 else 255 - x).save(root / split / cls / f"{i}.png")
    return root


def test_load_dataset_resize_policy_and_its_cache(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos", per_class=2)
    crop = load_dataset(root, 32, tmp_path / "cache")
    squash = load_dataset(root, 32, tmp_path / "cache", resize="squash")
    assert crop.image_shape == squash.image_shape == (3, 32, 32)
    assert not torch.equal(crop.train_images, squash.train_images)
    assert len(list((tmp_path / "cache" / "decoded").glob("*.kdstore"))) == 2  # one cache per policy
    assert torch.equal(load_dataset(root, 32, tmp_path / "cache").train_images, crop.train_images)
    with pytest.raises(DataError, match="data.resize='stretch'"):
        load_dataset(root, 32, tmp_path / "cache", resize="stretch")


# ------------------------------------------------------------------ the teacher cache replays the views
@pytest.fixture(scope="module")
def small(mini: ImageDataset) -> ImageDataset:
    keep = torch.arange(0, len(mini.train_labels), 75)[:64]
    return dataclasses.replace(mini, train_images=mini.train_images[keep], train_labels=mini.train_labels[keep])


RRC = DataConfig(augmentation="random_resized_crop", train_size=28, crop_scale=(0.25, 1.0))


def test_teacher_cache_replays_random_resized_crops(small: ImageDataset) -> None:
    torch.manual_seed(0)
    teacher = kdistill.create_model("seed_teacher", image_size=28).eval()
    cache = kdistill.cache_teacher(teacher, small, epochs=2, device="cpu", data=RRC, dtype="float32", batch_size=50)
    assert cache.fingerprint["resized_crop"] == [28, [0.25, 1.0], [0.75, 4 / 3]]
    # a run's batches (another batch size, shuffled): the teacher on them gives the cached logits
    loader = prepare_data(small, cfg=make_train_config(batch_size=32), device=CPU, data=RRC, seed=0).loader
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            assert batch.images.shape[-2:] == (28, 28)
            with torch.no_grad():
                live = teacher(batch.images)
            torch.testing.assert_close(cache.lookup(epoch, batch.indices), live, rtol=1e-4, atol=1e-4)
    # a run with other crops is refused, naming the setting
    other = prepare_data(
        small, cfg=make_train_config(), device=CPU, data=RRC.model_copy(update={"crop_scale": (0.5, 1.0)})
    ).loader
    with pytest.raises(CacheError, match="random_resized_crop"):
        cache.check(fingerprint(other, teacher), 1)
    pad = prepare_data(small, cfg=make_train_config(), device=CPU, data=DataConfig()).loader
    with pytest.raises(CacheError, match="random_resized_crop"):
        cache.check(fingerprint(pad, teacher), 1)


# ------------------------------------------------------------------ end to end at 48 px
@pytest.mark.slow
def test_training_on_48px_photos_with_random_resized_crop(tmp_path: Path) -> None:
    root = _folder(tmp_path / "photos", side=(72, 48), per_class=32)
    torch.manual_seed(0)
    model = kdistill.create_model("seed_student", num_classes=2, image_size=40)
    result = kdistill.train(
        model,
        str(root),
        epochs=5,
        batch_size=16,
        lr=0.01,
        device="cpu",
        image_size=48,
        augmentation="random_resized_crop",
        train_size=40,
        data_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
    )
    losses = [h["train_loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # it learns
    assert result.metrics["top1"] > 75.0  # bright-on-dark vs dark-on-bright: easy once learnt
    info = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["data"]
    assert info["train_size"] == 40 and info["resize"] == "crop" and info["image_size"] == 48


def test_augmentation_benchmark_quick_prints_both_columns(capsys: pytest.CaptureFixture) -> None:
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location("augment_benchmark", root / "augment.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(root))  # as when it runs as a script (for ``from machine import ...``)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(root))
    args = ["--quick", "--sizes", "16", "24", "--images", "64", "--batch-size", "32"]
    assert module.main(args) == 0
    out = capsys.readouterr().out
    assert "Command: `python benchmarks/augment.py --quick --sizes 16 24" in out
    assert "| 16 |" in out and "| 24 |" in out and "ratio rrc / pad_crop" in out
    assert module.main(["--batch-size", "64", "--images", "32"]) == 2


def test_run_identity_names_the_image_size_settings_only_when_set() -> None:
    plain = run_identity(load_config("quickstart"), "train")
    assert not any(key in plain for key in ("data.resize", "data.augmentation", "data.train_size"))
    cfg = load_config(
        "quickstart",
        ["data.augmentation=random_resized_crop", "data.image_size=40", "data.train_size=32", "data.resize=squash"],
    )
    identity = run_identity(cfg, "train")
    assert identity["data.augmentation"] == "random_resized_crop" and identity["data.train_size"] == 32
    assert identity["data.resize"] == "squash" and "data.crop_scale" not in identity


@pytest.mark.slow
def test_cli_train_then_evaluate_at_the_training_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`kdistill evaluate` reads the checkpoint's resize policy and training size: the same
    top-1 as the run's own evaluation, at the same input shape."""
    root = _folder(tmp_path / "photos", side=(60, 48), per_class=16)
    settings = ["data.image_size=48", "data.augmentation=random_resized_crop", "data.train_size=40"]
    args = ["train", "--model", "seed_student", "--data", str(root), "--epochs", "2", "--device", "cpu"]
    args += ["--output-dir", str(tmp_path / "runs"), "--name", "t", "--set", "teacher.kwargs.image_size=40"]
    for setting in settings:
        args += ["--set", setting]
    assert main(args) == 0
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "runs" / "t" / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test"]["num_samples"] == 16
    assert metrics["test"]["top1"] == pytest.approx(summary["test"]["top1"], abs=0.01)
    assert metrics["profile"]["macs"] == summary["profile"]["macs"]


@pytest.mark.slow
def test_study_exports_the_student_at_its_training_size(tmp_path: Path) -> None:
    """`kdistill run` with random-resized-crop at train_size 40 of 48 px images: the ONNX
    export and int8 model take the student's 40 px input (evaluation's centre crop), not
    the stored 48 px images."""
    root = _folder(tmp_path / "photos", side=(60, 48), per_class=16)
    args = ["run", "--data", str(root), "--epochs", "1", "--device", "cpu"]
    args += ["--output-dir", str(tmp_path / "runs"), "--name", "r"]
    for setting in (
        "data.image_size=48",
        "data.augmentation=random_resized_crop",
        "data.train_size=40",
        "student.kwargs.image_size=40",
        "teacher.kwargs.image_size=40",
        "deploy.onnx=true",
    ):
        args += ["--set", setting]
    assert main(args) == 0
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    deployed = summary["deployment"]
    assert deployed["onnx"]["top1"] == pytest.approx(deployed["pytorch_top1"])
    assert deployed["pytorch_top1"] == pytest.approx(summary["models"]["distilled"]["test"]["top1"], abs=0.01)
