"""The decoded data store: a memory-mapped file written once, checked on every read,
shared by processes, and read batch by batch with the same results as in-memory tensors."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kdistill.data.dataset as dataset_module
import kdistill.data.store as store_module
from kdistill.data.dataset import ImageDataset, channel_mean_std, load_dataset
from kdistill.data.loader import (
    EvalData,
    Normalize,
    ResizedCrop,
    TrainLoader,
    centre_crop,
    crop_flip_packed,
    pack_pixels,
    resized_crop_flip_packed,
)
from kdistill.data.store import open_or_build, read_store, write_store
from kdistill.errors import DataError
from kdistill.teacher_cache import fingerprint, tensor_digest
from tests.test_data import _make_source

CPU = torch.device("cpu")


def _arrays(n: int = 7, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n, 3, 5, 6), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, n).astype(np.int64),
        "test_images": rng.integers(0, 256, (2, 3, 5, 6), dtype=np.uint8),
        "test_labels": np.array([0, 2], dtype=np.int64),
    }


def _build(arrays: dict[str, np.ndarray], calls: list | None = None):
    def build(allocate) -> None:
        if calls is not None:
            calls.append(1)
        maps = allocate({k: (a.shape, a.dtype.str) for k, a in arrays.items()}, {"classes": ["a", "b", "c"]})
        for k, a in arrays.items():
            maps[k][:] = a

    return build


def _mapped_files() -> str:
    return Path("/proc/self/maps").read_text()


def test_round_trip(tmp_path: Path) -> None:
    arrays = _arrays()
    path = tmp_path / "s.kdstore"
    write_store(path, {"checksum": "abc"}, _build(arrays))
    store = read_store(path, "abc")
    assert store.classes == ["a", "b", "c"] and store.header["checksum"] == "abc"
    for name, a in arrays.items():
        t = store.tensor(name)
        assert t.dtype == torch.from_numpy(a).dtype and t.shape == a.shape
        assert np.array_equal(t.numpy(), a)
    # every array starts on a page and the file is exactly as long as its header says
    assert all(a["offset"] % 4096 == 0 for a in store.header["arrays"].values())
    assert path.stat().st_size == store.header["size"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.kdstore"]  # no temporary left


def test_images_are_read_through_a_memory_map(tmp_path: Path) -> None:
    """The data set's images live in the store's mapped pages, not in the process's memory."""
    source = _make_source("tar", tmp_path)
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    (store,) = (tmp_path / "cache" / "decoded").glob("*.kdstore")
    ranges = [
        [int(x, 16) for x in line.split()[0].split("-")] for line in _mapped_files().splitlines() if str(store) in line
    ]
    assert ranges, "the store is not mapped"
    for t in (ds.train_images, ds.test_images, ds.train_labels):
        assert any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def test_second_load_does_not_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _make_source("zip", tmp_path)
    calls = []
    decode = dataset_module.decode

    def counting(*args, **kwargs):
        calls.append(args)
        return decode(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "decode", counting)
    first = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    second = load_dataset(source, image_size=8, data_dir=tmp_path / "cache", val_size=2)
    assert len(calls) == 1
    assert torch.equal(first.train_images, second.train_images)
    # the process-level lock and the in-place build: another build of the same store waits
    # for the first, then finds it
    built = []
    open_or_build(tmp_path / "x.kdstore", "c", _build(_arrays(), built))
    open_or_build(tmp_path / "x.kdstore", "c", _build(_arrays(), built))
    assert built == [1]


