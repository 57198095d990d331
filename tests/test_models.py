"""Every registered model honours the KDModel interface; the CIFAR zoo has the published sizes."""

from __future__ import annotations

import pytest
import torch

from kdistill.models import MODELS, count_parameters, create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")  # see tests/conftest.py


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_interface(name: str, num_classes: int) -> None:
    model = create_model(name, num_classes=num_classes)
    x = torch.randn(2, 3, 32, 32)

    # Eval mode for the equalities: the same BN statistics on every call.
    model.eval()
    with torch.no_grad():
        logits = model(x)
        out = model.forward_all(x)
    assert logits.shape == (2, num_classes)
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)

    assert out.features, "a KDModel must expose at least one stage"
    sides = []
    for f in out.features:
        assert f.dim() == 4 and f.shape[0] == 2, f.shape  # (B, C, H, W)
        sides.append(f.shape[-1])
    assert sides == sorted(sides, reverse=True), f"spatial size grows with depth: {sides}"

    assert out.pre_logits.dim() == 2 and out.pre_logits.shape[0] == 2  # (B, D)
    with torch.no_grad():
        torch.testing.assert_close(model.classifier(out.pre_logits), logits)
        torch.testing.assert_close(model.forward_head(out.features[-1]).logits, logits)

    # Training mode for the backward pass (BN on batch statistics), through every output.
    model.train()
    out = model.forward_all(x)
    loss = out.logits.square().mean() + sum(f.mean() for f in out.features)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# Measured for num_classes=100. References: the parameter counts of the CRD repository's
# models (HobbitLong/RepDistiller) as tabulated for CIFAR-100 in CRD / DKD, in millions:
# resnet20 0.28, resnet32 0.47, resnet56 0.86, resnet110 1.74, resnet8x4 1.23,
# resnet32x4 7.43, wrn_16_2 0.70, wrn_40_2 2.26, vgg8 3.96, vgg13 9.46,
# MobileNetV2 (mobile_half) 0.81, ShuffleNetV2 1.36. All below are within 1% of those.
# The seed pair is ours: 2,122,186 and 268,650 parameters for 10 classes; so is airnet (the
# airbench layout at widths 16, 64, 64: 127,106 for 10 classes).
PARAMS_100 = {
    "airnet": 132_956,
    "seed_teacher": 2_168_356,
    "seed_student": 280_260,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_2": 703_284,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflenetv2": 1_355_528,
}


def test_every_model_has_an_expected_size() -> None:
    assert set(PARAMS_100) == set(MODELS)


@pytest.mark.parametrize("name", sorted(PARAMS_100))
def test_parameter_count(name: str) -> None:
    assert count_parameters(create_model(name, num_classes=100)) == PARAMS_100[name]


def test_seed_pair_sizes_for_ten_classes() -> None:
    assert count_parameters(create_model("seed_teacher")) == 2_122_186
    assert count_parameters(create_model("seed_student")) == 268_650


def test_seed_pair_with_batch_norm_normalises_each_convolution() -> None:
    """batch_norm=True: bias-free convolutions, each followed by a batch norm (2 parameters per
    channel in place of the bias's 1), the same weights otherwise; training mode normalises."""
    plain, normed = create_model("seed_student"), create_model("seed_student", batch_norm=True)
    assert count_parameters(normed) == count_parameters(plain) + 16 + 32
    assert [type(m).__name__ for m in normed.stage1] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert normed.stage1[0].bias is None
    normed.train()
    x = torch.randn(8, 3, 32, 32) * 5 + 3
    pre = normed.stage1[1](normed.stage1[0](x))  # (8, 16, 32, 32), normalised per channel
    assert torch.allclose(pre.mean(dim=(0, 2, 3)), torch.zeros(16), atol=1e-4)
    assert normed(x).shape == (8, 10)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        create_model("nope")
    for name in MODELS:
        assert name in str(info.value)
