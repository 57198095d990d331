"""What a model is worth and what it costs: accuracy, calibration, agreement, size, MACs, latency."""

from __future__ import annotations

import io
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from kdistill.models.base import count_parameters

ECE_BINS = 15


def calibration(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict:
    """Expected calibration error (Guo et al. 2017) and the reliability diagram's bins.

    The confidence of a prediction is its top-1 softmax probability. Predictions are put in
    ``bins`` equal-width confidence bins (0, 1/bins], (1/bins, 2/bins], ...; the ECE is
    sum_b (n_b / N) * |accuracy_b - mean confidence_b|, in [0, 1] (reported as is, not %).
    """
    probs = F.softmax(logits.float(), dim=1)
    confidence, predicted = probs.max(dim=1)  # (N,), (N,)
    correct = (predicted == labels.long()).float()
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 cannot occur
    index = (confidence * bins).ceil().long().clamp(1, bins) - 1  # (N,)
    count = torch.zeros(bins).index_add_(0, index, torch.ones_like(confidence))
    conf_sum = torch.zeros(bins).index_add_(0, index, confidence)
    acc_sum = torch.zeros(bins).index_add_(0, index, correct)
    nonempty = count > 0
    mean_conf = torch.where(nonempty, conf_sum / count.clamp(min=1), torch.zeros(bins))
    mean_acc = torch.where(nonempty, acc_sum / count.clamp(min=1), torch.zeros(bins))
    ece = ((count / len(labels)) * (mean_acc - mean_conf).abs()).sum().item()
    return {
        "ece": ece,
        "bins": bins,
        "bin_count": count.long().tolist(),
        "bin_confidence": mean_conf.tolist(),
        "bin_accuracy": mean_acc.tolist(),
        "mean_confidence": confidence.mean().item(),
    }


def confusion_matrix(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> list[list[int]]:
    """counts[true class][predicted class] of logits (N, K) vs labels (N,)."""
    k = num_classes or logits.shape[1]
    flat = labels.long() * k + logits.argmax(1)
    return torch.bincount(flat, minlength=k * k).view(k, k).tolist()


def classification_metrics(logits: Tensor, labels: Tensor, classes: list[str] | None = None) -> dict:
    """Top-1/top-5 (%), mean cross-entropy (NLL), expected calibration error (15 bins) with
    its reliability bins, per-class top-1 and the confusion matrix of logits (N, K) vs labels (N,)."""
    logits, labels = logits.float().cpu(), labels.long().cpu()
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices  # (N, k)
    correct1 = topk[:, 0] == labels
    per_class = {}
    names = classes or [str(i) for i in range(logits.shape[1])]
    for c, name in enumerate(names):
        mask = labels == c
        if mask.any():
            per_class[name] = correct1[mask].float().mean().item() * 100
    calib = calibration(logits, labels)
    return {
        "top1": correct1.float().mean().item() * 100,
        "top5": (topk == labels[:, None]).any(1).float().mean().item() * 100,
        "nll": F.cross_entropy(logits, labels).item(),
        "ece": calib["ece"],
        "calibration": calib,
        "per_class_top1": per_class,
        "confusion": confusion_matrix(logits, labels),
        "classes": names,
        "num_samples": len(labels),
    }


def metrics_with_tta(logits: Tensor, mirrored: Tensor | None, labels: Tensor, classes: list[str] | None = None) -> dict:
    """:func:`classification_metrics` of ``logits`` and, given the flip test-time
    augmentation's logits ``mirrored``, its top-1 and NLL beside them (``top1_tta``,
    ``nll_tta``), never in place of the plain ones."""
    metrics = classification_metrics(logits, labels, classes)
    if mirrored is not None:
        tta = classification_metrics(mirrored, labels, classes)
        metrics.update(top1_tta=tta["top1"], nll_tta=tta["nll"])
    return metrics


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


def time_calls(
    run, batch_size: int, warmup: int = 5, repeats: int = 30, max_seconds: float = 5.0, sync=None, min_repeats: int = 5
) -> dict:
    """Median and p90 wall time (ms) of ``run()``, which processes ``batch_size`` images,
    after ``warmup`` untimed calls; stops early once ``max_seconds`` is spent (at least
    ``min_repeats`` repeats). ``sync`` waits for queued device work (CUDA) before a clock is read."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    times.sort()
    median = statistics.median(times)
    return {
        "median_ms": median * 1e3,
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3,
        "images_per_second": batch_size / median,
        "batch_size": batch_size,
        "warmup": warmup,
        "repeats": len(times),
    }


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int = 1,
    warmup: int = 5,
    repeats: int = 30,
    max_seconds: float = 5.0,
    min_repeats: int = 5,
) -> dict:
    """Median and p90 wall time (ms) of a forward pass at ``batch_size`` on the model's
    device, after warm-up; stops early once ``max_seconds`` is spent (at least ``min_repeats`` repeats).
    On the CPU it also records what the numbers depend on: ``threads`` (PyTorch's intra-op
    threads) and ``load_average`` (the machine's 1-minute load when it was measured)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    try:
        timing = time_calls(lambda: model(x), batch_size, warmup, repeats, max_seconds, sync, min_repeats)
    finally:
        model.train(was_training)
    if device.type == "cpu":
        timing["threads"] = torch.get_num_threads()
        timing["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return timing


def disk_bytes(model: nn.Module) -> int:
    """Size of the model's weights as written by ``torch.save(model.state_dict())`` (bytes):
    what a float32 deployment of it takes on disk."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.tell()


def profile_model(
    model: nn.Module, input_shape: tuple[int, ...], latency: bool = True, max_seconds: float = 5.0
) -> dict:
    """Parameters, MACs, on-disk size, CPU latency at batch 1 (median, p90) and CPU
    throughput at batch 256, plus the same on the GPU when one is present. Each timing stops
    after about ``max_seconds`` (fewer repeats when it is short: a time budget). The model
    is left on the device it came on."""
    device = next(model.parameters()).device
    out = {
        "parameters": count_parameters(model),
        "macs": count_macs(model, input_shape),
        "disk_bytes": disk_bytes(model),
    }
    if latency:
        cpu_model = model.to("cpu")
        quick = max_seconds < 5.0
        out["latency_b1"] = measure_latency(
            cpu_model,
            input_shape,
            batch_size=1,
            warmup=2 if quick else 5,
            max_seconds=max_seconds,
            min_repeats=3 if quick else 5,
        )
        out["throughput_b256"] = measure_latency(
            cpu_model,
            input_shape,
            batch_size=256,
            warmup=1 if quick else 2,
            repeats=10,
            max_seconds=max_seconds,
            min_repeats=3 if quick else 5,
        )
        if torch.cuda.is_available():
            gpu = torch.device("cuda") if device.type != "cuda" else device
            gpu_model = model.to(gpu)
            out["gpu"] = {
                "device": torch.cuda.get_device_name(gpu),
                "latency_b1": measure_latency(gpu_model, input_shape, batch_size=1, warmup=20, repeats=100),
                "throughput_b256": measure_latency(gpu_model, input_shape, batch_size=256, warmup=5, repeats=30),
            }
        model.to(device)
    return out
