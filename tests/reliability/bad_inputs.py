"""Every bad input a user can hand kdistill, each with what the error line must say.

Each case builds its input in a fresh folder and returns the command line (or, for the
few errors that only the Python API can provoke, a callable). ``test_bad_inputs.py`` runs
them and checks that each gives one line ``kdistill: error: ...`` naming the culprit, exit
status 2 and no traceback. ``python -m tests.reliability.bad_inputs`` prints the table of
inputs and the error each produced.
"""

from __future__ import annotations

import errno
import io
import itertools
import os
import shlex
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.checkpoint import FORMAT, save_checkpoint
from kdistill.cli import _config_from_args, build_parser
from kdistill.models import create_model
from kdistill.runs import open_run_dir

from .conftest import tiny_png, write_tree


@dataclass
class Case:
    group: str
    what: str
    build: Callable[[Path], list[str] | Callable[[], object]]
    expect: tuple[str, ...]  # fragments of the error line (str() of the paths are added by build)
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    check: Callable[[Path], None] | None = None  # more assertions after the error
    absent: tuple[str, ...] = ()  # fragments that must appear nowhere in the output


# ------------------------------------------------------------------ inputs

GOOD = {
    "train/ant/0.png": tiny_png((200, 10, 10)),
    "train/ant/1.png": tiny_png((190, 20, 10)),
    "train/bee/0.png": tiny_png((10, 200, 10)),
    "train/bee/1.png": tiny_png((20, 190, 10)),
    "test/ant/0.png": tiny_png((210, 0, 0)),
    "test/bee/0.png": tiny_png((0, 210, 0)),
}


def tree(tmp: Path, extra: dict[str, bytes] | None = None, drop: str | None = None) -> Path:
    files = {k: v for k, v in GOOD.items() if not (drop and drop in k)}
    return write_tree(tmp / "data", {**files, **(extra or {})})


def train(tmp: Path, data: Path | str, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "seed_student",
        "--data",
        str(data),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp / "runs"),
        "--name",
        "x",
        "--set",
        "train.batch_size=2",
        *extra,
    ]


def distill(tmp: Path, teacher: Path, *extra: str) -> list[str]:
    return [
        "distill",
        "--teacher",
        str(teacher),
        "--student",
        "seed_student",
        "--data",
        str(tree(tmp)),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--output-dir",
        str(tmp / "runs"),
        "--name",
        "x",
        *extra,
    ]


def tar_with(tmp: Path, member: tarfile.TarInfo, data: bytes = b"") -> Path:
    path = tmp / "data.tar"
    with tarfile.open(path, "w") as tf:
        for name, content in GOOD.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
        member.size = len(data) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(data) if data else None)
    return path


def tar_link(tmp: Path, kind: bytes, target: str) -> Path:
    info = tarfile.TarInfo("train/ant/link.png")
    info.type, info.linkname = kind, target
    return tar_with(tmp, info)


def zip_with(tmp: Path, name: str, data: bytes, mode: int | None = None) -> Path:
    path = tmp / "data.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for n, content in GOOD.items():
            zf.writestr(n, content)
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


def truncated_tar_gz(tmp: Path) -> Path:
    path = tmp / "data.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, content in GOOD.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    path.write_bytes(path.read_bytes()[:300])
    return path


def cifar_archive(tmp: Path, content: bytes) -> list[str]:
    """A CIFAR-10 archive already in the data folder (so nothing is downloaded)."""
    folder = tmp / "cache" / "cifar10"
    folder.mkdir(parents=True)
    (folder / "cifar-10-python.tar.gz").write_bytes(content)
    return train(tmp, "cifar10", "--data-dir", str(tmp / "cache"), "--set", "data.download=false")


def teacher_checkpoint(
    tmp: Path, name: str = "seed_teacher", num_classes: int = 2, weights_of: str | None = None
) -> Path:
    torch.manual_seed(0)
    spec = {"name": name, "kwargs": {"num_classes": num_classes}}
    model = create_model(weights_of or name, num_classes=num_classes)
    path = tmp / "teacher.pt"
    save_checkpoint(
        {
            "kind": "train",
            "model_spec": spec,
            "model": model.state_dict(),
            "data": {"classes": [f"c{i}" for i in range(num_classes)]},
        },
        path,
    )
    return path


