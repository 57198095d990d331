"""What a model is worth and what it costs: accuracy, agreement, size, MACs, latency."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdistill.models.base import count_parameters


def classification_metrics(logits: Tensor, labels: Tensor, classes: list[str] | None = None) -> dict:
    """Top-1/top-5 (%), mean cross-entropy and per-class top-1 of logits (N, K) vs labels (N,)."""
    logits, labels = logits.float(), labels.long()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices  # (N, k)
    correct1 = topk[:, 0] == labels
    per_class = {}
    names = classes or [str(i) for i in range(logits.shape[1])]
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            per_class[name] = correct1[mask].float().mean().item() * 100
    return {
        "top1": correct1.float().mean().item() * 100,
        "top5": (topk == labels[:, None]).any(1).float().mean().item() * 100,
        "nll": F.cross_entropy(logits, labels).item(),
        "per_class_top1": per_class,
        "num_samples": len(labels),
    }


def agreement(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> dict:
    """How closely the student imitates the teacher: top-1 agreement (%) and the mean
    KL(p_teacher || p_student) per sample at the given temperature."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="batchmean", log_target=True)
    return {"agreement_top1": (s.argmax(1) == t.argmax(1)).float().mean().item() * 100, "mean_kl": kl.item()}


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass for a single input of ``input_shape``
    (FLOPs counted by PyTorch's own flop counter, divided by two)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=device))
    model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, warmup: int = 5, repeats: int = 30, max_seconds: float = 5.0, min_repeats: int = 5
) -> dict:
    """Median and p90 wall time (ms) of a forward pass at ``batch_size`` on the model's
    device, after warm-up; stops early once ``max_seconds`` is spent (at least ``min_repeats`` repeats)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    model.train(was_training)
    times.sort()
    median = statistics.median(times)
    return {
        "median_ms": median * 1e3,
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3,
        "images_per_second": batch_size / median,
        "repeats": len(times),
    }


def profile_model(model: nn.Module, input_shape: tuple[int, ...], latency: bool = True, max_seconds: float = 5.0) -> dict:
    """Parameters, MACs, CPU latency at batch 1 and CPU throughput at batch 256; each timing
    stops after about ``max_seconds`` (fewer repeats when it is short: a time budget)."""
    out = {"parameters": count_parameters(model), "macs": count_macs(model, input_shape)}
    if latency:
        cpu_model = model.to("cpu")
        quick = max_seconds < 5.0
        out["latency_b1"] = measure_latency(cpu_model, input_shape, batch_size=1, warmup=2 if quick else 5, max_seconds=max_seconds, min_repeats=3 if quick else 5)
        out["throughput_b256"] = measure_latency(
            cpu_model, input_shape, batch_size=256, warmup=1 if quick else 2, repeats=10, max_seconds=max_seconds, min_repeats=3 if quick else 5
        )
    return out
