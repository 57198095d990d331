"""The folder layouts people have: a single root of class folders split by kdistill, CSV and
JSONL manifests, torchvision's image extensions; each bad input is one line naming the file
or row. Tiny images are made with PIL in ``tmp_path``."""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import kdistill.data.dataset as dataset_module
import kdistill.data.imagefolder as imagefolder_module
from kdistill.config import load_config
from kdistill.data import split as splitting
from kdistill.data.dataset import load_dataset, source_key
from kdistill.data.imagefolder import IMG_EXTENSIONS, read_imagefolder
from kdistill.errors import ConfigError, DataError

SIZES = {"cat": 10, "dog": 23, "emu": 7}  # class -> images: uneven on purpose


def _png(value: int, size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value % 256, (value * 7) % 256, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _root_files(sizes: dict[str, int] = SIZES) -> dict[str, bytes]:
    return {f"{c}/{c}{i:02d}.png": _png(100 * k + i) for k, (c, n) in enumerate(sizes.items()) for i in range(n)}


def _write(kind: str, tmp_path: Path, files: dict[str, bytes], name: str = "photos") -> Path:
    """A folder, or an archive whose members are in the reverse order of the folder's
    (file order must not matter), under one top folder as archives often are."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    if kind == "folder":
        for rel, data in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_bytes(data)
        return tmp_path / name
    members = list(reversed(files.items()))
    if kind == "tar.gz":
        path = tmp_path / f"{name}.tar.gz"
        with tarfile.open(path, "w:gz") as tf:
            for rel, data in members:
                info = tarfile.TarInfo(f"{name}/{rel}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return path
    path = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, data in members:
            zf.writestr(f"{name}/{rel}", data)
    return path


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(dataset_module, "decode", boom)
    monkeypatch.setattr(imagefolder_module, "decode", boom)


# ------------------------------------------------------------------ the split itself


@pytest.mark.parametrize("n", [3, 4, 7, 10, 23, 37, 100, 1001])
@pytest.mark.parametrize("val,test", [(0.1, 0.1), (0.0, 0.2), (0.25, 0.15), (0.05, 0.3)])
def test_split_counts_are_within_one_image_of_the_fractions(n: int, val: float, test: float) -> None:
    counts = splitting.split_counts(n, val, test)
    assert sum(counts.values()) == n
    if n >= 10:  # large enough that no split needs its one image raised
        for split, fraction in (("train", 1 - val - test), ("val", val), ("test", test)):
            assert abs(counts[split] - fraction * n) < 1, (split, counts)
    assert counts["test"] >= 1 and (counts["val"] >= 1) == (val > 0) and counts["train"] >= 1


def test_split_is_a_function_of_the_names_and_seed_only() -> None:
    by_class = {c: [f"{c}/{i}.png" for i in range(n)] for c, n in SIZES.items()}
    first = splitting.assign(by_class, 0.1, 0.2, 0, "src")
    shuffled = {c: random.Random(1).sample(names, len(names)) for c, names in reversed(by_class.items())}
    assert splitting.assign(shuffled, 0.1, 0.2, 0, "src") == first
    other = splitting.assign(by_class, 0.1, 0.2, 1, "src")
    assert other != first and splitting.fingerprint(other) != splitting.fingerprint(first)
    for split in ("train", "val", "test"):  # stratified: every class in every split, in proportion
        for c, n in SIZES.items():
            want = {"train": 0.7, "val": 0.1, "test": 0.2}[split] * n
            assert first[split][c] and abs(len(first[split][c]) - want) <= 1
    every = sorted(name for s in first.values() for names in s.values() for name in names)
    assert every == sorted(n for names in by_class.values() for n in names)  # a partition


def test_a_new_image_moves_few_others() -> None:
    names = [f"a/{i}.png" for i in range(200)]
    before = splitting.assign({"a": names, "b": names[:50]}, 0.1, 0.1, 0, "src")
    after = splitting.assign({"a": [*names, "a/new.png"], "b": names[:50]}, 0.1, 0.1, 0, "src")
    moved = sum(n not in after["test"]["a"] for n in before["test"]["a"])
    assert moved <= 2 and after["test"]["b"] == before["test"]["b"]


# ------------------------------------------------------------------ a single root of class folders


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "zip"])
def test_single_root_is_split_and_recorded(kind: str, tmp_path: Path) -> None:
    source = _write(kind, tmp_path, _root_files())
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    assert ds.classes == ["cat", "dog", "emu"]
    record = ds.split
    assert record["layout"] == "class folders"
    assert (record["val"], record["test"], record["seed"]) == (0.1, 0.1, 0)  # the defaults
    counts = record["counts"]
    assert counts == {"train": len(ds.train_labels), "val": len(ds.val_labels), "test": len(ds.test_labels)}
    assert sum(counts.values()) == sum(SIZES.values())
    for labels, fraction in ((ds.train_labels, 0.8), (ds.val_labels, 0.1), (ds.test_labels, 0.1)):
        per_class = torch.bincount(labels, minlength=3).tolist()
        assert all(abs(got - fraction * n) <= 1 for got, n in zip(per_class, SIZES.values())), per_class
    assert ds.val_split is None and ds.train_images.shape[1:] == (3, 8, 8)


def test_folder_and_archives_split_alike(tmp_path: Path) -> None:
    loaded = [
        load_dataset(
            _write(kind, tmp_path, _root_files()), image_size=8, data_dir=tmp_path / "cache", split={"seed": 3}
        )
        for kind in ("folder", "tar.gz", "zip")
    ]
    for ds in loaded[1:]:
        assert ds.split == loaded[0].split
        assert torch.equal(ds.test_images, loaded[0].test_images) and torch.equal(ds.val_labels, loaded[0].val_labels)


def test_file_system_order_is_irrelevant(tmp_path: Path) -> None:
    files = _root_files()
    a = _write("folder", tmp_path / "a", files)
    b = _write("folder", tmp_path / "b", dict(reversed(files.items())))  # created in the other order
    ra, rb = read_imagefolder(a).record, read_imagefolder(b).record
    assert ra["fingerprint"] == rb["fingerprint"]
    assert read_imagefolder(a, {"seed": 1}).record["fingerprint"] != ra["fingerprint"]


def test_split_settings_and_cache_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write("folder", tmp_path, _root_files())
    cache = tmp_path / "cache"
    first = load_dataset(source, image_size=8, data_dir=cache, split={"val": 0, "test": 0.3, "seed": 2})
    assert first.val_images is None and first.split["counts"] == {"train": 28, "test": 12}
    with monkeypatch.context() as m:  # the same split again, and its record given back: from the cache
        _forbid_decoding(m)
        again = load_dataset(source, image_size=8, data_dir=cache, split={"val": 0.0, "test": 0.3, "seed": 2})
        recorded = load_dataset(source, image_size=8, data_dir=cache, split=first.split)
    assert again.split == recorded.split == first.split
    assert torch.equal(recorded.test_images, first.test_images)
    with monkeypatch.context() as m:  # another seed or other fractions change the arrays: not from the cache
        _forbid_decoding(m)
        for other in ({"val": 0, "test": 0.3, "seed": 3}, {"val": 0, "test": 0.2, "seed": 2}):
            with pytest.raises(AssertionError, match="decoded again"):
                load_dataset(source, image_size=8, data_dir=cache, split=other)
    keys = {source_key("abc", None), source_key("abd", None), *(source_key("abc", (0.1, 0.1, s)) for s in (0, 1))}
    assert len(keys) == 4 and source_key("abc", (0, 0.1, 0)) == source_key("abc", (0.0, 0.1, 0))


def test_a_changed_folder_warns_against_the_recorded_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = _write("folder", tmp_path, _root_files())
    record = load_dataset(source, image_size=8, data_dir=tmp_path / "cache").split
    for i in range(5):
        (source / "dog" / f"new{i}.png").write_bytes(_png(7 + i))
    capsys.readouterr()
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split=record)
    err = capsys.readouterr().err
    assert f"warning: {source}: the recorded split (fingerprint {record['fingerprint']}" in err
    assert ds.split["fingerprint"] in err and "not the same" in err


def test_val_size_on_a_single_root(tmp_path: Path) -> None:
    source = _write("folder", tmp_path, _root_files())
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache", val_size=5, seed=1)
    assert ds.split["val"] == 0.0 and len(ds.val_labels) == 5  # val_size replaces the default fraction
    with pytest.raises(DataError, match=r"data.split.val=0.2 and data.val_size=5 both hold out"):
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", val_size=5, split={"val": 0.2})


def test_a_class_too_small_to_split(tmp_path: Path) -> None:
    source = _write("folder", tmp_path, _root_files({"cat": 10, "dog": 2}))
    with pytest.raises(DataError) as info:
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    assert str(info.value) == (
        f"{source}: class 'dog' has 2 images; splitting it into train/val/test needs at least 3 (one per split); "
        "add images or lower data.split's fractions"
    )
    ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"val": 0})  # 2 are enough for 2 splits
    assert torch.bincount(ds.test_labels).tolist() == [1, 1]


def test_bad_fractions(tmp_path: Path) -> None:
    source = _write("folder", tmp_path, _root_files())
    with pytest.raises(DataError, match=r"data.split: val=0.5, test=0.5; expected"):
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"val": 0.5, "test": 0.5})
    with pytest.raises(ConfigError, match=r"data.split.*val \+ test = 1.0"):
        load_config("quickstart", ["data.split.val=0.6", "data.split.test=0.4"])
    with pytest.raises(ConfigError, match="split.val and val_size both"):
        load_config("quickstart", ["data.split.val=0.1", "data.val_size=10"])
    cfg = load_config("quickstart", ["data.split.test=0.2"])  # --set reaches the new keys
    assert (cfg.data.split.val, cfg.data.split.test, cfg.data.split.seed) == (None, 0.2, 0)


# ------------------------------------------------------------------ root/{train,test}/ with data.split


def _train_test_files() -> dict[str, bytes]:
    files = {f"train/{k}": v for k, v in _root_files().items()}
    files.update({f"test/{c}/t{i}.png": _png(50 + i) for c in SIZES for i in range(2)})
    return files


def test_train_test_tree_keeps_its_test_split(tmp_path: Path) -> None:
    source = _write("folder", tmp_path, _train_test_files())
    plain = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    assert plain.split is None and len(plain.train_labels) == 40 and len(plain.test_labels) == 6
    with pytest.raises(DataError) as info:
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"test": 0.2})
    assert str(info.value).startswith(
        f"data.split.test=0.2: {source} has its own test split (its test/ folder); remove data.split.test"
    )
    held = load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"val": 0.2, "seed": 1})
    assert held.split["layout"] == "train/test folders" and held.split["test"] is None
    assert held.split["counts"] == {"train": len(held.train_labels), "val": len(held.val_labels), "test": 6}
    assert len(held.val_labels) + len(held.train_labels) == 40
    assert torch.equal(held.test_images, plain.test_images)


# ------------------------------------------------------------------ which files are images


def test_extension_rule_and_counted_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = _root_files()
    files.update(
        {
            "cat/notes.txt": b"x",
            "dog/labels.txt": b"x",
            "emu/meta.csv": b"a,b",
            "cat/UPPER.PNG": _png(1),  # any case
            "dog/deep/nested.png": _png(2),  # sub-folders of a class folder, as ImageFolder
            "cat/.DS_Store": b"\0",  # hidden: skipped silently
            ".ipynb_checkpoints/x.png": _png(3),
        }
    )
    source = _write("folder", tmp_path, files)
    capsys.readouterr()
    listing = read_imagefolder(source)
    assert "skipped 3 files that are not images (.txt: 2, .csv: 1)" in capsys.readouterr().err
    names = [name for items in listing.splits.values() for name, _, _ in items]
    assert f"{source}/cat/UPPER.PNG".endswith(next(n for n in names if n.endswith("UPPER.PNG")))
    assert any(n.endswith("dog/deep/nested.png") for n in names)
    assert len(names) == sum(SIZES.values()) + 2
    assert set(IMG_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"}


def test_an_image_named_file_that_does_not_decode_is_refused(tmp_path: Path) -> None:
    source = _write("folder", tmp_path, {**_root_files(), "emu/broken.jpg": b"not a jpeg"})
    with pytest.raises(DataError, match=r"photos:emu/broken\.jpg: unreadable image"):
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"val": 0, "test": 0.5})


# ------------------------------------------------------------------ manifests


def _images(folder: Path, sizes: dict[str, int] = SIZES) -> list[tuple[str, str]]:
    rows = []
    for k, (c, n) in enumerate(sizes.items()):
        for i in range(n):
            rel = f"img/{c}_{i}.png"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(_png(100 * k + i))
            rows.append((rel, c))
    return rows


def _csv(path: Path, rows: list[tuple], header: str = "path,label") -> Path:
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_is_split_like_a_folder(fmt: str, tmp_path: Path) -> None:
    rows = _images(tmp_path)
    if fmt == "csv":
        manifest = _csv(tmp_path / "train.csv", rows)
    else:
        manifest = _jsonl(tmp_path / "train.jsonl", [{"path": p, "label": c} for p, c in rows])
    ds = load_dataset(manifest, image_size=8, data_dir=tmp_path / "cache")
    assert ds.classes == ["cat", "dog", "emu"] and ds.split["layout"] == "manifest"
    assert sum(ds.split["counts"].values()) == sum(SIZES.values())
    # the same images as a single root of class folders split alike: the split follows the names
    by_name = splitting.assign({c: [p for p, cc in rows if cc == c] for c in SIZES}, 0.1, 0.1, 0, "x")
    assert ds.split["fingerprint"] == splitting.fingerprint(by_name)


def test_manifest_split_column_and_numeric_labels(tmp_path: Path) -> None:
    rows = _images(tmp_path, {"2": 6, "10": 6})
    split = ["train", "train", "train", "val", "test", "test"] * 2
    manifest = _csv(tmp_path / "all.csv", [(p, c, s) for (p, c), s in zip(rows, split)], header="label,path,split")
    manifest.write_text("\n".join(["path,label,split", *(f"{p},{c},{s}" for (p, c), s in zip(rows, split))]) + "\n")
    ds = load_dataset(manifest, image_size=8, data_dir=tmp_path / "cache")
    assert ds.classes == ["2", "10"]  # whole numbers sort as numbers: label k is class k
    assert ds.split["layout"] == "manifest split column" and ds.split["counts"] == {"train": 6, "val": 2, "test": 4}
    assert ds.test_labels.tolist() == [0, 0, 1, 1]
    jsonl = _jsonl(tmp_path / "ints.jsonl", [{"path": p, "label": int(c)} for p, c in rows])
    assert load_dataset(jsonl, image_size=8, data_dir=tmp_path / "cache").classes == ["2", "10"]
    with pytest.raises(DataError, match=r"its own test split \(its split column\)"):
        load_dataset(manifest, image_size=8, data_dir=tmp_path / "cache", split={"test": 0.2})


@pytest.mark.parametrize(
    "rows,expected",
    [
        ([("img/cat_0.png", "cat"), ("img/x.jpg", "dog")], "train.csv:3: path 'img/x.jpg' does not exist"),
        ([("img/cat_0.png", "cat"), ("img/dog_0.png",)], "train.csv:3: 1 column; expected 2 (path,label)"),
        ([("img/cat_0.png", "cat", "x")], "train.csv:2: 3 columns; expected 2 (path,label)"),
        ([("/etc/passwd", "cat")], "train.csv:2: path '/etc/passwd' is absolute or contains '..'"),
        ([("../secret.png", "cat")], "train.csv:2: path '../secret.png' is absolute or contains '..'"),
        ([("img/../../x.png", "cat")], "train.csv:2: path 'img/../../x.png' is absolute or contains '..'"),
        (
            [("img/cat_0.png", "cat"), ("img/cat_0.png", "dog")],
            "train.csv:3: path 'img/cat_0.png' is already on line 2",
        ),
        ([("img/cat_0.png", "")], "train.csv:2: empty label"),
        ([], "train.csv: no rows"),
    ],
)
def test_bad_csv_rows(rows: list[tuple], expected: str, tmp_path: Path) -> None:
    _images(tmp_path)
    manifest = _csv(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as info:
        load_dataset(manifest, image_size=8, data_dir=tmp_path / "cache")
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert str(manifest) in message


def test_bad_manifest_headers_keys_and_values(tmp_path: Path) -> None:
    rows = _images(tmp_path)
    bad_header = _csv(tmp_path / "h.csv", rows, header="file,label")
    with pytest.raises(DataError, match=r"h.csv:1: columns 'file', 'label'; expected path and label"):
        load_dataset(bad_header, data_dir=tmp_path / "cache")
    extra_key = _jsonl(tmp_path / "k.jsonl", [{"path": rows[0][0], "label": "cat", "weight": 1}])
    with pytest.raises(DataError, match=r"k.jsonl:1: columns 'path', 'label', 'weight'; expected"):
        load_dataset(extra_key, data_dir=tmp_path / "cache")
    missing_key = _jsonl(tmp_path / "m.jsonl", [{"path": rows[0][0]}])
    with pytest.raises(DataError, match=r"m.jsonl:1: columns 'path'; expected path and label"):
        load_dataset(missing_key, data_dir=tmp_path / "cache")
    bool_label = _jsonl(tmp_path / "b.jsonl", [{"path": rows[0][0], "label": True}])
    with pytest.raises(DataError, match=r"b.jsonl:1: label true; expected a string or a whole number"):
        load_dataset(bool_label, data_dir=tmp_path / "cache")
    (tmp_path / "j.jsonl").write_text(json.dumps({"path": rows[0][0], "label": "cat"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"j.jsonl:2: not valid JSON"):
        load_dataset(tmp_path / "j.jsonl", data_dir=tmp_path / "cache")
    bad_split = _csv(tmp_path / "s.csv", [(p, c, "holdout") for p, c in rows], header="path,label,split")
    with pytest.raises(DataError, match=r"s.csv:2: split 'holdout'; expected one of train, val, test"):
        load_dataset(bad_split, data_dir=tmp_path / "cache")


def test_manifest_label_not_in_the_class_list_and_an_empty_split(tmp_path: Path) -> None:
    rows = _images(tmp_path, {"cat": 3, "dog": 3, "emu": 1})
    split = ["train", "train", "test", "train", "train", "test", "test"]  # emu only in test
    manifest = _csv(tmp_path / "m.csv", [(p, c, s) for (p, c), s in zip(rows, split)], header="path,label,split")
    with pytest.raises(DataError) as info:
        load_dataset(manifest, data_dir=tmp_path / "cache")
    assert str(info.value) == f"{manifest}:8: label 'emu' (test row) is not a class of the training rows (cat, dog)"
    no_test = _csv(tmp_path / "n.csv", [(p, c, "train") for p, c in rows[:6]], header="path,label,split")
    with pytest.raises(DataError) as info:
        load_dataset(no_test, data_dir=tmp_path / "cache")
    assert str(info.value) == f"{no_test}: the test split is empty; expected at least one image in it"


def test_a_failed_load_leaves_nothing_behind(tmp_path: Path) -> None:
    _images(tmp_path)
    manifest = _csv(tmp_path / "train.csv", [("img/cat_0.png", "cat"), ("img/nope.png", "dog")])
    with pytest.raises(DataError):
        load_dataset(manifest, data_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.*"))


# ------------------------------------------------------------------ end to end: recorded, reused


@pytest.mark.slow
def test_train_on_a_single_root_records_its_split_and_evaluate_reuses_it(
    kdistill_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from kdistill.checkpoint import load_checkpoint
    from kdistill.cli import main
    from kdistill.engine import select_device
    from kdistill.runs import build_teacher, teacher_split_differs

    source = _write("folder", tmp_path, _root_files({"cat": 12, "dog": 12, "emu": 12}))
    args = ["train", "--model", "seed_student", "--data", str(source), "--epochs", "1", "--device", "cpu"]
    args += ["--output-dir", str(tmp_path / "runs"), "--name", "tr", "--set", "data.split.seed=4"]
    args += ["--set", "data.split.test=0.25", "--set", "train.batch_size=8"]
    assert main(args) == 0
    state = load_checkpoint(tmp_path / "runs" / "tr" / "checkpoint.pt")
    record = state["data"]["split"]
    assert (record["val"], record["test"], record["seed"]) == (0.1, 0.25, 4)
    assert record["counts"] == {"train": 24, "val": 3, "test": 9}
    run = json.loads((tmp_path / "runs" / "tr" / "run.json").read_text())
    assert run["identity"]["data.split"] == {"val": None, "test": 0.25, "seed": 4}

    capsys.readouterr()  # evaluate on the checkpoint's own data: the same 9 test images, no warning
    assert main(["evaluate", str(tmp_path / "runs" / "tr" / "checkpoint.pt"), "--json", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["test"]["num_samples"] == 9 and "warning" not in err

    # a teacher trained on another split of the same data has seen this run's test images
    other = load_dataset(source, image_size=32, split={"test": 0.25, "seed": 5})
    assert teacher_split_differs(state, other)
    assert not teacher_split_differs(state, load_dataset(source, image_size=32, split={"test": 0.25, "seed": 4}))
    cfg = load_config("quickstart", [f"teacher.checkpoint={tmp_path / 'runs' / 'tr' / 'checkpoint.pt'}"])
    build_teacher(cfg, 3, select_device("cpu"), other)
    assert "was trained on another split of this data set" in capsys.readouterr().err


def test_an_archives_layout_is_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _write("tar.gz", tmp_path, _root_files())
    first = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "layouts").glob("*.json"))

    def boom(*args, **kwargs):
        raise AssertionError("listed the archive again")

    monkeypatch.setattr(dataset_module, "own_splits", boom)
    _forbid_decoding(monkeypatch)
    again = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
    assert again.split == first.split and torch.equal(again.test_images, first.test_images)


def test_the_python_api_takes_a_single_root_and_its_split(tmp_path: Path, kdistill_cache: Path) -> None:
    import kdistill

    source = _write("folder", tmp_path, _root_files())
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    result = kdistill.train(
        model, str(source), split={"val": 0, "test": 0.3, "seed": 2}, image_size=8, epochs=1, batch_size=8, device="cpu"
    )
    assert result.metrics["num_samples"] == 12  # the 30 % test split: 3 + 7 + 2 images
    with pytest.raises(ConfigError, match="split.val and val_size both"):
        kdistill.train(model, str(source), split={"val": 0.1}, val_size=3, image_size=8, epochs=1, device="cpu")


def test_a_val_folder_is_the_validation_split(tmp_path: Path) -> None:
    files = _train_test_files()
    files.update({f"val/{c}/v{i}.png": _png(70 + i) for c in ("cat", "dog") for i in range(3)})  # emu has none
    for kind in ("folder", "zip"):
        source = _write(kind, tmp_path / kind, files)
        ds = load_dataset(source, image_size=8, data_dir=tmp_path / "cache")
        assert len(ds.train_labels) == 40 and len(ds.test_labels) == 6 and ds.val_labels.tolist() == [0] * 3 + [1] * 3
        assert ds.split is None  # the source's own split: nothing kdistill made
    with pytest.raises(DataError, match=r"has its own val split \(its test/ and val/ folders\); remove data.split.val"):
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", split={"val": 0.1})
    with pytest.raises(DataError, match=r"data.val_size=4: .* has its own val split"):
        load_dataset(source, image_size=8, data_dir=tmp_path / "cache", val_size=4)
    files["val/owl/v.png"] = _png(1)
    with pytest.raises(DataError, match=r"val/ has classes that train/ has not \(owl\)"):
        load_dataset(_write("folder", tmp_path / "owl", files), image_size=8, data_dir=tmp_path / "cache")


def test_a_folder_is_listed_without_reading_its_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a folder reads no image (a folder larger than memory can be listed); each
    image's bytes are read when it is decoded, and a file gone by then is one line naming it."""
    root = _write("folder", tmp_path, _root_files())
    reads: list[str] = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or original(self))
    listing = read_imagefolder(root, {"val": 0.2, "test": 0.2, "seed": 0})
    assert reads == []
    key = listing.splits["train"][0][0]
    assert listing.read(key) == (root / key).read_bytes() and reads
    (root / key).unlink()
    with pytest.raises(DataError, match=f"{key}: cannot read"):
        listing.read(key)
