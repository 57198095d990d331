"""A small, fast-converging CIFAR network in the style of airbench (Jordan 2024).

airbench's network reaches high accuracy in few epochs because it is shallow, batch-normed
everywhere and pools early: a 2x2 stem convolution, then three blocks of (conv 3x3, max-pool
2, batch norm, GELU, conv 3x3, batch norm, GELU), a global max-pool and a linear layer.
``airnet`` is that layout at widths a 2-core CPU can train in minutes (airbench's own are 64,
256, 256); the training tricks (EMA, flip TTA, label smoothing, the schedule) are kdistill's
general ones (``train.*``), not baked into the model. airbench's whitening initialisation of
the stem and its lookahead optimiser are not reproduced.

Features (``forward_features``) are the three blocks' outputs, (B, C, H, W) at 15, 7 and 3 px
for 32x32 inputs; the head global-max-pools the last one.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.models.base import Head, KDModel


def _conv_bn_gelu(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return [*layers, nn.BatchNorm2d(cout), nn.GELU()]


class AirNet(KDModel):
    """stem conv 2x2 (3 -> 24), three blocks of widths ``widths``, global max-pool, linear."""

    def __init__(self, widths: tuple[int, int, int] = (16, 64, 64), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 2), nn.GELU())  # 32 -> 31 px
        blocks, cin = [], 24
        for w in widths:
            blocks.append(nn.Sequential(*_conv_bn_gelu(cin, w, pool=True), *_conv_bn_gelu(w, w, pool=False)))
            cin = w
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> list[Tensor]:
        x = self.stem(x)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return features

    def forward_head(self, last: Tensor) -> Head:
        pre = last.amax(dim=(2, 3))  # (B, C): global max-pool, as airbench
        return Head(pre, self.classifier(pre))


def airnet(num_classes: int = 10, widths: tuple[int, int, int] = (16, 64, 64)) -> AirNet:
    """0.13 M parameters and about 10 M multiply-adds per 32x32 image at the default widths."""
    return AirNet(tuple(widths), num_classes)


MODELS = {"airnet": airnet}
