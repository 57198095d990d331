"""The CIFAR model zoo of the CRD (Tian et al., ICLR 2020) and DKD (Zhao et al., CVPR 2022)
benchmarks: ResNets, Wide ResNets, VGG, MobileNetV2 and ShuffleNetV2 for 32x32 inputs.

The architectures (layer sizes, strides, shortcut types, where the ReLUs sit) follow the
model files of the CRD repository, which DKD's mdistiller reuses, so parameter counts and
the published teacher/student accuracies refer to the same networks. Only the wiring is
ours: every model is a stem, a list of stages and a pooled linear head.

Features (``forward_features``) are the outputs of the stages, shallow to deep, each a
(B, C, H, W) map; the stem's output is not included. Where a network ends in a 1x1
convolution that widens the last stage before pooling (MobileNetV2, ShuffleNetV2), that
convolution is the last stage, so ``forward_head`` is the same for every model: global
average pool -> flatten (the pre-logits) -> ``self.classifier``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.models.base import Head, KDModel


def _init_weights(module: nn.Module) -> None:
    # He-normal with fan_out, as in every CRD model file that sets an init: it keeps the
    # variance of the gradients constant through conv+ReLU stacks. ShuffleNetV2, which CRD
    # leaves at PyTorch's defaults, gets it too. Linear layers keep PyTorch's default.
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    """Conv (no bias: the BN shift replaces it) -> BN [-> ReLU]; 'same' padding."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class StageNet(KDModel):
    """Stem -> stages (their outputs are the features) -> global average pool -> linear."""

    def __init__(self, stem: nn.Module, stages: Sequence[nn.Module], width: int, num_classes: int):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Linear(width, num_classes)
        self.apply(_init_weights)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H_i, W_i)
            features.append(x)
        return features

    def forward_head(self, last: Tensor) -> Head:
        pre = torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)  # (B, C_last)
        return Head(pre, self.classifier(pre))


# --- ResNet (He et al. 2016, CIFAR variant) -------------------------------------------------


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.residual = nn.Sequential(_conv_bn(cin, cout, 3, stride), _conv_bn(cout, cout, 3, relu=False))
        # CRD uses a projection (1x1 conv + BN, "option B") wherever the shape changes,
        # not the zero-padding "option A" of the ResNet paper's CIFAR experiments.
        same_shape = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same_shape else _conv_bn(cin, cout, 1, stride, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class CifarResNet(StageNet):
    """3x3 stem (no max-pool), three stages of (depth - 2) / 6 basic blocks at 32, 16, 8 px.

    ``widths`` = (stem, stage 1, stage 2, stage 3) channels: (16, 16, 32, 64) for the
    classic ResNets, (32, 64, 128, 256) for CRD's 4x-wide resnet8x4 / resnet32x4.
    """

    def __init__(self, depth: int, widths: Sequence[int], num_classes: int = 10):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        stem = _conv_bn(3, widths[0], 3)
        stages = []
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            first_stride = 1 if i == 0 else 2
            stage = [_BasicBlock(cin, cout, first_stride)]
            stage += [_BasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        super().__init__(stem, stages, cin, num_classes)


# --- Wide ResNet (Zagoruyko & Komodakis 2016) -----------------------------------------------


class _WideBlock(nn.Module):
    """Pre-activation block: [BN-ReLU] -> conv3x3 -> BN-ReLU -> dropout -> conv3x3, + shortcut.

    ``activate_input=False`` means the previous stage already ends in this block's leading
    BN-ReLU (see ``WideResNet``). That is only equivalent for a projection block, whose
    shortcut also reads the activated input; an identity block adds its raw input.
    """

    def __init__(self, cin: int, cout: int, stride: int, drop_rate: float, activate_input: bool):
        super().__init__()
        self.identity = stride == 1 and cin == cout
        if self.identity and not activate_input:
            raise ValueError("an identity wide block needs its raw input; it must activate it")
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if activate_input else nn.Identity()
        self.residual = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_rate),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        )
        self.shortcut = None if self.identity else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.pre(x)
        if self.shortcut is None:
            return x + self.residual(act)
        return self.shortcut(act) + self.residual(act)


