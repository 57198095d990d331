"""KD loss (Hinton et al. 2015) against its formula, and the Distillation task around it.

kd_loss(s, t, T) = T^2 / B * sum_b sum_k p_t[b,k] * (log p_t[b,k] - log p_s[b,k]),
p = softmax(logits / T)
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.data.loader import Batch
from kdistill.methods import MethodContext, build_methods
from kdistill.methods.kd import kd_loss
from kdistill.models import create_model
from kdistill.models.base import feature_shapes
from kdistill.tasks import Distillation

TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0]

# Hand-made logits (B=3, K=4), including a large spread and a negative row.
STUDENT = [[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, -2.0, 1.5, 0.25]]
TEACHER = [[2.0, 1.0, 0.0, -0.5], [1.0, -1.0, 2.0, 0.5], [-4.0, 5.0, 0.0, 1.0]]


def _softmax_row(row: list[float], T: float) -> list[float]:
    """Plain-Python softmax(row / T), shifted by the max for stability."""
    m = max(row)
    e = [math.exp((v - m) / T) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _hand_kd(student: list[list[float]], teacher: list[list[float]], T: float) -> float:
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_s, p_t = _softmax_row(s_row, T), _softmax_row(t_row, T)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return T * T * total / len(student)


def _t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_value_matches_hand_computation(T: float) -> None:
    got = kd_loss(_t(STUDENT), _t(TEACHER), T)
    assert got.dim() == 0
    assert got.item() == pytest.approx(_hand_kd(STUDENT, TEACHER, T), rel=1e-12, abs=1e-14)


def test_hand_computation_single_row() -> None:
    """One row worked out on paper: s = [0, 0], t = [log 3, 0], T = 1 ->
    p_t = [3/4, 1/4], p_s = [1/2, 1/2], KL = 3/4 log(3/2) + 1/4 log(1/2)."""
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = kd_loss(_t([[0.0, 0.0]]), _t([[math.log(3.0), 0.0]]), 1.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # doubling T and the logits leaves the distributions unchanged, so only T^2 scales it
    got2 = kd_loss(_t([[0.0, 0.0]]), _t([[2 * math.log(3.0), 0.0]]), 2.0)
    assert got2.item() == pytest.approx(4 * expected, rel=1e-12)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_nonnegative_on_random_logits(T: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
    assert kd_loss(s, t, T).item() > 0


@pytest.mark.parametrize("T", TEMPERATURES)
def test_zero_with_zero_gradient_when_student_equals_teacher(T: float) -> None:
    s = _t(TEACHER, grad=True)
    loss = kd_loss(s, _t(TEACHER), T)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-15)
    torch.testing.assert_close(s.grad, torch.zeros_like(s), rtol=0, atol=1e-15)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_invariant_to_a_constant_per_row(T: float) -> None:
    s, t = _t(STUDENT), _t(TEACHER)
    shift_s = torch.tensor([[5.0], [-3.0], [100.0]], dtype=torch.float64)
    shift_t = torch.tensor([[-7.0], [0.5], [42.0]], dtype=torch.float64)
    base = kd_loss(s, t, T)
    torch.testing.assert_close(kd_loss(s + shift_s, t, T), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kd_loss(s, t + shift_t, T), base, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(kd_loss(s + shift_s, t + shift_t, T), base, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [0.5, 4.0])
def test_gradcheck(T: float) -> None:
    s, t = _t(STUDENT, grad=True), _t(TEACHER, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: kd_loss(a, b, T), (s, t))


@pytest.mark.parametrize("T", TEMPERATURES)
def test_analytic_gradient(T: float) -> None:
    """d kd_loss / d s = T^2 * (p_s - p_t) / (T * B) = (p_s - p_t) * T / B."""
    s = _t(STUDENT, grad=True)
    kd_loss(s, _t(TEACHER), T).backward()
    B = len(STUDENT)
    p_s = torch.tensor([_softmax_row(r, T) for r in STUDENT], dtype=torch.float64)
    p_t = torch.tensor([_softmax_row(r, T) for r in TEACHER], dtype=torch.float64)
    torch.testing.assert_close(s.grad, (p_s - p_t) * T / B, rtol=1e-10, atol=1e-14)


def test_t_squared_keeps_gradient_scale_independent_of_T() -> None:
    """For logits small relative to T, softmax(z/T) ~ (1 + (z - mean z)/T) / K, so

        grad = (p_s - p_t) * T / B ~ ((s - t) - mean_k(s - t)) / (K * B),

    independent of T, with an error of order |logits| / T. Without the T^2 factor the
    gradient would shrink as 1/T^2."""
    g = torch.Generator().manual_seed(0)
    B, K = 8, 10
    s = torch.randn(B, K, generator=g, dtype=torch.float64) * 0.1
    t = torch.randn(B, K, generator=g, dtype=torch.float64) * 0.1
    d = s - t
    limit = (d - d.mean(dim=1, keepdim=True)) / (K * B)

    grads, errors = {}, {}
    for T in (1.0, 4.0, 16.0):
        x = s.clone().requires_grad_(True)
        kd_loss(x, t, T).backward()
        grads[T] = x.grad
        errors[T] = ((x.grad - limit).norm() / limit.norm()).item()

    norms = [grads[T].norm().item() for T in (1.0, 4.0, 16.0)]
    assert max(norms) / min(norms) < 1.2, norms
    # the approximation improves as T grows (error ~ 1/T) and is tight at T = 16
    assert errors[16.0] < errors[4.0] < errors[1.0] < 0.2, errors
    assert errors[16.0] < 0.01, errors
    # without T^2 the same gradients would differ by a factor T^2 = 256 between T=1 and T=16
    unscaled = [n / T**2 for n, T in zip(norms, (1.0, 4.0, 16.0))]
    assert unscaled[0] / unscaled[2] > 200


def test_float32_matches_float64() -> None:
    for T in TEMPERATURES:
        got = kd_loss(_t(STUDENT).float(), _t(TEACHER).float(), T)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(_hand_kd(STUDENT, TEACHER, T), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- the Distillation task


def _task(
    alpha: float, ce_weight: float, temperature: float = 4.0
) -> tuple[Distillation, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = create_model("seed_teacher", num_classes=10)
    student = create_model("seed_student", num_classes=10)
    context = MethodContext(
        student=feature_shapes(student, (3, 32, 32)),
        teacher=feature_shapes(teacher, (3, 32, 32)),
        num_classes=10,
        num_samples=100,
        epochs=1,
    )
    methods = build_methods({"kd": {"temperature": temperature}}, context)
    return (
        Distillation(student, teacher, methods, alpha=alpha, ce_weight=ce_weight),
        student,
        teacher,
    )


def _batch(n: int = 6) -> Batch:
    g = torch.Generator().manual_seed(1)
    return Batch(
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        torch.arange(n),
    )


def test_task_alpha_zero_is_cross_entropy() -> None:
    task, student, _ = _task(alpha=0.0, ce_weight=1.0)
    batch = _batch()
    logits, losses = task(batch, 0.0)
    total = sum(losses.values())
    with torch.no_grad():
        expected = F.cross_entropy(student(batch.images), batch.labels)
    assert torch.equal(total.detach(), expected)
    assert torch.equal(losses["ce"].detach(), expected)


def test_task_alpha_one_is_kd_loss() -> None:
    task, student, teacher = _task(alpha=1.0, ce_weight=0.0, temperature=3.0)
    batch = _batch()
    _, losses = task(batch, 0.0)
    assert "ce" not in losses
    total = sum(losses.values())
    with torch.no_grad():
        expected = kd_loss(student(batch.images), teacher(batch.images), 3.0)
    torch.testing.assert_close(total.detach(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_task_combined_loss(alpha: float) -> None:
    task, student, teacher = _task(alpha=alpha, ce_weight=1 - alpha)
    batch = _batch()
    _, losses = task(batch, 0.0)
    assert set(losses) == {"ce", "kd"}
    with torch.no_grad():
        s, t = student(batch.images), teacher(batch.images)
        ce, kd = F.cross_entropy(s, batch.labels), kd_loss(s, t, 4.0)
    torch.testing.assert_close(losses["ce"].detach(), (1 - alpha) * ce)
    torch.testing.assert_close(losses["kd"].detach(), alpha * kd)
    torch.testing.assert_close(sum(losses.values()).detach(), (1 - alpha) * ce + alpha * kd)


def test_task_teacher_is_frozen_and_hidden() -> None:
    task, student, teacher = _task(alpha=0.9, ce_weight=0.1)
    teacher.train()  # even if someone switches it on, task.train() must switch it back
    task.train()
    assert task.training and student.training
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())

    _, losses = task(_batch(), 0.0)
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())

    teacher_ids = {id(p) for p in teacher.parameters()}
    task_ids = {id(p) for p in task.parameters()}
    assert not teacher_ids & task_ids
    assert task_ids == {id(p) for p in student.parameters()}  # KD has no parameters of its own
    keys = set(task.state_dict())
    assert not any(k.startswith("teacher") for k in keys), keys
    assert keys == {f"model.{k}" for k in student.state_dict()}

    task.eval()
    task.train(True)
    assert not teacher.training
