"""Property-based tests (hypothesis): the config loader and the ImageFolder loader, fed
random input, either succeed with the right result or raise their one-line error naming
the culprit; nothing else ever escapes."""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdistill.config import RunConfig, dump_config, load_config, load_yaml
from kdistill.data.imagefolder import load_imagefolder
from kdistill.errors import ConfigError, DataError

from .conftest import tiny_png

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ the config loader

KEYS = [
    "name",
    "seed",
    "device",
    "born_again",
    "output_dir",
    "data.dataset",
    "data.image_size",
    "data.val_size",
    "data.crop_padding",
    "data.flip",
    "data.augment",
    "train.epochs",
    "train.batch_size",
    "train.eval_batch_size",
    "train.label_smoothing",
    "train.grad_clip",
    "train.amp",
    "train.checkpoint_every",
    "train.optimizer.lr",
    "train.optimizer.name",
    "train.optimizer.momentum",
    "train.optimizer.weight_decay",
    "train.optimizer.betas",
    "train.schedule.name",
    "train.schedule.pct_start",
    "train.schedule.milestones",
    "train.schedule.gamma",
    "train.schedule.warmup_epochs",
    "teacher.name",
    "teacher.weights",
    "teacher.checkpoints",
    "student.name",
    "student.train.epochs",
    "distill.alpha",
    "distill.ce_weight",
    "distill.methods",
    "distill.methods.kd.temperature",
    "distill.methods.kd.weight",
    "distill.methods.dkd.beta",
    "distill.train.optimizer.lr",
    "mutual.models",
    "mutual.temperature",
    # not keys
    "trian.epochs",
    "train.epoch",
    "train.optimizer.lr.x",
    "distill.methods.nope",
    "data",
    "train",
]

VALUES = st.one_of(
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(
        [
            "sgd",
            "adamw",
            "cosine",
            "step",
            "kd",
            "seed_student",
            "resnet20",
            "cpu",
            "auto",
            "bf16",
            "abc",
            "",
            "yes",
            "null",
            "[1, 2]",
            "{kd: {}}",
        ]
    ),
    st.booleans(),
    st.lists(st.integers(0, 50), max_size=3),
)


