"""Data: ImageFolder trees and archives, the decoded cache, validation splits, the bundled
sample, and the batched augmentation of the training loader."""

from __future__ import annotations

import io
import os
import tarfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdistill.data.dataset as dataset_module
import kdistill.data.imagefolder as imagefolder_module
from kdistill.data.dataset import ImageDataset, load_dataset
from kdistill.data.imagefolder import load_imagefolder
from kdistill.data.loader import (
    Normalize,
    TrainLoader,
    crop_flip,
    crop_flip_packed,
    epoch_views,
    pack_pixels,
)
from kdistill.errors import DataError

CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

# ------------------------------------------------------------------ a tiny ImageFolder tree
# Classes are created out of order on purpose: labels must follow the sorted names.
# (relative path, PIL mode, size, colour, expected RGB after decoding or None for lossy JPEG)
TRAIN = [
    ("train/cat/c1.png", "RGBA", (10, 14), (10, 20, 200, 128), (10, 20, 200)),  # alpha dropped
    ("train/cat/c0.bmp", "RGB", (40, 40), (0, 0, 255), (0, 0, 255)),
    ("train/ant/a1.jpg", "RGB", (20, 24), (200, 10, 10), None),
    ("train/ant/a0.png", "RGB", (7, 9), (250, 0, 0), (250, 0, 0)),
    ("train/bee/b0.png", "L", (33, 31), 120, (120, 120, 120)),  # grayscale -> 3 equal channels
    ("train/bee/b1.png", "P", (16, 16), 3, None),  # palette image
]
TEST = [
    ("test/bee/t.png", "RGB", (50, 20), (0, 200, 0), (0, 200, 0)),
    ("test/ant/t.png", "RGB", (8, 8), (255, 1, 2), (255, 1, 2)),
    ("test/cat/t.png", "LA", (12, 12), (90, 255), (90, 90, 90)),
]
CLASSES = ["ant", "bee", "cat"]
# sorted by class, then by file name within the class
TRAIN_ORDER = [
    "train/ant/a0.png",
    "train/ant/a1.jpg",
    "train/bee/b0.png",
    "train/bee/b1.png",
    "train/cat/c0.bmp",
    "train/cat/c1.png",
]
TRAIN_LABELS = [0, 0, 1, 1, 2, 2]
TEST_LABELS = [0, 1, 2]


def _image_bytes(mode: str, size: tuple[int, int], colour, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format=fmt)
    return buf.getvalue()