def test_truncated_store_is_refused_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.kdstore"
    write_store(path, {"checksum": "abc"}, _build(_arrays()))
    copy = tmp_path / "copy.kdstore"
    shutil.copy(path, copy)
    os.truncate(copy, copy.stat().st_size - 4096)
    with pytest.raises(DataError, match=r"copy\.kdstore: data store is .* bytes, its header says .*truncated"):
        read_store(copy, "abc")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(DataError, match="empty: not a kdistill data store"):
        read_store(tmp_path / "empty", "abc")

    # through load_dataset: one warning line naming the file, then a correct rebuild
    source = _make_source("tar", tmp_path)
    cache = tmp_path / "cache"
    expected = load_dataset(source, image_size=8, data_dir=cache).images("train").clone()
    (stored,) = (cache / "decoded").glob("*.kdstore")
    cut = stored.with_name("cut")
    shutil.copy(stored, cut)
    os.truncate(cut, stored.stat().st_size // 2)
    os.replace(cut, stored)  # a new file: the mapping above keeps the old one
    capsys.readouterr()
    again = load_dataset(source, image_size=8, data_dir=cache)
    err = capsys.readouterr().err
    assert f"warning: {stored}: data store is" in err and "truncated" in err and "rebuilding it" in err
    assert torch.equal(again.train_images, expected)
    assert read_store(stored).header["size"] == stored.stat().st_size


def test_store_of_another_data_set_is_refused_and_rebuilt(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "s.kdstore"
    write_store(path, {"checksum": "abc"}, _build(_arrays()))
    with pytest.raises(DataError, match=r"s\.kdstore: data store of another data set"):
        read_store(path, "other")
    # a damaged label (same size, other bytes) fails its digest
    header = read_store(path).header
    offset = header["arrays"]["train_labels"]["offset"]
    damaged = tmp_path / "damaged.kdstore"
    shutil.copy(path, damaged)
    with open(damaged, "r+b") as f:
        f.seek(offset)
        f.write(b"\x07")
    with pytest.raises(DataError, match="'train_labels' does not match its digest"):
        read_store(damaged, "abc")

    # another data set's store at this data set's path: refused with one line, rebuilt
    cache = tmp_path / "cache"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_dataset(_make_source("tar", tmp_path / "a"), image_size=8, data_dir=cache)
    (store_a,) = (cache / "decoded").glob("*.kdstore")
    source_b = _make_source("zip", tmp_path / "b")
    key_b = dataset_module.source_key(dataset_module.sha256_file(source_b), None)
    b_path = dataset_module._cache_path(cache, key_b, 8)
    shutil.copy(store_a, b_path)
    capsys.readouterr()
    b = load_dataset(source_b, image_size=8, data_dir=cache)
    assert "data store of another data set" in capsys.readouterr().err
    assert b.checksum != a.checksum and read_store(b_path).header["checksum"] == key_b


@pytest.mark.parametrize("where", ["reserve", "header"])
def test_no_room_for_the_store(where: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk is one line naming the store, and nothing is left behind."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_module.os, "posix_fallocate" if where == "reserve" else "pwrite", full)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"no room for data store .*\.kdstore: it needs .* GiB, .* GiB free"):
        load_dataset(_make_source("tar", tmp_path), image_size=8, data_dir=cache)
    assert list((cache / "decoded").iterdir()) == []


def test_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(allocate) -> None:
        allocate({"x": ((3, 4), "uint8")}, {})
        raise DataError("x.png: unreadable image")

    with pytest.raises(DataError, match="unreadable"):
        open_or_build(tmp_path / "s.kdstore", "abc", broken)
    assert list(tmp_path.iterdir()) == []


def test_header_records_what_the_store_holds(tmp_path: Path) -> None:
    source = _make_source("folder", tmp_path)
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    (path,) = (tmp_path / "cache" / "decoded").glob("*.kdstore")
    raw = path.read_bytes()
    assert raw[:8] == store_module.MAGIC
    header = json.loads(raw[16 : 16 + int.from_bytes(raw[8:16], "little")])
    # the store is keyed as the decoded data depend on it: the source's files, the layout
    # rules and the split made of them (dataset.source_key), the size and the resize policy
    assert header["checksum"] == dataset_module.source_key(ds.checksum, None)
    assert header["classes"] == ds.classes and header["image_size"] == 8 and header["resize"] == "crop"
    assert header["split_record"] is None  # the folder's own split (kdistill made none)
    # the training split packed a pixel per int32 (RGB and a zero byte, a zero last row and
    # column), as loader.pack_pixels makes it: train_images is a view of it
    assert header["arrays"]["train_pixels"]["shape"] == [len(ds.train_labels), 9, 9, 4]
    assert header["arrays"]["test_images"]["shape"] == [len(ds.test_labels), 3, 8, 8]
    assert header["arrays"]["train_pixels"]["dtype"] == "|u1" and header["arrays"]["train_labels"]["dtype"] == "<i8"
    assert torch.equal(ds.train_pixels, pack_pixels(ds.train_images.contiguous()))
    assert ds.train_images.untyped_storage().data_ptr() == ds.train_pixels.untyped_storage().data_ptr()
    assert ds.with_validation(2).train_pixels is ds.train_pixels  # a split held as rows: the same pixels
    # images replaced (a subset): their pixels no longer match and are dropped (packed per batch)
    subset = dataclasses.replace(ds, train_images=ds.train_images[:3], train_labels=ds.train_labels[:3])
    assert subset.train_pixels is None


# ------------------------------------------------------------------ batches from the store


def _reference_batches(images: torch.Tensor, labels: torch.Tensor, loader: TrainLoader, epoch: int) -> list:
    """The batches of the previous in-memory loader: the whole set packed up front, each
    batch one gather of its crops from it."""
    pixels = pack_pixels(images)
    views = loader.views(epoch)
    out = []
    for step in range(len(loader)):
        idx = views.order[step * loader.batch_size : (step + 1) * loader.batch_size][loader.rank :: loader.world]
        x = crop_flip_packed(pixels, idx, views.offsets[idx], views.flips[idx], loader.padding)
        x = loader.normalize(x, images.shape[1]) if loader.normalize is not None else x[:, : images.shape[1]]
        out.append((x, labels[idx], idx))
    return out


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
@pytest.mark.parametrize("normalized", [True, False])
def test_store_batches_equal_in_memory_batches_bit_for_bit(mini: ImageDataset, shard, normalized: bool) -> None:
    ds = mini.with_validation(300, seed=2)  # the training split is rows of the store
    norm = Normalize(*ds.mean_std(), CPU, channels_last=normalized) if normalized else None
    kw = {"normalize": norm, "seed": 5, "shard": shard}
    # the store's packed pixels, read in place by the crops
    from_store = TrainLoader(
        ds.train_images, ds.train_labels, 64, CPU, rows=ds.train_rows, pixels=ds.train_pixels, **kw
    )
    unpacked = TrainLoader(ds.train_images, ds.train_labels, 64, CPU, rows=ds.train_rows, **kw)  # packed per batch
    in_memory = ds.images("train").clone()  # the split as one ordinary tensor
    from_memory = TrainLoader(in_memory, ds.train_labels, 64, CPU, **kw)
    for epoch in (0, 3):
        reference = _reference_batches(in_memory, ds.train_labels, from_memory, epoch)
        batches = list(zip(from_store.epoch(epoch), from_memory.epoch(epoch), unpacked.epoch(epoch), reference))
        assert len(batches) == len(from_store) == 4700 // 64
        for a, b, c, (x, y, idx) in batches:
            assert torch.equal(a.images, b.images) and torch.equal(a.images, x) and torch.equal(c.images, x)
            assert a.images.dtype == (torch.float32 if normalized else torch.uint8)
            assert torch.equal(a.labels, y) and torch.equal(a.indices, idx) and torch.equal(b.indices, idx)
    # resumed mid-epoch: the same batches from there on
    tail = list(from_store.epoch(1, start_step=70))
    assert all(torch.equal(a.images, b.images) for a, b in zip(tail, list(from_memory.epoch(1))[70:]))


def _reference_resized(images: torch.Tensor, labels: torch.Tensor, loader: TrainLoader, epoch: int) -> list:
    """The random-resized-crop batches of the previous in-memory loader: the whole set
    packed up front (on the device), each batch resampled from it."""
    pixels = pack_pixels(images)
    views = loader.views(epoch)
    out = []
    for step in range(len(loader)):
        idx = views.order[step * loader.batch_size : (step + 1) * loader.batch_size][loader.rank :: loader.world]
        x = resized_crop_flip_packed(pixels, idx, views.boxes[idx], views.flips[idx], loader.size)[:, :3]
        x = loader.normalize(x) if loader.normalize is not None else x.round_().to(torch.uint8)
        out.append((x, labels[idx], idx))
    return out


@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
@pytest.mark.parametrize("normalized", [True, False])
def test_store_random_resized_crops_equal_in_memory_ones_bit_for_bit(
    mini: ImageDataset, shard, normalized: bool
) -> None:
    """Random-resized-crop from each batch's rows of the store: the same boxes and the same
    outputs, bit for bit, as from the whole set packed in memory."""
    ds = mini.with_validation(300, seed=2)
    norm = Normalize(*ds.mean_std(), CPU, channels_last=normalized) if normalized else None
    kw = {"normalize": norm, "seed": 7, "shard": shard, "resized_crop": ResizedCrop(24, (0.2, 1.0))}
    from_store = TrainLoader(
        ds.train_images, ds.train_labels, 256, CPU, rows=ds.train_rows, pixels=ds.train_pixels, **kw
    )
    in_memory = ds.images("train").clone()
    from_memory = TrainLoader(in_memory, ds.train_labels, 256, CPU, **kw)  # gathered and packed per batch
    for epoch in (0, 2):
        assert torch.equal(from_store.views(epoch).boxes, from_memory.views(epoch).boxes)
        reference = _reference_resized(in_memory, ds.train_labels, from_memory, epoch)
        for a, b, (x, y, idx) in zip(from_store.epoch(epoch), from_memory.epoch(epoch), reference, strict=True):
            assert a.images.shape[-2:] == (24, 24) and torch.equal(a.images, x) and torch.equal(b.images, x)
            assert torch.equal(a.labels, y) and torch.equal(a.indices, idx)


def test_centre_crop_and_select_read_rows(mini: ImageDataset) -> None:
    """Evaluation's centre crop (``size``) and its subset (``select``) on a split held as
    rows of the store: the batches of the split copied into memory."""
    ds = mini.with_validation(300, seed=2)
    norm = Normalize(*ds.mean_std(), CPU, channels_last=False)
    val = EvalData(ds.val_images, ds.val_labels, 64, CPU, norm, rows=ds.val_rows, size=24)
    copy = EvalData(ds.images("val").clone(), ds.val_labels, 64, CPU, norm, size=24)
    keep = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:90].sort().values
    cases = ((val, copy), (val.select(keep), copy.select(keep)), (val.select(keep).subset(10, 70), None))
    for got, want in cases:
        got = list(got)
        want = list(want) if want is not None else None
        assert all(b.images.shape[-2:] == (24, 24) for b in got)
        if want is not None:
            assert len(got) == len(want) > 1
            assert all(torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(got, want))
    # by hand: the centred 24 x 24 window of the selected validation images
    images = torch.cat([b.images for b in val.select(keep)])
    assert torch.equal(images, norm(centre_crop(ds.images("val")[keep], 24)))
    sub = torch.cat([b.images for b in val.select(keep).subset(10, 70)])
    assert torch.equal(sub, images[10:70])
    assert torch.equal(val.select(keep).labels, ds.val_labels[keep])


def test_evaluation_and_fingerprints_read_rows(mini: ImageDataset) -> None:
    ds = mini.with_validation(300, seed=2)
    norm = Normalize(*ds.mean_std(), CPU, channels_last=False)
    val = EvalData(ds.val_images, ds.val_labels, 128, CPU, norm, rows=ds.val_rows)
    copy = EvalData(ds.images("val").clone(), ds.val_labels, 128, CPU, norm)
    for data in ((val, copy), (val.subset(100, 250), copy.subset(100, 250))):
        got, want = list(data[0]), list(data[1])
        assert len(got) == len(want) > 1
        assert all(torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices) for a, b in zip(got, want))
    # the teacher cache's fingerprint of the training data: that of the split's own tensors
    loader = TrainLoader(ds.train_images, ds.train_labels, 64, CPU, norm, rows=ds.train_rows)
    copied = TrainLoader(ds.images("train").clone(), ds.train_labels, 64, CPU, norm)
    teacher = torch.nn.Linear(2, 2)
    assert fingerprint(loader, teacher) == fingerprint(copied, teacher)
    assert fingerprint(loader, teacher)["data"] == tensor_digest(ds.images("train"), ds.train_labels)


def test_channel_mean_std_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    images = torch.randint(0, 256, (37, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x = images.double() / 255
    want_mean, want_std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    for chunk in (1 << 20, 60, 1):  # one chunk, several, one image at a time
        monkeypatch.setattr(dataset_module, "CHUNK_VALUES", chunk)
        mean, std = channel_mean_std(images)
        torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), want_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), want_std, rtol=1e-12, atol=1e-12)
        rows = torch.tensor([3, 1, 30, 30])
        assert channel_mean_std(images, rows) == channel_mean_std(images[rows].clone())


