"""The founding document's CNN pair, with its bug fixed: the student is genuinely smaller.

Both are plain conv-ReLU-maxpool stacks with a two-layer MLP head and, as the document has
them, no batch norm (which is why distilling them needs warm-up and gradient clipping to stay
stable). ``batch_norm=True`` adds one after each convolution (``kwargs: {batch_norm: true}``
in a config): the same parameters give or take 2 per channel, trainable at a higher learning
rate (configs/cifar10_seed_fast.yaml).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.models.base import Head, KDModel


class SeedCNN(KDModel):
    """conv(3->c1) pool conv(c1->c2) pool, FC (c2*8*8 -> hidden) -> classes, for 32x32 inputs."""

    def __init__(
        self,
        channels: tuple[int, int],
        hidden: int,
        num_classes: int = 10,
        image_size: int = 32,
        batch_norm: bool = False,
    ):
        super().__init__()
        c1, c2 = channels
        self.stage1 = _stage(3, c1, batch_norm)
        self.stage2 = _stage(c1, c2, batch_norm)
        side = image_size // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        f1 = self.stage1(x)  # (B, c1, H/2, W/2)
        f2 = self.stage2(f1)  # (B, c2, H/4, W/4)
        return [f1, f2]

    def forward_head(self, last: Tensor) -> Head:
        pre = self.fc(last)  # (B, hidden)
        return Head(pre, self.classifier(pre))


def _stage(cin: int, cout: int, batch_norm: bool) -> nn.Sequential:
    """conv 3x3 (bias-free before a batch norm), [batch norm], ReLU, max-pool 2."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)
    norm = [nn.BatchNorm2d(cout)] if batch_norm else []
    return nn.Sequential(conv, *norm, nn.ReLU(inplace=True), nn.MaxPool2d(2))


def seed_teacher(num_classes: int = 10, image_size: int = 32, batch_norm: bool = False) -> SeedCNN:
    """2.12 M parameters for 10 classes: conv 32, 64; FC 4096 -> 512 -> classes."""
    return SeedCNN((32, 64), 512, num_classes, image_size, batch_norm)


def seed_student(num_classes: int = 10, image_size: int = 32, batch_norm: bool = False) -> SeedCNN:
    """0.27 M parameters for 10 classes: conv 16, 32; FC 2048 -> 128 -> classes."""
    return SeedCNN((16, 32), 128, num_classes, image_size, batch_norm)