def _files(extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    fmt = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}
    files = {
        name: _image_bytes(mode, size, colour, fmt[Path(name).suffix]) for name, mode, size, colour, _ in TRAIN + TEST
    }
    files["README.txt"] = b"not part of the tree"
    files["train/ant/.DS_Store"] = b"\0\1garbage"  # hidden files are skipped
    files.update(extra or {})
    return files


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _write_tar(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(prefix + name, data)
    return path


def _make_source(kind: str, tmp_path: Path, files: dict[str, bytes] | None = None) -> Path:
    files = files if files is not None else _files()
    if kind == "folder":
        return _write_tree(tmp_path / "tree", files)
    if kind == "tar":
        return _write_tar(tmp_path / "data.tar", files)
    if kind == "tar.gz":  # one top-level folder above train/ and test/, as archives often have
        return _write_tar(tmp_path / "data.tar.gz", files, prefix="mydata/")
    if kind == "zip":
        return _write_zip(tmp_path / "data.zip", files, prefix="mydata/")
    raise AssertionError(kind)


SOURCES = ["folder", "tar", "tar.gz", "zip"]


def _check_decoded(images: np.ndarray, labels: np.ndarray, entries, order, expected_labels, size: int) -> None:
    assert images.shape == (len(entries), 3, size, size)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert labels.tolist() == expected_labels
    by_name = {e[0]: e for e in entries}
    for i, name in enumerate(order):
        expected = by_name[name][4]
        if expected is None:
            continue
        # a solid colour stays exactly that colour through RGB conversion and resizing
        want = np.array(expected, dtype=np.uint8)[:, None, None]
        assert (images[i] == want).all(), (name, images[i][:, 0, 0], expected)


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("size", [32, 16])
def test_imagefolder(kind: str, size: int, tmp_path: Path) -> None:
    source = _make_source(kind, tmp_path)
    splits, classes = load_imagefolder(source, size)
    assert classes == CLASSES
    assert set(splits) == {"train", "test"}
    train_x, train_y = splits["train"]
    _check_decoded(train_x, train_y, TRAIN, TRAIN_ORDER, TRAIN_LABELS, size)
    test_x, test_y = splits["test"]
    _check_decoded(
        test_x,
        test_y,
        TEST,
        ["test/ant/t.png", "test/bee/t.png", "test/cat/t.png"],
        TEST_LABELS,
        size,
    )
    # the lossy JPEG is still clearly red
    red = train_x[1].astype(int).mean(axis=(1, 2))
    assert red[0] > 180 and red[1] < 40 and red[2] < 40, red


@pytest.mark.parametrize("kind", SOURCES)
def test_load_dataset_from_source(kind: str, tmp_path: Path) -> None:
    source = _make_source(kind, tmp_path)
    ds = load_dataset(source, image_size=24, data_dir=tmp_path / "cache")
    assert isinstance(ds, ImageDataset)
    assert ds.classes == CLASSES and ds.num_classes == 3
    assert ds.train_images.shape == (6, 3, 24, 24) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (3, 3, 24, 24) and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.tolist() == TRAIN_LABELS and ds.train_labels.dtype == torch.int64
    assert ds.test_labels.tolist() == TEST_LABELS
    assert ds.image_shape == (3, 24, 24)
    splits, _ = load_imagefolder(source, 24)
    assert torch.equal(ds.train_images, torch.from_numpy(splits["train"][0]))
    assert torch.equal(ds.test_images, torch.from_numpy(splits["test"][0]))


def test_all_sources_decode_identically(tmp_path: Path) -> None:
    decoded = [load_imagefolder(_make_source(kind, tmp_path), 32) for kind in SOURCES]
    first, classes = decoded[0]
    for splits, cls in decoded[1:]:
        assert cls == classes
        for split in ("train", "test"):
            np.testing.assert_array_equal(splits[split][0], first[split][0])
            np.testing.assert_array_equal(splits[split][1], first[split][1])


@pytest.mark.parametrize("kind", SOURCES)
def test_unreadable_image_is_named(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = _files({"train/bee/x.jpg": rng.integers(0, 256, 300, dtype=np.uint8).tobytes()})
    source = _make_source(kind, tmp_path, files)
    with pytest.raises(DataError, match=r"x\.jpg") as info:
        load_imagefolder(source, 32)
    assert "unreadable" in str(info.value)
    with pytest.raises(DataError, match=r"x\.jpg"):
        load_dataset(source, data_dir=tmp_path / "cache")


@pytest.mark.parametrize("writer", [_write_tar, _write_zip], ids=["tar", "zip"])
@pytest.mark.parametrize(
    "bad",
    [
        "train/../../evil.png",
        "../train/ant/z.png",
        "/abs/train/ant/z.png",
        "train/ant/../../../z.png",
    ],
)
def test_archive_member_escaping_is_refused(writer, bad: str, tmp_path: Path) -> None:
    files = _files({bad: _image_bytes("RGB", (4, 4), (1, 2, 3), "PNG")})
    archive = writer(tmp_path / ("a.tar" if writer is _write_tar else "a.zip"), files)
    with pytest.raises(DataError, match="absolute path or '..'") as info:
        load_imagefolder(archive, 32)
    assert bad in str(info.value)
    with pytest.raises(DataError):
        load_dataset(archive, data_dir=tmp_path / "cache")


def test_tar_link_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "links.tar"
    _write_tar(archive, _files())
    with tarfile.open(archive, "a") as tf:
        info = tarfile.TarInfo("train/ant/link.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(DataError, match="link"):
        load_imagefolder(archive, 32)


def test_corrupt_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    good = _write_tar(tmp_path / "good.tar.gz", _files())
    archive.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="broken.tar.gz"):
        load_imagefolder(archive, 32)


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere"):
        load_dataset(missing, data_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="nowhere"):
        load_imagefolder(missing, 32)
    with pytest.raises(DataError, match="cifar10-mini"):  # lists the known names
        load_dataset("not-a-dataset", data_dir=tmp_path / "cache")


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor"):
        load_dataset(path, data_dir=tmp_path / "cache")


def test_train_test_class_mismatch(tmp_path: Path) -> None:
    files = _files({"test/dog/t.png": _image_bytes("RGB", (4, 4), (1, 2, 3), "PNG")})
    source = _write_tree(tmp_path / "tree", files)
    with pytest.raises(DataError, match="different classes") as info:
        load_imagefolder(source, 32)
    assert "dog" in str(info.value)
    with pytest.raises(DataError, match="different classes"):
        load_dataset(source, data_dir=tmp_path / "cache")


def test_missing_split(tmp_path: Path) -> None:
    files = {k: v for k, v in _files().items() if not k.startswith("test/")}
    with pytest.raises(DataError, match="test"):
        load_imagefolder(_write_tree(tmp_path / "tree", files), 32)


def test_single_class_is_refused(tmp_path: Path) -> None:
    files = {k: v for k, v in _files().items() if "/ant/" in k}
    with pytest.raises(DataError, match="at least 2"):
        load_imagefolder(_write_tree(tmp_path / "tree", files), 32)


# ------------------------------------------------------------------ the decoded cache


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(dataset_module, "decode", boom)
    monkeypatch.setattr(imagefolder_module, "decode", boom)


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_decoded_cache(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _make_source(kind, tmp_path)
    cache = tmp_path / "cache"
    first = load_dataset(source, image_size=16, data_dir=cache)
    assert list((cache / "decoded").glob("*.kdstore")), "no cache file written"
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        second = load_dataset(source, image_size=16, data_dir=cache)
    assert second.classes == first.classes
    assert second.checksum == first.checksum
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(second, field), getattr(first, field)), field
        assert getattr(second, field).dtype == getattr(first, field).dtype

    # another image size is another cache entry: decoding is needed (and refused here)
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        with pytest.raises(AssertionError, match="decoded again"):
            load_dataset(source, image_size=8, data_dir=cache)


def test_cache_uses_kdistill_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path / "envcache"))
    load_dataset(_make_source("zip", tmp_path), image_size=8)
    assert list((tmp_path / "envcache" / "decoded").glob("*.kdstore"))