class WideResNet(StageNet):
    """WRN-depth-widen: 3x3 stem with 16 channels, three groups of (depth - 4) / 6 blocks
    with 16k, 32k, 64k channels at 32, 16, 8 px.

    In the original pre-activation design a group ends with a raw residual sum and the next
    group's first (projection) block opens with BN-ReLU; the last group is followed by a
    final BN-ReLU before pooling. Here that BN-ReLU closes each group instead: the same
    function and parameters, but every feature is post-activation like the other models'.
    """

    def __init__(self, depth: int, widen: int, drop_rate: float = 0.0, num_classes: int = 10):
        if (depth - 4) % 6:
            raise ValueError(f"Wide ResNet depth must be 6n + 4, got {depth}")
        blocks = (depth - 4) // 6
        stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages = []
        cin = 16
        for i, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            stride = 1 if i == 0 else 2
            # Group 1 reads the raw stem output; later groups read an activated stage output.
            stage: list[nn.Module] = [_WideBlock(cin, cout, stride, drop_rate, i == 0)]
            stage += [_WideBlock(cout, cout, 1, drop_rate, True) for _ in range(blocks - 1)]
            stage += [nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        super().__init__(stem, stages, cin, num_classes)


# --- VGG with batch norm (Simonyan & Zisserman 2015, CRD's CIFAR variant) -------------------

# Conv widths of the five blocks; each conv is 3x3 -> BN -> ReLU.
_VGG_BLOCKS: dict[int, list[list[int]]] = {
    8: [[64], [128], [256], [512], [512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class CifarVGG(StageNet):
    """Five conv blocks at 32, 16, 8, 4, 4 px, then global pooling and Linear(512, classes).

    CRD max-pools between blocks 4 and 5 only for 64x64 inputs, so on CIFAR the last two
    blocks share the 4x4 resolution. Its convs keep their biases despite the BN that
    follows; we keep them too so that parameter counts match.
    """

    def __init__(self, depth: int, num_classes: int = 10):
        stages = []
        cin = 3
        for i, widths in enumerate(_VGG_BLOCKS[depth]):
            layers: list[nn.Module] = [nn.MaxPool2d(2)] if i in (1, 2, 3) else []
            for cout in widths:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(True)]
                cin = cout
            stages.append(nn.Sequential(*layers))
        super().__init__(nn.Identity(), stages, cin, num_classes)


# --- MobileNetV2 (Sandler et al. 2018, CRD's CIFAR variant) ---------------------------------


class _InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear: no ReLU), skip when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.skip = stride == 1 and cin == cout
        # CRD keeps the 1x1 expansion even when expand == 1 (torchvision drops it there).
        self.body = nn.Sequential(
            _conv_bn(cin, hidden, 1),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, relu=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.skip else out


# (expansion t, channels c, blocks n, first stride s) per bottleneck sequence, as in the
# paper's table except that the 24-channel sequence keeps stride 1 on 32x32 inputs (the
# stem still has stride 2), so the last sequences run at 2x2 px.
_MOBILENETV2_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# Which bottleneck sequences form each feature stage: CRD reads its features after
# sequences 2, 3, 5 and 7 (at 16, 8, 4, 2 px).
_MOBILENETV2_STAGES = [(0, 1), (2,), (3, 4), (5, 6)]


class CifarMobileNetV2(StageNet):
    """Stride-2 3x3 stem (32 -> 16 px), bottlenecks down to 2x2, 1x1 conv to 1280 channels.

    ``expand`` replaces the expansion factor 6 of the paper's table (CRD's ``T``); channel
    counts are scaled by ``width_mult`` and truncated, as CRD does, except that the final
    1280-channel 1x1 conv (the last stage, see the module doc) only ever grows.
    """

    def __init__(self, width_mult: float = 1.0, expand: int = 6, num_classes: int = 10):
        cin = int(32 * width_mult)
        stem = _conv_bn(3, cin, 3, stride=2)
        sequences = []
        for t, c, n, s in _MOBILENETV2_SETTING:
            cout = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(_InvertedResidual(cin, cout, s if i == 0 else 1, 1 if t == 1 else expand))
                cin = cout
            sequences.append(nn.Sequential(*blocks))
        stages: list[nn.Module] = [nn.Sequential(*(sequences[i] for i in group)) for group in _MOBILENETV2_STAGES]
        last = int(1280 * width_mult) if width_mult > 1.0 else 1280
        stages.append(_conv_bn(cin, last, 1))
        super().__init__(stem, stages, last, num_classes)


# --- ShuffleNetV2 (Ma et al. 2018, CRD's CIFAR variant) -------------------------------------


def _channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    # (B, C, H, W) -> (B, g, C/g, H, W) -> swap the group axes -> (B, C, H, W): interleaves
    # the two branches' channels so that information crosses between them.
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class _ShuffleUnit(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half go through
    1x1-BN-ReLU -> 3x3 depthwise-BN -> 1x1-BN-ReLU; concatenate and shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn(half, half, 1),
            _conv_bn(half, half, 3, groups=half, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        kept, transformed = x.chunk(2, dim=1)  # (B, C/2, H, W) each
        return _channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1))


class _ShuffleDownUnit(nn.Module):
    """Stride-2 unit: both branches see the whole input, each produces cout / 2 channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        self.left = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin, relu=False), _conv_bn(cin, half, 1))
        self.right = nn.Sequential(
            _conv_bn(cin, half, 1),
            _conv_bn(half, half, 3, 2, groups=half, relu=False),
            _conv_bn(half, half, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1))


# net_size -> (stage widths, final 1x1 conv width, stride-1 units per stage), from CRD.
_SHUFFLENETV2_SIZES: dict[float, tuple[tuple[int, int, int], int, tuple[int, int, int]]] = {
    0.5: ((48, 96, 192), 1024, (3, 7, 3)),
    1.0: ((116, 232, 464), 1024, (3, 7, 3)),
    1.5: ((176, 352, 704), 1024, (3, 7, 3)),
    2.0: ((224, 488, 976), 2048, (3, 7, 3)),
}


class CifarShuffleNetV2(StageNet):
    """1x1 stem with 24 channels at full resolution (no stride, no max-pool), three stages
    of one down unit plus stride-1 units at 16, 8, 4 px, then a 1x1 conv as the last stage."""

    def __init__(self, net_size: float = 1.0, num_classes: int = 10):
        widths, last, units = _SHUFFLENETV2_SIZES[net_size]
        stem = _conv_bn(3, 24, 1)
        stages: list[nn.Module] = []
        cin = 24
        for cout, n in zip(widths, units, strict=True):
            stages.append(nn.Sequential(_ShuffleDownUnit(cin, cout), *(_ShuffleUnit(cout) for _ in range(n))))
            cin = cout
        stages.append(_conv_bn(cin, last, 1))
        super().__init__(stem, stages, last, num_classes)


# --- Registry -------------------------------------------------------------------------------
# Parameter counts for 100 classes are in tests/test_models.py.


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, (16, 16, 32, 64), num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, (16, 16, 32, 64), num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, (16, 16, 32, 64), num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, (16, 16, 32, 64), num_classes)


def resnet8x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(8, (32, 64, 128, 256), num_classes)


def resnet32x4(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, (32, 64, 128, 256), num_classes)


def wrn_16_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(16, 2, num_classes=num_classes)


def wrn_40_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(40, 2, num_classes=num_classes)


def vgg8(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(8, num_classes)


def vgg13(num_classes: int = 10) -> CifarVGG:
    return CifarVGG(13, num_classes)


def mobilenetv2(num_classes: int = 10) -> CifarMobileNetV2:
    """CRD's ``mobile_half``: width multiplier 0.5, expansion 6."""
    return CifarMobileNetV2(width_mult=0.5, expand=6, num_classes=num_classes)


def shufflenetv2(num_classes: int = 10) -> CifarShuffleNetV2:
    """CRD's ``ShuffleV2``: net_size 1."""
    return CifarShuffleNetV2(1.0, num_classes)


MODELS: dict[str, Callable[..., KDModel]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet8x4": resnet8x4,
    "resnet32x4": resnet32x4,
    "wrn_16_2": wrn_16_2,
    "wrn_40_2": wrn_40_2,
    "vgg8": vgg8,
    "vgg13": vgg13,
    "mobilenetv2": mobilenetv2,
    "shufflenetv2": shufflenetv2,
}
