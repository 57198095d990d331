"""What a command that takes a checkpoint says when it is handed something else: a run
directory or phase folder (the checkpoints it holds), an exported ONNX or TorchScript model,
a text file, an unsafe pickle. It names the file, says what it is and what was expected,
and never suggests turning off the safe loading (``weights_only``)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from kdistill.checkpoint import load_checkpoint, load_model, save_checkpoint
from kdistill.errors import CheckpointError

EXPECTED = "expected a checkpoint.pt written by kdistill train, run or distill"


def _message(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    with pytest.raises(CheckpointError) as again:
        load_model(path)
    assert str(again.value) == str(info.value)
    return str(info.value)


def _checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": {"w": torch.zeros(2)}}, path)
    return path


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "quickstart"
    for phase in ("teacher", "baseline", "distilled"):
        _checkpoint(run_dir / phase / "checkpoint.pt")
    (run_dir / "config.yaml").write_text("name: quickstart\n")
    return run_dir


def test_run_directory_lists_its_checkpoints(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    message = _message(run_dir)
    assert message.startswith(f"{run_dir} is a run directory, not a checkpoint; it holds "), message
    for phase in ("teacher", "baseline", "distilled"):
        assert str(run_dir / phase / "checkpoint.pt") in message, message
    assert "does not exist" not in message


def test_phase_folder_names_its_checkpoint(tmp_path: Path) -> None:
    phase = _run_dir(tmp_path) / "teacher"
    message = _message(phase)
    assert f"{phase} is a folder, not a checkpoint" in message, message
    assert message.endswith(str(phase / "checkpoint.pt")), message


def test_parent_of_run_directories_lists_theirs(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path)
    message = _message(run_dir.parent)
    assert (
        f"{run_dir.parent} is a folder, not a checkpoint" in message
        and str(run_dir / "teacher" / "checkpoint.pt") in message
    ), message


def test_many_checkpoints_are_counted_not_all_listed(tmp_path: Path) -> None:
    for i in range(9):
        _checkpoint(tmp_path / f"point{i}" / "checkpoint.pt")
    message = _message(tmp_path)
    assert "point0" in message and "point8" not in message and "and 3 more" in message, message


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = _message(tmp_path / "empty")
    assert "is a folder, not a checkpoint, and holds no checkpoint.pt" in message and EXPECTED in message, message


def _torchscript(path: Path) -> Path:
    torch.jit.script(nn.Linear(2, 2)).save(str(path))
    return path


def test_torchscript_archive_is_named_without_a_warning(tmp_path: Path) -> None:
    path = _torchscript(tmp_path / "model.torchscript.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = _message(path)
    assert message == f"{path} is a TorchScript archive, not a checkpoint; {EXPECTED}", message
    assert not [w for w in caught if "TorchScript" in str(w.message)], [str(w.message) for w in caught]


def test_torchscript_archive_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    """torch.load warns (two lines on stderr) before it refuses a TorchScript archive: the
    user sees only kdistill's line."""
    path = _torchscript(tmp_path / "model.torchscript.pt")
    out = subprocess.run(
        [sys.executable, "-m", "kdistill", "evaluate", str(path)],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"kdistill: error: {path} is a TorchScript archive, not a checkpoint; {EXPECTED}"
    ], out.stderr


# the smallest ONNX model: ir_version 8, producer "pytorch" (what torch.onnx.export writes first)
ONNX_HEAD = b"\x08\x08\x12\x07pytorch\x1a\x062.13.0"


@pytest.mark.parametrize("name", ["model.onnx", "model.bin"])
def test_onnx_model_is_named(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(ONNX_HEAD + bytes(range(256)) * 8)
    message = _message(path)
    assert message == f"{path} is an ONNX model, not a checkpoint; {EXPECTED}", message


def test_real_onnx_model_is_named(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "exported.bin"  # by its content, not its name
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))
    assert "is an ONNX model, not a checkpoint" in _message(path)


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("report.md", b"# Report of quickstart\n\nteacher 80%\n", "a text file (it starts '# Report of quickstart')"),
        ("notes.pt", "caf\u00e9 accuracy: 91%\n".encode(), "a text file (it starts 'caf\u00e9 accuracy: 91%')"),
        ("empty.pt", b"", "an empty file"),
        ("image.pt", b"\x89PNG\r\n\x1a\n" + bytes(100), "a PNG image"),
        ("garbage.pt", b"\x01\x02\x03\x00\xff" * 40, "neither a zip archive nor a pickle"),
    ],
)
def test_file_of_another_kind_is_named(tmp_path: Path, name: str, content: bytes, kind: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    message = _message(path)
    assert message.startswith(f"{path} is {kind}"), message
    assert EXPECTED in message and "weights_only" not in message and "refused" not in message, message


def test_zip_that_is_not_a_pytorch_file(tmp_path: Path) -> None:
    path = tmp_path / "data.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("labels.csv", "a,b\n")
    assert _message(path).startswith(f"{path} is a zip archive that is not a PyTorch file")


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unsafe_pickle_never_suggests_turning_the_safety_off(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": _Evil()}, path)
    message = _message(path)
    assert message.startswith(f"checkpoint {path} refused: it holds objects other than tensors and plain data"), message
    assert "system" in message and EXPECTED in message, message  # what it asked to load
    assert "weights_only" not in message and "trusted" not in message and "safe_globals" not in message, message


def test_pytorch_file_of_another_program_says_what_was_expected(tmp_path: Path) -> None:
    path = tmp_path / "state_dict.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    message = _message(path)
    assert "is a PyTorch file but not a kdistill checkpoint" in message and EXPECTED in message, message