def test_changed_folder_is_decoded_again(tmp_path: Path) -> None:
    source = _make_source("folder", tmp_path)
    cache = tmp_path / "cache"
    before = load_dataset(source, image_size=8, data_dir=cache)
    (source / "train" / "cat" / "c2.png").write_bytes(_image_bytes("RGB", (5, 5), (0, 0, 9), "PNG"))
    after = load_dataset(source, image_size=8, data_dir=cache)
    assert len(after.train_labels) == len(before.train_labels) + 1
    assert after.train_labels.tolist() == [0, 0, 1, 1, 2, 2, 2]


def test_corrupt_cache_is_ignored(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _make_source("tar", tmp_path)
    cache = tmp_path / "cache"
    # a copy: overwriting a mapped file in place would crash a process reading it (SIGBUS)
    expected = load_dataset(source, image_size=8, data_dir=cache).images("train").clone()
    for path in (cache / "decoded").glob("*.kdstore"):
        path.write_bytes(b"garbage")
    again = load_dataset(source, image_size=8, data_dir=cache)
    assert torch.equal(again.train_images, expected)
    assert "not a kdistill data store" in capsys.readouterr().err  # one warning line, then rebuilt


def test_killed_writers_temporaries_are_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "decoded"
    cache.mkdir(parents=True)
    stale, live = cache / ".x.kdstore.abc.tmp", cache / ".y.kdstore.def.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    old = time.time() - 2 * dataset_module.STALE_SECONDS
    os.utime(stale, (old, old))
    load_dataset(_make_source("tar", tmp_path), image_size=8, data_dir=tmp_path / "cache")
    assert not stale.exists(), "a killed writer's leftover stayed"
    assert live.exists(), "a live writer's temporary file was removed"
    assert sorted(p.suffix for p in cache.iterdir()) == [".kdstore", ".tmp"]


def test_unwritable_cache_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    ds = load_dataset(_make_source("tar", tmp_path), image_size=8, data_dir=blocker)
    assert len(ds.train_labels) > 0  # the run goes on without the cache
    assert "warning: cannot write data store" in capsys.readouterr().err


# ------------------------------------------------------------------ the bundled sample


def test_bundled_mini(mini: ImageDataset) -> None:
    assert mini.name == "cifar10-mini"
    assert mini.classes == CIFAR10_CLASSES
    assert mini.train_images.shape == (5000, 3, 32, 32) and mini.train_images.dtype == torch.uint8
    assert mini.test_images.shape == (1000, 3, 32, 32) and mini.test_images.dtype == torch.uint8
    assert mini.train_labels.shape == (5000,) and mini.train_labels.dtype == torch.int64
    assert mini.test_labels.shape == (1000,)
    assert set(mini.train_labels.tolist()) == set(range(10))
    assert set(mini.test_labels.tolist()) == set(range(10))
    assert mini.val_images is None
    # real photographs, not blank images
    assert mini.train_images.float().std() > 30
    mean, std = mini.mean_std()
    assert len(mean) == len(std) == 3
    assert all(0.3 < m < 0.6 for m in mean) and all(0.15 < s < 0.35 for s in std)


def _image_counter(images: torch.Tensor, labels: torch.Tensor) -> Counter:
    return Counter((bytes(x.numpy().tobytes()), int(y)) for x, y in zip(images, labels))


def test_validation_split(mini: ImageDataset) -> None:
    ds = load_dataset("cifar10-mini", val_size=500, seed=0)
    train, val = ds.images("train"), ds.images("val")
    assert train.shape == (4500, 3, 32, 32)
    assert val.shape == (500, 3, 32, 32)
    assert len(ds.train_labels) == 4500 and len(ds.val_labels) == 500
    assert torch.equal(ds.test_images, mini.test_images)  # the test split is untouched
    # index arrays into the same (memory-mapped) images, not copies of them
    assert ds.train_images.data_ptr() == ds.val_images.data_ptr()
    assert len(ds.train_rows) == 4500 and len(ds.val_rows) == 500

    # train + val is exactly the original training set, as a multiset of (image, label)
    union = _image_counter(train, ds.train_labels) + _image_counter(val, ds.val_labels)
    assert union == _image_counter(mini.train_images, mini.train_labels)
    assert Counter(ds.train_labels.tolist()) + Counter(ds.val_labels.tolist()) == Counter(mini.train_labels.tolist())
    # disjoint (the sample holds no duplicate images, so sets suffice)
    assert len(_image_counter(mini.train_images, mini.train_labels)) == 5000
    assert not set(_image_counter(val, ds.val_labels)) & set(_image_counter(train, ds.train_labels))

    again = load_dataset("cifar10-mini", val_size=500, seed=0)
    assert torch.equal(again.images("val"), val) and torch.equal(again.train_labels, ds.train_labels)
    other = load_dataset("cifar10-mini", val_size=500, seed=1)
    assert not torch.equal(other.images("val"), val)
    # the same as the in-memory method
    assert torch.equal(mini.with_validation(500, seed=0).images("val"), val)
    # the mean and std are those of the training split's images alone
    in_memory = ImageDataset(**{**ds.__dict__, "train_images": train.clone(), "train_rows": None})
    assert in_memory.mean_std() == ds.mean_std() != mini.mean_std()


def test_validation_split_too_large(mini: ImageDataset) -> None:
    with pytest.raises(DataError, match="val_size"):
        mini.with_validation(5000)
    assert mini.with_validation(0) is mini


# ------------------------------------------------------------------ augmentation and batches


def test_epoch_views_are_replayable() -> None:
    a = epoch_views(100, seed=3, epoch=5, padding=4, flip=True)
    b = epoch_views(100, seed=3, epoch=5, padding=4, flip=True)
    assert a.boxes is None and b.boxes is None  # pad-and-crop: no random-resized-crop boxes
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert sorted(a.order.tolist()) == list(range(100))
    assert a.offsets.shape == (100, 2) and a.offsets.min() >= 0 and a.offsets.max() <= 8
    assert a.flips.dtype == torch.bool and 0 < a.flips.sum() < 100

    next_epoch = epoch_views(100, seed=3, epoch=6, padding=4, flip=True)
    assert not torch.equal(next_epoch.order, a.order)
    assert not torch.equal(next_epoch.offsets, a.offsets)
    assert not torch.equal(next_epoch.flips, a.flips)
    other_seed = epoch_views(100, seed=4, epoch=5, padding=4, flip=True)
    assert not torch.equal(other_seed.order, a.order)

    # the global RNG neither affects nor is affected by the views
    torch.manual_seed(123)
    state = torch.get_rng_state()
    c = epoch_views(100, seed=3, epoch=5, padding=4, flip=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(c.order, a.order)


def test_epoch_views_without_augmentation() -> None:
    v = epoch_views(50, seed=0, epoch=0, padding=0, flip=False)
    assert (v.offsets == 0).all()
    assert not v.flips.any()


def _naive_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    B, C, H, W = images.shape
    out = torch.empty_like(images)
    for i in range(B):
        padded = torch.zeros(C, H + 2 * padding, W + 2 * padding, dtype=images.dtype)
        padded[:, padding : padding + H, padding : padding + W] = images[i]
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[:, dy : dy + H, dx : dx + W]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


@pytest.mark.parametrize(
    ("padding", "H", "W", "C"),
    [
        (4, 32, 32, 3),
        (2, 7, 5, 3),
        (0, 6, 6, 3),
        (1, 1, 3, 3),
        (4, 8, 8, 1),
        (3, 5, 9, 2),
        (2, 6, 4, 4),
        (2, 6, 4, 5),
        (2, 5, 5, 9),
    ],
)
def test_crop_flip_matches_naive(padding: int, H: int, W: int, C: int) -> None:
    """Every channel count: packed as 1, 2, 4 or 8 bytes per pixel, or (9) gathered per value."""
    g = torch.Generator().manual_seed(padding * 100 + H + C)
    B = 16
    images = torch.randint(0, 256, (B, C, H, W), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * padding + 1, (B, 2), generator=g)
    flips = torch.rand(B, generator=g) < 0.5
    got = crop_flip(images, offsets, flips, padding)
    assert got.shape == images.shape and got.dtype == torch.uint8
    assert torch.equal(got, _naive_crop_flip(images, offsets, flips, padding))


def test_packed_crop_flip_takes_the_indexed_images() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 6, 6), generator=g, dtype=torch.uint8)
    idx = torch.tensor([7, 0, 19, 7])
    offsets = torch.randint(0, 5, (4, 2), generator=g)
    flips = torch.tensor([True, False, True, False])
    got = crop_flip_packed(pack_pixels(images), idx, offsets, flips, 2)[:, :3]
    assert torch.equal(got, _naive_crop_flip(images[idx], offsets, flips, 2))


