"""Model sources without torchvision or timm: TorchScript and ONNX files, a user's factory,
a Hugging Face model from a local folder (saved here by ``save_pretrained``; never the
network). Each builds, trains as teacher and as student (ONNX: teacher only), checkpoints,
resumes, evaluates and exports from the command line; every bad input is one line.

torchvision and timm are tested in test_sources_vision.py (their own environment)."""

from __future__ import annotations

import io
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import kdistill
from kdistill.checkpoint import load_checkpoint, load_model
from kdistill.cli import main
from kdistill.config import RunConfig, load_config
from kdistill.errors import CheckpointError, ConfigError
from kdistill.models import build, create_model

# huggingface_hub reads these once, when it is first imported: no test may reach the network
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

K = 2  # classes of the tiny tree

FACTORY = """
import torch
from torch import nn


def make(num_classes=10, width=4):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


def broken(num_classes=10):
    raise ValueError("width must be even")


def not_a_module(num_classes=10):
    return 3


class Maps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv(x)


def maps(num_classes=10):
    return Maps()
"""


def tiny(num_classes: int = K) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A TorchScript file, ONNX files (dynamic batch at 32 px; fixed 1x3x16x16), a user's
    module of factories, a Hugging Face folder and a state dict of the factory's model."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    torch.jit.script(tiny()).save(str(root / "tiny.pt"))
    for name, shape, axes in (("tiny.onnx", (1, 3, 32, 32), {"x": {0: "b"}}), ("fixed.onnx", (1, 3, 16, 16), None)):
        torch.onnx.export(
            tiny().eval(), (torch.zeros(shape),), str(root / name), dynamo=False, input_names=["x"], dynamic_axes=axes
        )
    (root / "usermodels_for_kd.py").write_text(textwrap.dedent(FACTORY))
    (root / "usermodels_that_fail.py").write_text('raise RuntimeError("no GPU found")\n')
    import transformers  # after HF_HUB_OFFLINE is set

    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=K
    )
    transformers.ResNetForImageClassification(config).save_pretrained(root / "hf-resnet")
    return {"root": root}


@pytest.fixture
def in_root(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch):
    """The user's folder is the working folder: factories import from it, file sources are relative to it."""
    monkeypatch.chdir(files["root"])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(files["root"]))])
    yield files["root"]
    sys.modules.pop("usermodels_for_kd", None)
    sys.modules.pop("usermodels_that_fail", None)


SOURCES = ["torchscript:tiny.pt", "onnx:tiny.onnx", "usermodels_for_kd:make", "hf:hf-resnet"]


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_builds_a_classifier(in_root: Path, name: str) -> None:
    model = create_model(name, num_classes=K)
    with torch.no_grad():
        logits = kdistill.models.forward_all(model.eval(), torch.randn(3, 3, 32, 32)).logits
    assert logits.shape == (3, K)


def test_onnx_teacher_has_no_trainable_parameters_and_its_file_is_its_identity(in_root: Path) -> None:
    from kdistill.teacher_cache import weights_digest

    model = create_model("onnx:tiny.onnx", num_classes=K)
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, K)
    # two ONNX files are two teachers to a teacher cache, though neither has weights in torch
    assert weights_digest(model) != weights_digest(create_model("onnx:fixed.onnx", num_classes=K))
    assert weights_digest(model.half()) == weights_digest(create_model("onnx:tiny.onnx", num_classes=K).half())


def test_factory_gets_num_classes_and_kwargs(in_root: Path) -> None:
    model = create_model("usermodels_for_kd:make", num_classes=5, width=6)
    assert model[0].out_channels == 6 and model[-1].out_features == 5