# ------------------------------------------------------------------ processes sharing a store


def _scenario_two_ranks_one_store(rank: int, out: Path, source: Path, cache: Path) -> None:
    from kdistill import distributed

    decode = dataset_module.decode

    def counting(*args, **kwargs):  # this forked rank's own module: the test's is untouched
        (out / f"decoded{rank}").write_text("")
        return decode(*args, **kwargs)

    dataset_module.decode = counting
    distributed.ensure(CPU)
    ds = distributed.local_main_first(lambda: load_dataset(source, image_size=8, data_dir=cache, val_size=2))
    mapped = sorted({line.split()[-1] for line in _mapped_files().splitlines() if line.endswith(".kdstore")})
    loader = TrainLoader(
        ds.train_images, ds.train_labels, 4, CPU, seed=3, shard=distributed.shard(), rows=ds.train_rows
    )
    batches = [(b.images, b.labels, b.indices) for e in range(2) for b in loader.epoch(e)]
    torch.save({"batches": batches, "mapped": mapped, "pid": os.getpid()}, out / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_ddp_ranks_read_one_store(tmp_path: Path) -> None:
    """Under torchrun, one rank decodes the data set into the store; both map that one file
    (the page cache holds it once) and together see the batches of one process."""
    from tests.test_distributed import _errors, _launch

    source, cache, out = _make_source("folder", tmp_path), tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    _launch(_scenario_two_ranks_one_store, out, source, cache, timeout=240)
    assert _errors(out) == {}
    assert sorted(p.name for p in out.glob("decoded*")) == ["decoded0"]  # decoded once, by local rank 0
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    (store,) = (cache / "decoded").glob("*.kdstore")
    # (a forked rank also inherits the test process's mappings, e.g. the bundled sample's)
    assert [m for m in ranks[0]["mapped"] if m.startswith(str(cache))] == [str(store)]
    assert [m for m in ranks[1]["mapped"] if m.startswith(str(cache))] == [str(store)]
    assert ranks[0]["pid"] != ranks[1]["pid"]

    ds = load_dataset(source, image_size=8, data_dir=cache, val_size=2)
    one = TrainLoader(ds.images("train").clone(), ds.train_labels, 4, CPU, seed=3)
    single = [b for e in range(2) for b in one.epoch(e)]
    assert len(single) == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2
    for b, r0, r1 in zip(single, ranks[0]["batches"], ranks[1]["batches"]):
        assert torch.equal(b.images[0::2], r0[0]) and torch.equal(b.images[1::2], r1[0])
        assert torch.equal(b.indices[0::2], r0[2]) and torch.equal(b.indices[1::2], r1[2])
