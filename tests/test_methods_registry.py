"""Every registered method through the public path: names from configs, the Python API,
checkpoints that carry the method's own state, and combinations of methods."""

import dataclasses

import pytest
import torch

import kdistill
from kdistill.checkpoint import load_checkpoint
from kdistill.config import validate_config
from kdistill.errors import ConfigError


@pytest.fixture(scope="module")
def small(mini):
    idx = torch.arange(0, len(mini.train_labels), 10)  # 500 images, every class
    tidx = torch.arange(0, len(mini.test_labels), 5)
    return dataclasses.replace(
        mini,
        train_images=mini.train_images[idx],
        train_labels=mini.train_labels[idx],
        test_images=mini.test_images[tidx],
        test_labels=mini.test_labels[tidx],
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(kdistill.METHODS))
def test_every_method_distills_and_checkpoints(name, small, tmp_path):
    torch.manual_seed(0)
    teacher, student = kdistill.create_model("seed_teacher"), kdistill.create_model("seed_student")
    r = kdistill.distill(
        teacher, student, small, methods=name, epochs=1, batch_size=50, device="cpu", run_dir=tmp_path, grad_clip=5.0
    )
    assert r.history[0]["train_loss"] == r.history[0]["train_loss"]  # finite, not NaN
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    own = {k for k in state["task_state"] if k.startswith("methods.")}
    method = kdistill.METHODS[name]
    expected = {f"methods.{name}.{k}" for k in method(method.Options(), _context(teacher, student, small)).state_dict()}
    assert own == expected  # the method's parameters and buffers travel with the checkpoint
    assert not any(k.startswith("teacher") for k in state["task_state"])


def _context(teacher, student, ds):
    from kdistill.methods.base import MethodContext
    from kdistill.models.base import feature_shapes

    return MethodContext(
        feature_shapes(student, ds.image_shape), feature_shapes(teacher, ds.image_shape), 10, len(ds.train_labels), 1
    )


@pytest.mark.slow
def test_combined_methods_have_separate_weights(small):
    torch.manual_seed(0)
    teacher, student = kdistill.create_model("seed_teacher"), kdistill.create_model("seed_student")
    r = kdistill.distill(
        teacher,
        student,
        small,
        methods={"crd": {"weight": 0.8}, "kd": {"weight": 1.0}},
        alpha=1.0,
        ce_weight=1.0,
        epochs=1,
        batch_size=50,
        device="cpu",
    )
    assert {"train_ce", "train_kd", "train_crd"} <= set(r.history[0])


def test_config_names_methods_and_rejects_unknown_ones():
    cfg = validate_config({"distill": {"methods": {"crd": {"weight": 0.8}, "kd": {"temperature": 4}}}})
    assert list(cfg.distill.methods) == ["crd", "kd"]
    with pytest.raises(ConfigError, match="unknown method 'nope'.*kd"):
        validate_config({"distill": {"methods": {"nope": {}}}})
    with pytest.raises(ConfigError, match=r"distill\.methods\.dkd\.beta"):
        validate_config({"distill": {"methods": {"dkd": {"beta": -1}}}})