def truncated_checkpoint(tmp: Path) -> Path:
    path = teacher_checkpoint(tmp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return path


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def evil_checkpoint(tmp: Path) -> Path:
    path = tmp / "evil.pt"
    torch.save(
        {"format": FORMAT, "model_spec": {"name": "seed_teacher", "kwargs": {}}, "model": {}, "x": Evil(tmp / "pwned")},
        path,
    )
    return path


def no_code_ran(tmp: Path) -> None:
    assert not (tmp / "pwned").exists(), "loading the checkpoint ran code"


def plain_torch_file(tmp: Path) -> Path:
    path = tmp / "plain.pt"
    torch.save({"state_dict": create_model("seed_teacher", num_classes=2).state_dict()}, path)
    return path


def run_dir_of_checkpoints(tmp: Path) -> Path:
    """A finished run's folder: config.yaml and one checkpoint.pt per phase."""
    run_dir = tmp / "runs" / "quickstart"
    for phase in ("teacher", "baseline", "distilled"):
        (run_dir / phase).mkdir(parents=True)
        teacher_checkpoint(tmp).rename(run_dir / phase / "checkpoint.pt")
    (run_dir / "config.yaml").write_text("name: quickstart\n")
    return run_dir


def torchscript_file(tmp: Path) -> Path:
    path = tmp / "model.torchscript.pt"
    torch.jit.script(create_model("seed_student", num_classes=2)).save(str(path))
    return path


def onnx_file(tmp: Path) -> Path:
    """An ONNX model as torch.onnx.export writes it: a ModelProto, ir_version first."""
    path = tmp / "model.onnx"
    path.write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x062.13.0:" + random_bytes(2000))
    return path


def config_file(tmp: Path, text: str) -> list[str]:
    path = tmp / "bad.yaml"
    path.write_text(text)
    return train(tmp, tree(tmp), "--config", str(path))


def resume_into(tmp: Path, checkpoint: Callable[[Path], None]) -> list[str]:
    run_dir = tmp / "runs" / "x"
    run_dir.mkdir(parents=True)
    checkpoint(run_dir / "checkpoint.pt")
    return train(tmp, tree(tmp), "--resume")


def other_model_checkpoint(path: Path) -> None:
    model = create_model("seed_teacher", num_classes=2)
    save_checkpoint({"model": model.state_dict(), "task_state": {}, "optimizer": {}, "epoch": 1, "history": []}, path)


def checkpoint_without_state(path: Path) -> None:
    save_checkpoint({"model": create_model("seed_student", num_classes=2).state_dict()}, path)


def cut_checkpoint(path: Path) -> None:
    other_model_checkpoint(path)
    path.write_bytes(path.read_bytes()[:1000])


def fail_writes(monkeypatch: pytest.MonkeyPatch, code: int, epoch: int = 2) -> None:
    """The disk fails half-way through the checkpoint of ``epoch`` (ENOSPC, EROFS, ...)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == FORMAT and obj.get("epoch") == epoch:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(code, os.strerror(code))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def epoch_one_kept(tmp: Path) -> None:
    from kdistill.checkpoint import load_checkpoint

    run_dir = tmp / "runs" / "x"
    assert load_checkpoint(run_dir / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint, intact
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp")), "temporary file left behind"


def fail_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    import kdistill.logger as logger

    def broken_open(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(logger, "open", broken_open, raising=False)


def locked_run_dir(tmp: Path) -> list[str]:
    import fcntl

    run_dir = tmp / "runs" / "x"
    run_dir.mkdir(parents=True)
    lock = open(run_dir / ".lock", "w")  # held until the case's folder is gone
    lock.write("kdistill pid 4242\n")
    lock.flush()
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    LOCKS.append(lock)
    return train(tmp, tree(tmp), "--resume")


LOCKS: list = []


def made_by(tmp: Path, argv: list[str], kind: str) -> None:
    """The run directory that ``argv`` names, as a ``kind`` run made with ``argv``'s config
    would leave it (its record, before any training)."""
    with open_run_dir(_config_from_args(build_parser().parse_args(argv)), False, kind=kind):
        pass


def resume_other_kind(tmp: Path) -> list[str]:
    made_by(tmp, train(tmp, tree(tmp)), "train")
    return distill(tmp, teacher_checkpoint(tmp), "--resume")


def resume_other_settings(tmp: Path) -> list[str]:
    argv = distill(tmp, teacher_checkpoint(tmp))
    made_by(tmp, argv, "distill")
    return [*argv, "--resume", "--alpha", "0.1"]


def unreadable_run_record(tmp: Path) -> list[str]:
    write_tree(tmp, {"runs/x/run.json": b'{"kind": "tra'})
    return train(tmp, tree(tmp), "--resume")


def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def no_run_dir(tmp: Path) -> None:
    assert not (tmp / "runs").exists(), "a run that failed before its work left its directory behind"


def manifest(tmp: Path, text: str) -> Path:
    """A CSV manifest beside the good tree's files."""
    path = tree(tmp) / "train.csv"
    path.write_text(text)
    return path


def empty_class_folder(tmp: Path) -> Path:
    root = tree(tmp, {"test/cat/0.png": tiny_png()})
    (root / "train" / "cat").mkdir()
    return root


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    # a budget's clock that moves 100 s between readings: the first training step "takes"
    # 100 s, as a big model's does on a slow machine
    from kdistill.budget import BudgetPlan

    ticks = itertools.count(0.0, 100.0)
    monkeypatch.setitem(BudgetPlan.__init__.__kwdefaults__, "clock", lambda: next(ticks))


def small_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    # an 8x8 image is a "bomb" once the limit is 16 pixels: PIL refuses more than twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)


# ------------------------------------------------------------------ the cases

D, M, C, R = "data", "models and checkpoints", "configs", "run directory and disk"

CASES = [
    # data
    Case(
        D,
        "corrupt image (random bytes named x.jpg)",
        lambda t: train(t, tree(t, {"train/bee/x.jpg": random_bytes(300)})),
        ("x.jpg", "unreadable image"),
    ),
    Case(
        D,
        "truncated PNG",
        lambda t: train(t, tree(t, {"train/bee/cut.png": tiny_png()[:40]})),
        ("cut.png", "unreadable image"),
    ),
    Case(
        D,
        "empty (0-byte) image file",
        lambda t: train(t, tree(t, {"test/ant/empty.png": b""})),
        ("empty.png", "unreadable image"),
    ),
    Case(
        D,
        "a text file with an image extension (.txt files are skipped and counted, not refused)",
        lambda t: train(t, tree(t, {"train/ant/notes.txt": b"x", "train/ant/notes.jpg": b"labels: ant\n"})),
        ("notes.jpg", "expected a JPEG/PNG"),
    ),
    Case(
        D,
        "a class too small to split (a single root of class folders)",
        lambda t: train(
            t, write_tree(t / "root", {k.removeprefix("train/"): v for k, v in GOOD.items() if "train/" in k})
        ),
        ("class 'ant' has 2 images", "needs at least 3"),
    ),
    Case(
        D,
        "data.split.test on a data set with its own test/ folder",
        lambda t: train(t, tree(t), "--set", "data.split.test=0.2"),
        ("data.split.test=0.2", "has its own test split"),
    ),
    Case(
        D,
        "manifest row naming a missing file",
        lambda t: train(t, manifest(t, "path,label\ntrain/ant/0.png,ant\nimg/x.jpg,bee\n")),
        ("train.csv:3: path 'img/x.jpg' does not exist",),
    ),
    Case(
        D,
        "manifest row with a missing column",
        lambda t: train(t, manifest(t, "path,label\ntrain/ant/0.png\n")),
        ("train.csv:2: 1 column; expected 2 (path,label)",),
    ),
    Case(
        D,
        "manifest path escaping its folder",
        lambda t: train(t, manifest(t, "path,label\n../secret.png,ant\n")),
        ("train.csv:2: path '../secret.png' is absolute or contains '..'",),
    ),
    Case(
        D,
        "manifest test label that is not a class of the training rows",
        lambda t: train(
            t,
            manifest(
                t, "path,label,split\ntrain/ant/0.png,ant,train\ntrain/bee/0.png,bee,train\ntest/ant/0.png,cow,test\n"
            ),
        ),
        ("train.csv:4: label 'cow' (test row) is not a class of the training rows (ant, bee)",),
    ),
    Case(
        D,
        "manifest split column without test rows (an empty split)",
        lambda t: train(t, manifest(t, "path,label,split\ntrain/ant/0.png,ant,train\ntrain/bee/0.png,bee,train\n")),
        ("train.csv: the test split is empty",),
    ),
    Case(
        D,
        "decompression bomb (image over PIL's pixel limit)",
        lambda t: train(t, tree(t)),
        ("0.png", "decompression bomb"),
        patch=small_bomb,
    ),
    Case(D, "empty class folder", lambda t: train(t, empty_class_folder(t)), ("train/cat/", "is empty")),
    Case(
        D,
        "train and test class sets differ",
        lambda t: train(t, tree(t, {"test/dog/0.png": tiny_png()})),
        ("different classes", "dog"),
    ),
    Case(D, "a single class", lambda t: train(t, tree(t, drop="/bee/")), ("single class", "at least 2")),
    Case(D, "no test split", lambda t: train(t, tree(t, drop="test/")), ("no images under test/",)),
    Case(
        D, "data set path does not exist", lambda t: train(t, t / "nowhere"), ("nowhere", "not found"), check=no_run_dir
    ),
    Case(D, "unknown data set name", lambda t: train(t, "cifar11"), ("cifar11", "cifar10-mini")),
    Case(
        D,
        "a plain file instead of a folder or archive",
        lambda t: train(t, write_tree(t, {"data.txt": b"a,b\n"}) / "data.txt"),
        ("data.txt", "neither a folder nor"),
    ),
    Case(
        D,
        "a CSV file that is not a manifest",
        lambda t: train(t, write_tree(t, {"data.csv": b"a,b\n"}) / "data.csv"),
        ("data.csv:1: columns 'a', 'b'; expected path and label",),
    ),
    Case(
        D, "truncated .tar.gz archive", lambda t: train(t, truncated_tar_gz(t)), ("data.tar.gz", "cannot read archive")
    ),
    Case(
        D,
        "archive member with an absolute path",
        lambda t: train(t, tar_with(t, tarfile.TarInfo("/etc/cron.d/x.png"), tiny_png())),
        ("/etc/cron.d/x.png", "absolute path"),
    ),
    Case(
        D,
        "archive member with '..'",
        lambda t: train(t, zip_with(t, "train/../../evil.png", tiny_png())),
        ("train/../../evil.png", "'..'"),
    ),
    Case(
        D,
        "tar symlink pointing outside (/etc/passwd)",
        lambda t: train(t, tar_link(t, tarfile.SYMTYPE, "/etc/passwd")),
        ("link.png", "is a link"),
    ),
    Case(
        D,
        "tar hard link",
        lambda t: train(t, tar_link(t, tarfile.LNKTYPE, "../../etc/passwd")),
        ("link.png", "is a link"),
    ),
    Case(
        D,
        "zip symlink",
        lambda t: train(t, zip_with(t, "train/ant/link.png", b"/etc/passwd", mode=0o120777)),
        ("link.png", "is a link"),
    ),
    Case(
        D,
        "truncated CIFAR-10 download",
        lambda t: cifar_archive(t, random_bytes(5000)[:1234]),
        ("cifar-10-python.tar.gz", "expected c58f30108f718f92721af3b95e74349a"),
    ),
    Case(
        D,
        "CIFAR-10 archive with the wrong checksum",
        lambda t: cifar_archive(t, truncated_tar_gz(t).read_bytes()),
        ("cifar-10-python.tar.gz", "has md5"),
    ),
    Case(
        D,
        "CIFAR-10 absent, download disabled",
        lambda t: train(t, "cifar10", "--data-dir", str(t / "cache"), "--set", "data.download=false"),
        ("CIFAR-10 not found", "place it at", "cifar-10-python.tar.gz"),
        check=no_run_dir,
    ),
    Case(
        D,
        "CIFAR-10 download unreachable (offline)",
        lambda t: train(t, "cifar10", "--data-dir", str(t / "cache")),
        (
            "cannot download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "place it at",
            "cifar10/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
        patch=offline,
        check=no_run_dir,
    ),
    Case(
        D,
        "validation split as large as the training set",
        lambda t: train(t, tree(t), "--set", "data.val_size=4"),
        ("data.val_size=4", "smaller than the 4 training images"),
    ),
    # models and checkpoints
    Case(
        M,
        "teacher trained on 3 classes, data set has 2",
        lambda t: distill(t, teacher_checkpoint(t, num_classes=3)),
        ("teacher.pt", "predicts 3 classes but the data set has 2"),
    ),
    Case(
        M,
        "teacher checkpoint of another architecture",
        lambda t: distill(t, teacher_checkpoint(t, weights_of="seed_student")),
        ("teacher.pt", "do not fit model 'seed_teacher'"),
    ),
    Case(
        M,
        "truncated teacher checkpoint",
        lambda t: distill(t, truncated_checkpoint(t)),
        ("teacher.pt", "unreadable or truncated"),
    ),
    Case(
        M,
        "malicious pickle as teacher checkpoint",
        lambda t: distill(t, evil_checkpoint(t)),
        ("evil.pt", "refused"),
        check=no_code_ran,
        absent=("weights_only",),
    ),
    Case(
        M,
        "malicious pickle given to evaluate",
        lambda t: ["evaluate", str(evil_checkpoint(t))],
        ("evil.pt", "refused"),
        check=no_code_ran,
        absent=("weights_only",),
    ),
    Case(
        M,
        "a torch file that is not a kdistill checkpoint",
        lambda t: distill(t, plain_torch_file(t)),
        ("plain.pt", "not a kdistill checkpoint"),
    ),
    Case(
        M,
        "teacher checkpoint missing",
        lambda t: distill(t, t / "gone.pt"),
        ("gone.pt", "does not exist"),
        check=no_run_dir,
    ),
    Case(
        M,
        "a run directory given to evaluate",
        lambda t: ["evaluate", str(run_dir_of_checkpoints(t))],
        (
            "quickstart is a run directory, not a checkpoint; it holds",
            "teacher/checkpoint.pt",
            "baseline/checkpoint.pt",
            "distilled/checkpoint.pt",
        ),
        absent=("does not exist",),
    ),
    Case(
        M,
        "a run directory given to export",
        lambda t: ["export", str(run_dir_of_checkpoints(t))],
        ("quickstart is a run directory, not a checkpoint", "teacher/checkpoint.pt"),
        absent=("does not exist",),
    ),
    Case(
        M,
        "a phase folder given as --teacher",
        lambda t: distill(t, run_dir_of_checkpoints(t) / "teacher"),
        (
            "quickstart/teacher is a folder, not a checkpoint; pass the checkpoint it holds:",
            "quickstart/teacher/checkpoint.pt",
        ),
        absent=("does not exist",),
    ),
    Case(
        M,
        "an ONNX model given to export",
        lambda t: ["export", str(onnx_file(t))],
        ("model.onnx is an ONNX model, not a checkpoint", "expected a checkpoint.pt written by kdistill"),
        absent=("weights_only", "refused"),
    ),
    Case(
        M,
        "a TorchScript archive given to evaluate",
        lambda t: ["evaluate", str(torchscript_file(t))],
        (
            "model.torchscript.pt is a TorchScript archive, not a checkpoint",
            "expected a checkpoint.pt written by kdistill",
        ),
        absent=("weights_only", "refused"),
    ),
    Case(
        M,
        "a Markdown report given as --teacher",
        lambda t: distill(t, write_tree(t, {"report.md": b"# Report\n"}) / "report.md"),
        ("report.md is a text file", "expected a checkpoint.pt written by kdistill"),
        absent=("weights_only", "refused"),
    ),
    Case(
        M,
        "evaluate a truncated checkpoint",
        lambda t: ["evaluate", str(truncated_checkpoint(t))],
        ("teacher.pt", "unreadable or truncated"),
    ),
    Case(
        M,
        "resume a run whose checkpoint holds another model",
        lambda t: resume_into(t, other_model_checkpoint),
        ("checkpoint.pt", "does not match this run"),
    ),
    Case(
        M,
        "resume from a checkpoint without training state",
        lambda t: resume_into(t, checkpoint_without_state),
        ("checkpoint.pt", "does not match this run"),
    ),
    Case(
        M,
        "resume from a truncated checkpoint",
        lambda t: resume_into(t, cut_checkpoint),
        ("checkpoint.pt", "unreadable or truncated"),
    ),
    # configs
    Case(
        C, "malformed YAML", lambda t: config_file(t, "train:\n  epochs: [3\n"), ("bad.yaml", "malformed YAML", "line")
    ),
    Case(
        C,
        "YAML with a python object tag",
        lambda t: config_file(t, "name: !!python/object/apply:os.system ['true']\n"),
        ("bad.yaml", "malformed YAML"),
    ),
    Case(
        C, "top level of the YAML is a list", lambda t: config_file(t, "- a\n- b\n"), ("bad.yaml", "expected a mapping")
    ),
    Case(C, "unknown key", lambda t: train(t, tree(t), "--set", "train.epoch=3"), ("train.epoch: unknown key",)),
    Case(
        C,
        "unknown key in a config file",
        lambda t: config_file(t, "train:\n  optimiser: {lr: 0.1}\n"),
        ("config error in", "bad.yaml: train.optimiser: unknown key"),
        absent=("--set", "--model", "--data", "--epochs"),
    ),
    Case(
        C,
        "unknown key from --set: the flag is named, not the config file",
        lambda t: train(t, tree(t), "--set", "train.epoch=1"),
        ("--set train.epoch=1: train.epoch: unknown key",),
        absent=("quickstart.yaml", "config error in"),
    ),
    Case(
        C,
        "-T 0: the flag is named, not the config file",
        lambda t: distill(t, teacher_checkpoint(t), "-T", "0"),
        ("-T/--temperature 0: distill.methods.kd.temperature:", "greater than 0"),
        absent=("quickstart.yaml", "config error in"),
    ),
    Case(
        C,
        "--alpha 2: the flag is named, not the config file",
        lambda t: distill(t, teacher_checkpoint(t), "--alpha", "2"),
        ("--alpha 2: distill.alpha:", "less than or equal to 1"),
        absent=("quickstart.yaml", "config error in"),
    ),
    Case(
        C,
        "--method kdd: the flag is named, not the config file",
        lambda t: distill(t, teacher_checkpoint(t), "--method", "kdd"),
        ("--method kdd: distill.methods: unknown method 'kdd'",),
        absent=("quickstart.yaml", "config error in"),
    ),
    Case(
        C,
        "--device gpu: the flag is named, not the config file",
        lambda t: train(t, tree(t), "--device", "gpu"),
        ("--device gpu: device: expected auto, cpu, cuda, cuda:N or mps",),
        absent=("quickstart.yaml", "config error in"),
    ),
    Case(
        C, "wrong type", lambda t: train(t, tree(t), "--set", "train.batch_size=abc"), ("train.batch_size", "integer")
    ),
    Case(
        C,
        "boolean where a number belongs",
        lambda t: train(t, tree(t), "--set", "train.epochs=yes"),
        ("train.epochs", "expected a number"),
    ),
    Case(
        C,
        "negative size",
        lambda t: train(t, tree(t), "--set", "train.batch_size=-5"),
        ("train.batch_size", "greater than 0"),
    ),
    Case(C, "zero epochs", lambda t: train(t, tree(t), "--epochs", "0"), ("train.epochs", "greater than 0")),
    Case(
        C,
        "zero image size",
        lambda t: train(t, tree(t), "--set", "data.image_size=0"),
        ("data.image_size", "greater than 0"),
    ),
    Case(
        C,
        "learning rate 0",
        lambda t: train(t, tree(t), "--set", "train.optimizer.lr=0"),
        ("train.optimizer.lr", "greater than 0"),
    ),
    Case(
        C,
        "learning rate 100",
        lambda t: train(t, tree(t), "--set", "train.optimizer.lr=100"),
        ("train.optimizer.lr", "less than or equal to 10"),
    ),
    Case(
        C,
        "learning rate NaN",
        lambda t: train(t, tree(t), "--set", "train.optimizer.lr=.nan"),
        ("train.optimizer.lr", "finite number"),
    ),
    Case(
        C,
        "temperature 0",
        lambda t: distill(t, teacher_checkpoint(t), "-T", "0"),
        ("distill.methods.kd.temperature", "greater than 0"),
    ),
    Case(
        C,
        "temperature infinite",
        lambda t: distill(t, teacher_checkpoint(t), "--set", "distill.methods.kd.temperature=.inf"),
        ("distill.methods.kd.temperature", "finite number"),
    ),
    Case(
        C,
        "temperature 1000",
        lambda t: distill(t, teacher_checkpoint(t), "-T", "1000"),
        ("distill.methods.kd.temperature", "less than or equal to 100"),
    ),
    Case(
        C,
        "alpha 1.5",
        lambda t: distill(t, teacher_checkpoint(t), "--alpha", "1.5"),
        ("distill.alpha", "less than or equal to 1"),
    ),
    Case(
        C,
        "every loss weight 0 (alpha 0, ce_weight 0)",
        lambda t: distill(t, teacher_checkpoint(t), "--alpha", "0", "--set", "distill.ce_weight=0"),
        ("distill.alpha", "nothing would be learned"),
    ),
    Case(
        C,
        "teacher.checkpoint and teacher.checkpoints both set",
        lambda t: distill(t, teacher_checkpoint(t), "--set", f"teacher.checkpoints=[{teacher_checkpoint(t)}]"),
        ("teacher.checkpoints", "not both"),
    ),
    Case(
        C,
        "teacher weights without matching teachers",
        lambda t: distill(t, teacher_checkpoint(t), "--teacher-weights", "1", "2"),
        ("teacher.weights", "2 weights for 0 teacher checkpoints"),
    ),
    Case(C, "unknown model", lambda t: train(t, tree(t), "--model", "resnet9000"), ("resnet9000", "expected one of")),
    Case(
        C,
        "unknown method",
        lambda t: distill(t, teacher_checkpoint(t), "--method", "nope"),
        ("nope", "expected one of"),
    ),
    Case(
        C,
        "unknown method option",
        lambda t: distill(t, teacher_checkpoint(t), "--set", "distill.methods.kd.temp=3"),
        ("distill.methods.kd.temp", "unknown key"),
    ),
    Case(
        C,
        "device name that does not exist",
        lambda t: train(t, tree(t), "--device", "gpu"),
        ("device", "expected auto, cpu, cuda"),
    ),
    Case(C, "CUDA device index that does not exist", lambda t: train(t, tree(t), "--device", "cuda:99"), ("cuda:99",)),
    Case(
        C,
        "config file not found",
        lambda t: train(t, tree(t), "--config", str(t / "nope.yaml")),
        ("nope.yaml", "not found"),
    ),
    Case(
        C,
        "--set without '='",
        lambda t: train(t, tree(t), "--set", "train.epochs"),
        ("train.epochs", "expected KEY=VALUE"),
    ),
    Case(
        C,
        "budget too small for one training step and the evaluation",
        lambda t: train(t, tree(t), "--budget", "30s"),
        ("--budget 30.0 s", "cannot hold one training step", "give --budget"),
        patch=slow_steps,
    ),
    Case(C, "--set below a value", lambda t: train(t, tree(t), "--set", "seed.x=1"), ("seed", "is not a section")),
    # run directory and disk
    Case(
        R,
        "output directory below a regular file",
        lambda t: train(t, tree(t), "--output-dir", str(write_tree(t, {"file": b""}) / "file" / "runs")),
        ("cannot create run directory", "Not a directory"),
    ),
    Case(
        R,
        "run directory exists, no --resume",
        lambda t: train(write_tree(t, {"runs/x/config.yaml": b"name: x\n"}), tree(t)),
        ("already exists", "--resume"),
    ),
    Case(R, "run directory in use by another run", locked_run_dir, ("is in use by kdistill pid 4242",)),
    Case(
        R,
        "distill --resume into a train run",
        resume_other_kind,
        ("cannot resume", "made by kdistill train, not by kdistill distill"),
    ),
    Case(
        R,
        "--resume with other distillation settings",
        resume_other_settings,
        ("cannot resume", "distill.alpha changed from 0.5 to 0.1", "another --name"),
    ),
    Case(R, "--resume with an unreadable run.json", unreadable_run_record, ("run.json is unreadable",)),
    Case(
        R,
        "disk full while writing a checkpoint",
        lambda t: train(t, tree(t), "--epochs", "2"),
        ("checkpoint.pt", "No space left on device", "previous one is intact"),
        patch=lambda mp: fail_writes(mp, errno.ENOSPC),
        check=epoch_one_kept,
    ),
    Case(
        R,
        "read-only file system at a checkpoint",
        lambda t: train(t, tree(t), "--epochs", "2"),
        ("checkpoint.pt", "Read-only file system", "previous one is intact"),
        patch=lambda mp: fail_writes(mp, errno.EROFS),
        check=epoch_one_kept,
    ),
    Case(
        R,
        "disk full while writing metrics",
        lambda t: train(t, tree(t)),
        ("metrics.jsonl", "No space left on device"),
        patch=fail_metrics,
    ),
]


def table() -> str:
    """Markdown table: every bad input and the error line it produced."""
    import tempfile

    from kdistill.cli import main

    rows = ["| group | bad input | exit | error |", "| --- | --- | ---: | --- |"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
            tmp = Path(d)
            argv = case.build(tmp)
            if case.patch:
                case.patch(mp)
            err = io.StringIO()
            mp.setattr("sys.stderr", err)
            code = main(argv)
            line = err.getvalue().strip().splitlines()[-1].replace(d, "<tmp>").replace("|", "\\|")
            rows.append(f"| {case.group} | {case.what} | {code} | `{line}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
