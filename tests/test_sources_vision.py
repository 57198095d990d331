"""torchvision and timm models as teachers and students (run where both are installed:
``pytest -m vision`` in the environment CI gives them). Weights are made here and placed
where the libraries look for them; no test reaches the network (a download attempt fails
offline, and that failure is tested as one line)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # read once, when huggingface_hub (timm's hub) is first imported

import pytest
import torch
from PIL import Image

from kdistill.checkpoint import load_checkpoint, load_model
from kdistill.cli import main
from kdistill.errors import ConfigError
from kdistill.models import build, create_model, forward_all

pytestmark = pytest.mark.vision

K = 2


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "timm:test_resnet"])
def test_library_models_build_for_the_datas_classes(name: str) -> None:
    model = create_model(name, num_classes=K).eval()
    with torch.no_grad():
        assert forward_all(model, torch.randn(2, 3, 32, 32)).logits.shape == (2, K)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("torchvision:resnet181", "torchvision has no model 'resnet181'; did you mean resnet18"),
        ("timm:resnet1", "timm has no model 'resnet1'; did you mean resnet18"),
    ],
)
def test_unknown_names_suggest_close_ones(name: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        create_model(name)


def test_torchvision_pretrained_reads_the_hub_cache_and_gets_a_new_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ImageNet weights from torch hub's cache (made here): the backbone is theirs, the
    1,000-class head is replaced by one for the data's classes."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet.state_dict(), tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    model, record = build("torchvision:resnet18", K, {}, pretrained=True)
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert model.fc.out_features == K and record["new_head"] is True
    assert build("torchvision:resnet18", 1000, {}, pretrained=True)[1]["new_head"] is False


def test_torchvision_pretrained_offline_without_cache_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        create_model("torchvision:resnet18", num_classes=K, pretrained=True)
    assert "its weights are neither cached nor downloadable" in str(info.value) and "\n" not in str(info.value)


def test_timm_pretrained_offline_without_cache_is_one_line() -> None:
    with pytest.raises(ConfigError, match="its weights are neither cached nor downloadable"):
        create_model("timm:test_resnet", num_classes=K, pretrained=True)


def test_timm_pretrained_from_a_local_file_through_kwargs(tmp_path: Path) -> None:
    """timm's own way to name a local weights file (pretrained_cfg_overlay), given as kwargs."""
    source = create_model("timm:test_resnet", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model, record = build("timm:test_resnet", K, {"pretrained_cfg_overlay": {"file": str(tmp_path / "w.pth")}}, True)
    assert record["new_head"] is True
    first = next(iter(source.state_dict()))  # the stem's weights: loaded from the file
    assert torch.equal(model.state_dict()[first], source.state_dict()[first])
    assert model.get_classifier().out_features == K


def test_weights_file_into_a_torchvision_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = create_model("torchvision:resnet18", num_classes=K)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    model, record = build("torchvision:resnet18", K, {}, weights=tmp_path / "w.pt")
    assert torch.equal(model.fc.weight, trained.fc.weight) and len(record["weights_sha256"]) == 64
    with pytest.raises(ConfigError, match=r"fc.weight \(2, 512\) vs \(3, 512\)"):
        create_model("torchvision:resnet18", num_classes=3, weights=tmp_path / "w.pt")


def test_timm_input_config_is_reported() -> None:
    from kdistill.models import source_of

    model = create_model("timm:test_resnet", num_classes=K)
    info = source_of("timm:test_resnet").input_config(model)
    assert len(info["input_size"]) == 3 and len(info["mean"]) == 3


# ---------------------------------------------------------------- the command line end to end

TREE = {
    f"{split}/{c}/{i}.png": (c, i) for split, n in (("train", 4), ("test", 2)) for c in ("ant", "bee") for i in range(n)
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for name, (kind, i) in TREE.items():
        buf = io.BytesIO()
        colour = (200 - 10 * i, 10, 10) if kind == "ant" else (10, 200 - 10 * i, 10)
        Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(buf.getvalue())
    return root


def _args(command: str, tree: Path, out: Path, *extra: str) -> list[str]:
    return [command, "--data", str(tree), "--epochs", "1", "--device", "cpu", "--output-dir", str(out)] + [
        "--set",
        "train.batch_size=4",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:test_resnet"])
def test_library_model_trains_resumes_evaluates_exports_and_is_distilled_into(
    tree: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "runs"
    assert main(_args("train", tree, out, "--model", name, "--name", "t")) == 0
    ckpt = out / "t" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["model_spec"]["name"] == name
    assert main(_args("train", tree, out, "--model", name, "--name", "t", "--resume")) == 0
    model, _ = load_model(ckpt)  # from the checkpoint alone
    assert model.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, K)
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--device", "cpu", "--json"]) == 0
    assert sum(map(sum, json.loads(capsys.readouterr().out)["test"]["confusion"])) == 4
    assert main(["export", str(ckpt), "--format", "onnx", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["onnx"]["top1_agreement"] == 100.0
    assert main(_args("distill", tree, out, "--teacher", str(ckpt), "--student", name, "--name", "s")) == 0
    assert load_checkpoint(out / "s" / "checkpoint.pt")["model_spec"]["name"] == name