def _yaml(value) -> str:
    if isinstance(value, float):
        return {float("inf"): ".inf", float("-inf"): "-.inf"}.get(value, ".nan" if value != value else repr(value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_config_loader_accepts_or_names_the_key(pairs) -> None:
    overrides = [f"{key}={_yaml(value)}" for key, value in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message
        # the message names the path of an override at fault (or a section of it)
        prefixes = {".".join(key.split(".")[:i]) for key, _ in pairs for i in range(1, key.count(".") + 2)}
        assert any(p in message for p in prefixes), message
        return
    assert isinstance(cfg, RunConfig)
    # a valid config survives its own dump: what a run directory records can be loaded again
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(dump_config(cfg))
        assert load_config(path) == cfg


@PROPERTY
@given(st.text(max_size=200))
def test_any_yaml_text_loads_or_is_a_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        try:
            data = load_yaml(path)
        except ConfigError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return
        assert isinstance(data, dict)
        try:
            load_config(path)
        except ConfigError as e:
            assert "\n" not in str(e)


# ------------------------------------------------------------------ the ImageFolder loader

GOOD_KINDS = ("png", "bmp")
BAD_KINDS = ("corrupt", "truncated")  # image extensions, not decodable: refused, named
KINDS = GOOD_KINDS + BAD_KINDS + ("text", "hidden")  # a .txt file is skipped (counted in the log), a hidden one too


def _content(kind: str, k: int) -> tuple[str, bytes]:
    colour = (40 * k % 256, 80, 160)
    if kind == "png":
        return f"f{k}.png", tiny_png(colour)
    if kind == "bmp":
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (5, 7), colour).save(buf, format="BMP")
        return f"f{k}.bmp", buf.getvalue()
    if kind == "corrupt":
        return f"bad{k}.jpg", np.random.default_rng(k).integers(0, 256, 64, dtype=np.uint8).tobytes()
    if kind == "truncated":
        return f"cut{k}.png", tiny_png(colour)[:30]
    if kind == "text":
        return f"notes{k}.txt", b"not an image"
    return f".hidden{k}", b"\0"  # skipped, like .DS_Store


CLASS_NAMES = ["ant", "bee", "cat", "dog", "e e", "émeu", ".cache"]
SPLIT = st.dictionaries(st.sampled_from(CLASS_NAMES), st.lists(st.sampled_from(KINDS), max_size=3), max_size=4)


def _build(kind: str, root: Path, tree: dict[str, dict[str, list[str]]]) -> Path:
    files: dict[str, bytes] = {}
    folders = []
    for split, classes in tree.items():
        for cls, kinds in classes.items():
            folders.append(f"{split}/{cls}")
            for k, file_kind in enumerate(kinds):
                name, data = _content(file_kind, k)
                files[f"{split}/{cls}/{name}"] = data
    if kind == "folder":
        (root / "tree").mkdir()  # an existing (maybe empty) data set folder
        for folder in folders:
            (root / "tree" / folder).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / "tree" / name).write_bytes(data)
        return root / "tree"
    if kind == "tar":
        path = root / "data.tar"
        with tarfile.open(path, "w") as tf:
            for folder in folders:
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        return path
    path = root / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for folder in folders:
            zf.writestr(folder + "/", b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@PROPERTY
@given(train=SPLIT, test=SPLIT, kind=st.sampled_from(["folder", "tar", "zip"]))
def test_imagefolder_loads_or_names_the_problem(train, test, kind) -> None:
    tree = {"train": train, "test": test}
    visible = {
        s: {
            c: [k for k in kinds if k not in ("hidden", "text")]
            for c, kinds in classes.items()
            if not c.startswith(".")
        }
        for s, classes in tree.items()
    }
    with tempfile.TemporaryDirectory() as d:
        source = _build(kind, Path(d), tree)
        try:
            splits, classes = load_imagefolder(source, 8)
        except DataError as e:
            message = str(e)
            assert "\n" not in message and str(source) in message, message
            empty = [f"{s}/{c}/" for s, cs in visible.items() for c, files in cs.items() if not files]
            bad = [
                f"{s}/{c}/{_content(k, i)[0]}"
                for s, cs in tree.items()
                for c, ks in cs.items()
                for i, k in enumerate(ks)
                if k in BAD_KINDS and not c.startswith(".")
            ]
            if not visible["train"] and not visible["test"]:  # no folders at all: no layout
                assert "no images under" in message or "no class folders" in message
            elif not visible["train"] or not visible["test"]:
                assert "no images under" in message
            elif empty:
                assert "is empty" in message and any(f in message for f in empty), message
            elif set(visible["train"]) != set(visible["test"]):
                assert "different classes" in message
            elif len(visible["train"]) < 2:
                assert "single class" in message
            else:
                assert bad and "unreadable image" in message and any(f in message for f in bad), message
            return
    # it loaded: then the tree was valid, and the result is exactly what it holds
    assert visible["train"] and set(visible["train"]) == set(visible["test"]) and len(visible["train"]) >= 2
    assert not any(k in BAD_KINDS for cs in visible.values() for ks in cs.values() for k in ks)
    assert classes == sorted(visible["train"])
    for split in ("train", "test"):
        images, labels = splits[split]
        expected = [i for i, c in enumerate(classes) for _ in visible[split][c]]
        assert labels.tolist() == expected
        assert images.shape == (len(expected), 3, 8, 8) and images.dtype == np.uint8


def test_the_oracle_sees_valid_trees() -> None:
    """Guard against a vacuous property: a valid tree does load (hypothesis would also
    find these, but not necessarily in 40 examples)."""
    tree = {"train": {"ant": ["png", "hidden"], "bee": ["bmp"]}, "test": {"ant": ["png"], "bee": ["png", "png"]}}
    for kind in ("folder", "tar", "zip"):
        with tempfile.TemporaryDirectory() as d:
            splits, classes = load_imagefolder(_build(kind, Path(d), tree), 8)
        assert classes == ["ant", "bee"] and splits["test"][1].tolist() == [0, 1, 1]
