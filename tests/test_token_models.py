"""Non-image inputs in the Python API: a token model distils as it trains (issue: probes used
float zeros, so any model starting with nn.Embedding failed before training)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdistill

VOCAB, LENGTH, CLASSES = 50, 12, 3


class GRUTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.gru = nn.GRU(32, 48, batch_first=True)
        self.head = nn.Linear(48, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(tokens))
        return self.head(h[-1])


class PooledStudent(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def _tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose class is which third of the vocabulary their tokens mostly come from."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    low = labels * (VOCAB // CLASSES)
    tokens = low[:, None] + torch.randint(0, VOCAB // CLASSES, (n, LENGTH), generator=g)
    noise = torch.rand(n, LENGTH, generator=g) < 0.2
    tokens[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=g)
    return tokens, labels


@pytest.mark.parametrize("as_loader", [False, True], ids=["int64-tensors", "dataloader"])
def test_a_token_model_distils_through_the_api(as_loader: bool) -> None:
    torch.manual_seed(0)
    train, test = _tokens(600, 0), _tokens(300, 1)
    settings = {"epochs": 4, "batch_size": 50, "device": "cpu", "lr": 0.05, "grad_clip": 5.0}
    teacher = GRUTeacher()
    taught = kdistill.train(teacher, train, test, **settings)
    assert taught.metrics["top1"] > 80, taught.metrics  # the task is learnable
    if as_loader:
        data = torch.utils.data.TensorDataset(*train)
        train = torch.utils.data.DataLoader(
            data, batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(0)
        )
        test = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test), batch_size=100)
    result = kdistill.distill(teacher, PooledStudent(), train, test, alpha=0.5, temperature=2.0, **settings)
    assert result.metrics["top1"] > 60, result.metrics  # learning happened (chance: 33%)
    assert result.history[-1]["train_kd"] > 0  # the teacher's soft targets were used


def test_api_edges_a_new_user_trips_over(capsys: pytest.CaptureFixture) -> None:
    """augment=False for uint8 images, DataConfig importable, num_classes said or given,
    and a quiet block for library use."""
    assert kdistill.DataConfig().augment is True
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 4
    r = kdistill.train(PooledImage(), (images, labels), epochs=1, batch_size=20, device="cpu", augment=False)
    err = capsys.readouterr().err
    assert "4 classes, from the largest label (3); pass num_classes=" in err and "epoch 1/1" in err
    assert len(r.history) == 1
    with kdistill.quiet():
        kdistill.train(PooledImage(6), (images, labels), epochs=1, batch_size=20, device="cpu", num_classes=6)
    assert capsys.readouterr().err == ""
    with pytest.raises(kdistill.KDistillError, match="label 3 is out of range for num_classes=2"):
        kdistill.train(PooledImage(), (images, labels), epochs=1, device="cpu", num_classes=2)
    with pytest.raises(kdistill.KDistillError, match="data settings: augment"):
        kdistill.train(PooledImage(), (images, labels), epochs=1, device="cpu", augment="sometimes")


class PooledImage(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.head = nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.float().mean(dim=(2, 3)))