@pytest.mark.parametrize("channels_last", [True, False])
def test_loader_batches_equal_the_per_value_path(channels_last: bool) -> None:
    """The packed gather + normalisation gives exactly what cropping the uint8 images and
    normalising them channel by channel gives, in the model's layout."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 6), generator=g, dtype=torch.uint8)
    labels = torch.arange(40) % 4
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    norm = Normalize(mean, std, torch.device("cpu"), channels_last)
    loader = TrainLoader(images, labels, 16, torch.device("cpu"), norm, seed=3, padding=2)
    raw = TrainLoader(images, labels, 16, torch.device("cpu"), None, seed=3, padding=2)
    views = loader.device_views(1)
    idx = views.order[:16]
    got, plain = loader.batch(idx, views), raw.batch(idx, views)
    expected_u8 = _naive_crop_flip(images[idx], views.offsets[idx], views.flips[idx], 2)
    assert plain.images.dtype == torch.uint8 and torch.equal(plain.images, expected_u8)
    m, sd = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(got.images, (expected_u8.float() / 255 - m) / sd, atol=1e-5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert got.images.is_contiguous(memory_format=layout)
    assert torch.equal(got.labels, labels[idx]) and torch.equal(got.indices, idx)


def test_packed_crop_flip_of_no_images_and_single_value_normalisation() -> None:
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    empty = torch.zeros(0, dtype=torch.long)
    assert crop_flip(images[:0], torch.zeros(0, 2, dtype=torch.long), empty.bool(), 2).shape == (0, 3, 4, 4)
    one = Normalize([0.5], [0.25], torch.device("cpu"), False)(images)  # one value for every channel
    assert one.shape == (5, 3, 4, 4) and torch.allclose(one, (images.float() / 255 - 0.5) / 0.25, atol=1e-5)


def test_crop_flip_edge_cases() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    centre = torch.full((2, 2), 2)
    no_flip = torch.zeros(2, dtype=torch.bool)
    assert torch.equal(crop_flip(images, centre, no_flip, 2), images)  # centred crop: identity
    assert torch.equal(crop_flip(images, centre, ~no_flip, 2), images.flip(-1))
    corner = crop_flip(images, torch.zeros(2, 2, dtype=torch.long), no_flip, 2)
    assert (corner[:, :, :2, :] == 0).all() and (corner[:, :, :, :2] == 0).all()
    assert torch.equal(corner[:, :, 2:, 2:], images[:, :, :2, :2])


def test_normalize_matches_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=g, dtype=torch.uint8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    expected = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    for channels_last in (False, True):
        got = Normalize(mean, std, torch.device("cpu"), channels_last)(x)
        assert got.dtype == torch.float32 and got.shape == x.shape
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def _loader(
    drop_last: bool, n: int = 50, batch_size: int = 16, augment: bool = True
) -> tuple[TrainLoader, torch.Tensor, torch.Tensor, Normalize]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), False)
    loader = TrainLoader(
        images,
        labels,
        batch_size,
        torch.device("cpu"),
        norm,
        seed=7,
        augment=augment,
        padding=2,
        flip=True,
        drop_last=drop_last,
    )
    return loader, images, labels, norm


def test_train_loader_replays_epochs() -> None:
    loader, _, _, _ = _loader(drop_last=True)
    first, second = list(loader.epoch(3)), list(loader.epoch(3))
    assert len(first) == len(second) == len(loader)
    for a, b in zip(first, second):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.indices, b.indices)
    other = list(loader.epoch(4))
    assert not torch.equal(torch.cat([b.indices for b in other]), torch.cat([b.indices for b in first]))


def test_train_loader_batches_carry_indices() -> None:
    loader, images, labels, norm = _loader(drop_last=False)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 4  # ceil(50 / 16)
    assert [len(b.labels) for b in batches] == [16, 16, 16, 2]
    views = loader.views(0)
    for b in batches:
        assert b.indices.dtype == torch.int64
        assert torch.equal(b.labels, labels[b.indices])
        # the images are exactly the augmented, normalised views of those samples
        expected = norm(crop_flip(images[b.indices], views.offsets[b.indices], views.flips[b.indices], 2))
        assert torch.equal(b.images, expected)
    seen = torch.cat([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(50))  # every sample exactly once


def test_train_loader_drop_last() -> None:
    loader, _, labels, _ = _loader(drop_last=True)
    batches = list(loader.epoch(0))
    assert len(loader) == len(batches) == 3
    assert all(len(b.labels) == 16 for b in batches)
    seen = torch.cat([b.indices for b in batches]).tolist()
    assert len(set(seen)) == 48
    for b in batches:
        assert torch.equal(b.labels, labels[b.indices])


def test_train_loader_without_augmentation() -> None:
    loader, images, _, norm = _loader(drop_last=False, augment=False)
    for b in loader.epoch(1):
        assert torch.equal(b.images, norm(images[b.indices]))


def test_train_loader_non_image_inputs() -> None:
    x = torch.randn(20, 5)
    y = torch.arange(20) % 3
    loader = TrainLoader(x, y, 8, torch.device("cpu"), None, seed=0, drop_last=False)
    batches = list(loader.epoch(0))
    for b in batches:
        assert torch.equal(b.images, x[b.indices])  # used as they are
        assert torch.equal(b.labels, y[b.indices])
    assert sorted(torch.cat([b.indices for b in batches]).tolist()) == list(range(20))


def test_train_loader_small_dataset_keeps_last_batch() -> None:
    """drop_last is ignored when the data set is smaller than one batch."""
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    loader = TrainLoader(x, torch.zeros(5, dtype=torch.long), 8, torch.device("cpu"), None, drop_last=True)
    assert len(loader) == 1
    assert len(next(iter(loader.epoch(0))).labels) == 5


def test_normalize_on_mini_batch(mini: ImageDataset) -> None:
    mean, std = mini.mean_std()
    x = Normalize(mean, std, torch.device("cpu"), False)(mini.train_images[:2000])
    # normalised with the training statistics: roughly zero mean, unit std per channel
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1


def test_no_files_written_outside_cache(tmp_path: Path) -> None:
    """Reading an archive never extracts it to disk."""
    archive = _make_source("tar.gz", tmp_path)
    before = set(os.listdir(tmp_path))
    load_imagefolder(archive, 8)
    assert set(os.listdir(tmp_path)) == before
