"""The founding document's CNN pair, with its bug fixed: the student is genuinely smaller.

Both are plain conv-ReLU-maxpool stacks with a two-layer MLP head and no batch norm
(which is why distilling them needs warm-up and gradient clipping to stay stable).
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.models.base import Head, KDModel


class SeedCNN(KDModel):
    """conv(3->c1) pool conv(c1->c2) pool, FC (c2*8*8 -> hidden) -> classes, for 32x32 inputs."""

    def __init__(self, channels: tuple[int, int], hidden: int, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        c1, c2 = channels
        self.stage1 = nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
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


def seed_teacher(num_classes: int = 10, image_size: int = 32) -> SeedCNN:
    """2.12 M parameters for 10 classes: conv 32, 64; FC 4096 -> 512 -> classes."""
    return SeedCNN((32, 64), 512, num_classes, image_size)


def seed_student(num_classes: int = 10, image_size: int = 32) -> SeedCNN:
    """0.27 M parameters for 10 classes: conv 16, 32; FC 2048 -> 128 -> classes."""
    return SeedCNN((16, 32), 128, num_classes, image_size)
