"""The Python API distills any classifier, not only CNNs on images: here 1-D convolutional
and recurrent sequence classifiers on synthetic data built in the test."""

import pytest
import torch
from torch import nn

import kdistill


def make_sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a noisy sine of frequency k+1 over 32 steps, 2 channels (sine, cosine)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    t = torch.linspace(0, 2 * torch.pi, 32)
    phase = torch.rand(n, 1, generator=g) * 2 * torch.pi
    freq = (labels + 1).float()[:, None]
    x = torch.stack([torch.sin(freq * t + phase), torch.cos(freq * t + phase)], dim=1)  # (N, 2, 32)
    return x + 0.6 * torch.randn(x.shape, generator=g), labels


class ConvSeq(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(2, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 5, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
            nn.Linear(width, 4),
        )

    def forward(self, x):  # (B, 2, 32) -> (B, 4)
        return self.net(x)


class GRUSeq(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.gru = nn.GRU(2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4)

    def forward(self, x):  # (B, 2, 32) -> (B, 4)
        out, _ = self.gru(x.transpose(1, 2))
        return self.head(out[:, -1])


@pytest.mark.slow
def test_distill_sequence_classifiers_from_tensors_and_iterables():
    train, test = make_sequences(1024, 0), make_sequences(512, 1)
    torch.manual_seed(0)
    teacher = ConvSeq(32)
    t = kdistill.train(teacher, train, test, epochs=6, lr=0.05, batch_size=64, channels_last=False, device="cpu")
    assert t.metrics["top1"] > 80, t.metrics

    teacher.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    student = GRUSeq(8)
    before = kdistill.train(
        GRUSeq(8), train, test, epochs=1, lr=1e-9, batch_size=64, channels_last=False, device="cpu"
    ).metrics["top1"]
    r = kdistill.distill(
        teacher,
        student,
        train,
        test,
        epochs=8,
        lr=0.02,
        batch_size=64,
        channels_last=False,
        device="cpu",
        optimizer={"name": "adamw"},
    )
    assert r.metrics["top1"] > max(before, 25) + 20, (before, r.metrics)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher was never trained here

    # the same from an iterable of batches (e.g. a DataLoader)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test), batch_size=128)
    torch.manual_seed(0)
    r2 = kdistill.distill(
        teacher, ConvSeq(16), loader, test_loader, epochs=8, lr=0.05, channels_last=False, device="cpu"
    )
    assert r2.metrics["top1"] > 50, r2.metrics


def test_a_model_built_for_other_inputs_is_one_line_before_training() -> None:
    """seed_student built for 32 px images, given 64 px images: the probe says so, naming the
    model and the inputs, instead of a raw shape error from inside its classifier."""
    images = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8)
    labels = torch.arange(16) % 2
    model = kdistill.create_model("seed_student", num_classes=2)
    with pytest.raises(kdistill.KDistillError, match=r"cannot take the training inputs \(batch of shape \(3, 64, 64\)"):
        kdistill.train(model, (images, labels), epochs=1)
    teacher = kdistill.create_model("seed_teacher", num_classes=2)
    with pytest.raises(kdistill.KDistillError, match=r"cannot take the training inputs"):
        kdistill.distill(teacher, kdistill.create_model("seed_student", num_classes=2), (images, labels), epochs=1)