def test_hf_pretrained_loads_the_folders_weights_and_a_new_head(in_root: Path) -> None:
    saved = create_model("hf:hf-resnet", num_classes=K, pretrained=True).state_dict()
    again = create_model("hf:hf-resnet", num_classes=K, pretrained=True).state_dict()
    assert all(torch.equal(saved[k], again[k]) for k in saved)  # the folder's weights, not a random init
    three, record = build("hf:hf-resnet", 3, {}, pretrained=True)
    assert three(torch.zeros(1, 3, 32, 32)).shape == (1, 3) and record["new_head"] is True
    assert build("hf:hf-resnet", K, {}, pretrained=True)[1]["new_head"] is False


def test_weights_file_loads_a_state_dict(in_root: Path, tmp_path: Path) -> None:
    source = create_model("usermodels_for_kd:make", num_classes=K)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model, record = build("usermodels_for_kd:make", K, {}, weights=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    assert record["weights_file"] == str((tmp_path / "w.pt").resolve()) and len(record["weights_sha256"]) == 64
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    again = create_model("usermodels_for_kd:make", num_classes=K, weights=tmp_path / "w.safetensors")
    assert torch.equal(again[-1].weight, source[-1].weight)
    torch.save({"format": "kdistill-checkpoint/1", "model": source.state_dict()}, tmp_path / "checkpoint.pt")
    from_checkpoint = create_model("usermodels_for_kd:make", num_classes=K, weights=tmp_path / "checkpoint.pt")
    assert torch.equal(from_checkpoint[-1].weight, source[-1].weight)  # a kdistill checkpoint's model weights


def test_weights_file_that_does_not_fit_is_one_line(in_root: Path, tmp_path: Path) -> None:
    torch.save(tiny(num_classes=7).state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError) as info:
        create_model("usermodels_for_kd:make", num_classes=K, weights=tmp_path / "w.pt")
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "w.pt") in msg and "4.weight (7, 4) vs (2, 4)" in msg


def test_weights_file_with_code_in_it_is_refused(in_root: Path, tmp_path: Path) -> None:
    torch.save({"a": torch.zeros(1), "b": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="not a state dict readable safely"):
        create_model("usermodels_for_kd:make", num_classes=K, weights=tmp_path / "evil.pt")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "nonsense-prefix:x",
            "unknown prefix 'nonsense-prefix'; expected one of torchvision, timm, hf, torchscript, onnx",
        ),
        (
            "tim:resnet18",
            "'tim' is neither a known prefix (torchvision, timm, hf, torchscript, onnx) nor an importable",
        ),
        ("usermodels_for_kd:broken", "factory usermodels_for_kd:broken raised ValueError: width must be even"),
        (
            "usermodels_for_kd:not_a_module",
            "factory usermodels_for_kd:not_a_module returned int, not a torch.nn.Module",
        ),
        ("usermodels_for_kd:nope", "module usermodels_for_kd has no function 'nope'"),
        ("usermodels_that_fail:make", "importing usermodels_that_fail raised RuntimeError: no GPU found"),
        ("torchscript:missing.pt", "model 'torchscript:missing.pt': file missing.pt does not exist"),
        ("torchscript:usermodels_for_kd.py", "is not a TorchScript archive"),
        ("hf:no-such-folder", "transformers cannot load 'no-such-folder' as an image classifier"),
        ("seed_studnet", "unknown model 'seed_studnet'; expected one of:"),
        ("onnx:", "nothing after 'onnx:'"),
    ],
)
def test_bad_sources_are_one_line(in_root: Path, name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_model(name, num_classes=K)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_missing_library_names_the_extra(in_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ConfigError, match=r"model 'timm:resnet18' needs timm .*pip install 'kdistill\[timm\]'"):
        create_model("timm:resnet18")
    with pytest.raises(ConfigError, match=r"pip install 'kdistill\[onnx\]'"):
        create_model("onnx:tiny.onnx")


def test_onnx_model_with_another_input_shape_is_one_line(in_root: Path) -> None:
    model = create_model("onnx:fixed.onnx", num_classes=K)
    with pytest.raises(ConfigError, match=r"expects input of shape \(1, 3, 16, 16\) but gets \(2, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 32, 32))


def test_output_that_is_not_logits_is_one_line(in_root: Path) -> None:
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % K
    with pytest.raises(
        ConfigError, match=r"'usermodels_for_kd:maps' gives \(2, 2, 8, 8\); expected \(batch, classes\)"
    ):
        kdistill.train(create_model("usermodels_for_kd:maps"), (x, y), epochs=1, device="cpu")


def test_teacher_and_student_of_other_class_counts_is_one_line(in_root: Path) -> None:
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % K
    teacher, student = create_model("usermodels_for_kd:make", num_classes=3), tiny()
    with pytest.raises(ConfigError, match="predicts 3 classes but student 'Sequential' 2"):
        kdistill.distill(teacher, student, (x, y), epochs=1, device="cpu")


def test_config_takes_sources_and_refuses_onnx_where_it_would_train() -> None:
    cfg = RunConfig.model_validate(
        {"teacher": {"name": "onnx:t.onnx", "trained": True}, "student": {"name": "timm:resnet18", "pretrained": True}}
    )
    assert cfg.student.pretrained and cfg.teacher.trained
    with pytest.raises(Exception, match="cannot be trained; set teacher.trained: true"):
        RunConfig.model_validate({"teacher": {"name": "onnx:t.onnx"}})
    with pytest.raises(Exception, match="runs in onnxruntime without gradients and cannot be a student"):
        RunConfig.model_validate({"student": {"name": "onnx:t.onnx"}})
    with pytest.raises(Exception, match="unknown prefix 'x-y'"):
        RunConfig.model_validate({"student": {"name": "x-y:z"}})
    with pytest.raises(Exception, match="pretrained: kdistill's zoo .'seed_student'. has no pretrained weights"):
        RunConfig.model_validate({"student": {"name": "seed_student", "pretrained": True}})
    with pytest.raises(Exception, match="cannot be trained by mutual learning"):
        RunConfig.model_validate({"mutual": {"models": ["seed_student", "onnx:t.onnx"]}})


def test_checkpoint_of_an_hf_model_rebuilds_without_its_folder(in_root: Path, tmp_path: Path) -> None:
    """The Hugging Face config travels in the checkpoint: the folder may be gone."""
    import shutil

    shutil.copytree(in_root / "hf-resnet", tmp_path / "hf")
    from kdistill import runs

    spec = runs.model_spec(f"hf:{tmp_path / 'hf'}", {}, K, pretrained=True)
    model = runs.new_model(spec, 0)
    assert "hf_config" in spec["source"] and spec["source"]["pretrained"] is True
    from kdistill.checkpoint import save_checkpoint

    save_checkpoint({"model_spec": spec, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    shutil.rmtree(tmp_path / "hf")
    rebuilt, _ = load_model(tmp_path / "checkpoint.pt")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(rebuilt.eval()(x), model.eval()(x))


def test_checkpoint_of_a_torchscript_model_whose_file_is_gone_is_one_line(in_root: Path, tmp_path: Path) -> None:
    from kdistill import runs
    from kdistill.checkpoint import save_checkpoint

    (tmp_path / "m.pt").write_bytes((in_root / "tiny.pt").read_bytes())
    spec = runs.model_spec(f"torchscript:{tmp_path / 'm.pt'}", {}, K)
    model = runs.new_model(spec, 0)
    assert len(spec["source"]["sha256"]) == 64
    save_checkpoint({"model_spec": spec, "model": model.state_dict()}, tmp_path / "checkpoint.pt")
    assert load_model(tmp_path / "checkpoint.pt")[0] is not None
    (tmp_path / "m.pt").unlink()
    with pytest.raises(CheckpointError, match=r"the file the checkpoint was made from .*m\.pt does not exist"):
        load_model(tmp_path / "checkpoint.pt")


# ---------------------------------------------------------------- the command line end to end

TREE = {
    f"{split}/{c}/{i}.png": (c, i) for split, n in (("train", 6), ("test", 3)) for c in ("ant", "bee") for i in range(n)
}


def _png(kind: str, i: int) -> bytes:
    buf = io.BytesIO()
    colour = (200 - 10 * i, 10, 10) if kind == "ant" else (10, 200 - 10 * i, 10)
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name, (kind, i) in TREE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(kind, i))
    return root


def _args(command: str, tree: Path, out: Path, *extra: str) -> list[str]:
    return [command, "--data", str(tree), "--epochs", "1", "--device", "cpu", "--output-dir", str(out)] + [
        "--set",
        "train.batch_size=4",
        *extra,
    ]


def _one_line_error(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kdistill: error:") and not any("Traceback" in line for line in err), err
    return err[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchscript:tiny.pt", "usermodels_for_kd:make", "hf:hf-resnet"])
def test_source_trains_resumes_evaluates_exports_and_is_distilled_into(
    in_root: Path, tree: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "runs"
    # as a teacher: trained, resumed when finished, evaluated and exported from its checkpoint alone
    assert main(_args("train", tree, out, "--model", name, "--name", "t")) == 0
    ckpt = out / "t" / "checkpoint.pt"
    spec = load_checkpoint(ckpt)["model_spec"]
    assert spec["name"] == name and spec["kwargs"]["num_classes"] == K
    assert main(_args("train", tree, out, "--model", name, "--name", "t", "--resume")) == 0
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--device", "cpu", "--json"]) == 0
    assert sum(map(sum, json.loads(capsys.readouterr().out)["test"]["confusion"])) == 6  # every test image
    assert main(["export", str(ckpt), "--format", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["onnx"]["top1_agreement"] == 100.0
    # as a student, distilled from the teacher's checkpoint
    assert main(_args("distill", tree, out, "--teacher", str(ckpt), "--student", name, "--name", "s")) == 0
    assert load_checkpoint(out / "s" / "checkpoint.pt")["model_spec"]["name"] == name


@pytest.mark.slow
def test_onnx_teacher_distills_and_caches(in_root: Path, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    teacher = "onnx:tiny.onnx"
    assert main(_args("distill", tree, out, "--teacher", teacher, "--student", "seed_student", "--name", "d")) == 0
    state = load_checkpoint(out / "d" / "checkpoint.pt")
    assert state["teacher_spec"]["name"] == teacher and len(state["teacher_spec"]["source"]["sha256"]) == 64
    assert (
        main(_args("distill", tree, out, "--teacher", teacher, "--student", "seed_student", "--name", "d", "--resume"))
        == 0
    )
    cache = tmp_path / "t.cache"
    argv = ["cache-teacher", "--data", str(tree), "--epochs", "1", "--device", "cpu", "--set", "train.batch_size=4"]
    assert main([*argv, "--teacher", teacher, "--out", str(cache)]) == 0
    args = _args("distill", tree, out, "--teacher", teacher, "--teacher-cache", str(cache), "--name", "c")
    assert main(args) == 0


@pytest.mark.slow
def test_run_with_a_trained_source_teacher_from_a_config(in_root: Path, tree: Path, tmp_path: Path) -> None:
    """A study with a trained TorchScript teacher used as it is: no teacher phase."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "teacher: {name: 'torchscript:tiny.pt', trained: true}\nstudent: {name: 'usermodels_for_kd:make', kwargs: {width: 3}}\ndeploy: {onnx: false}\n"
    )
    assert load_config(config).student.kwargs == {"width": 3}
    assert main(_args("run", tree, tmp_path / "runs", "--config", str(config), "--name", "r")) == 0
    run = tmp_path / "runs" / "r"
    assert not (run / "teacher" / "checkpoint.pt").exists() and (run / "distilled" / "checkpoint.pt").is_file()
    assert json.loads((run / "summary.json").read_text())["models"]["teacher"]["model"] == "torchscript:tiny.pt"
    assert main(["report", str(run)]) == 0 and "torchscript:tiny.pt" in (run / "report.md").read_text()


@pytest.mark.slow
def test_sweep_and_mutual_take_sources(in_root: Path, tree: Path, tmp_path: Path) -> None:
    """A sweep of source students from an ONNX teacher; deep mutual learning of two sources."""
    argv = ["--students", "usermodels_for_kd:make", "torchscript:tiny.pt", "--methods", "kd", "--temperatures", "4"]
    assert main(_args("sweep", tree, tmp_path, "--teacher", "onnx:tiny.onnx", *argv, "--name", "s")) == 0
    board = (tmp_path / "s" / "leaderboard.csv").read_text()
    assert "usermodels_for_kd:make" in board and "torchscript:tiny.pt" in board
    assert (
        tmp_path / "s" / "torchscript_tiny.pt-kd-T4-a0.5" / "checkpoint.pt"
    ).is_file()  # a folder name without ':' or '/'
    models = ["usermodels_for_kd:make", "hf:hf-resnet"]
    assert main(_args("mutual", tree, tmp_path, "--models", *models, "--name", "m")) == 0
    assert load_checkpoint(tmp_path / "m" / "checkpoint.pt")["model_spec"]["name"] == "usermodels_for_kd:make"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "tim:resnet18"], "'tim' is neither a known prefix"),
        (["--model", "usermodels_for_kd:broken"], "factory usermodels_for_kd:broken raised ValueError"),
        (["--model", "onnx:tiny.onnx"], "runs in onnxruntime and cannot be trained"),
        (
            ["--model", "usermodels_for_kd:make", "--set", "teacher.weights_file=nope.pt"],
            "weights file nope.pt does not exist",
        ),
    ],
)
def test_cli_bad_model_is_one_line(
    in_root: Path, tree: Path, tmp_path: Path, argv: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(_args("train", tree, tmp_path / "runs", *argv)) != 0
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_run_identity_holds_the_source_options(tmp_path: Path) -> None:
    """A resume with another weights file, pretrained flag or trained teacher is another run."""
    from kdistill.runs import run_identity

    cfg = RunConfig.model_validate(
        {
            "teacher": {"name": "torchscript:t.pt", "trained": True, "weights_file": str(tmp_path / "w.pt")},
            "student": {"name": "timm:resnet18", "pretrained": True},
        }
    )
    identity = run_identity(cfg, "run")
    assert identity["teacher.trained"] is True and identity["student.pretrained"] is True
    assert identity["teacher.weights_file"] == str((tmp_path / "w.pt").resolve())
    assert "student.pretrained" not in run_identity(RunConfig(), "run")  # runs from before sources read the same


def test_models_command_names_the_sources(capsys: pytest.CaptureFixture) -> None:
    assert main(["models"]) == 0
    assert "timm:<name>" in capsys.readouterr().out


def test_trained_teacher_pretrained_for_other_classes_is_refused(
    in_root: Path, tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A model pretrained for 3 classes, used as it is on 2: its new head would be random."""
    import transformers

    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "three")
    argv = _args("distill", tree, tmp_path / "runs", "--teacher", f"hf:{tmp_path / 'three'}", "--name", "d")
    assert main(argv) != 0
    assert "was pretrained for other classes than the data's 2: its new head is untrained" in _one_line_error(capsys)


@pytest.mark.slow
def test_hf_folder_as_a_trained_teacher_uses_its_weights(in_root: Path, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    assert (
        main(_args("distill", tree, out, "--teacher", "hf:hf-resnet", "--student", "seed_student", "--name", "d")) == 0
    )
    spec = load_checkpoint(out / "d" / "checkpoint.pt")["teacher_spec"]
    assert spec["source"]["pretrained"] is True and spec["source"]["new_head"] is False
