"""Feature-based distillation methods (FitNets, AT, SP, RKD, PKT, CRD).

Every loss is checked against its paper's formula written out here with explicit loops over
Python floats (never the implementation's helpers), its gradient with ``gradcheck`` in
float64, and its invariances; CRD's memory banks and normalisation constant are checked
step by step; and each method runs a tiny end-to-end distillation on real images.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import kdistill
from kdistill.api import make_train_config, prepare_data
from kdistill.data.loader import Batch
from kdistill.engine import fit, predict, quick_metrics
from kdistill.errors import ConfigError
from kdistill.methods.at import AT, at_loss
from kdistill.methods.base import MethodContext
from kdistill.methods.crd import (
    CRD,
    contrast_scores,
    momentum_update,
    nce_loss,
    sample_contrast_indices,
)
from kdistill.methods.fitnets import FitNets, HintRegressor, hint_loss
from kdistill.methods.pkt import PKT, pkt_loss
from kdistill.methods.rkd import RKD, rkd_angle_loss, rkd_distance_loss
from kdistill.methods.sp import SP, sp_loss
from kdistill.models.base import ModelOutput, feature_shapes
from kdistill.tasks import Distillation

D64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_torch_thread", "seeded")  # see tests/conftest.py


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def output(features: list[torch.Tensor], pre_logits: torch.Tensor, num_classes: int = 10) -> ModelOutput:
    return ModelOutput(torch.zeros(pre_logits.shape[0], num_classes, dtype=pre_logits.dtype), features, pre_logits)


def shapes_only(stages: list[tuple[int, int, int]], dim: int) -> ModelOutput:
    """A dummy-batch ModelOutput with the given stage shapes (C, H, W) and pre-logit size."""
    return output([torch.zeros(2, *s) for s in stages], torch.zeros(2, dim))


def make_context(student: ModelOutput, teacher: ModelOutput, num_samples: int = 50) -> MethodContext:
    return MethodContext(student=student, teacher=teacher, num_classes=10, num_samples=num_samples, epochs=2)


def huber(x: float) -> float:
    """smooth L1 with threshold 1"""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def pool_blocks(f: list, k: int) -> list:
    """Average k x k blocks of a nested list f[b][c][h][w] (explicit loops)."""
    B, C, H, W = len(f), len(f[0]), len(f[0][0]), len(f[0][0][0])
    return [
        [
            [
                [
                    sum(f[b][c][h * k + i][w * k + j] for i in range(k) for j in range(k)) / (k * k)
                    for w in range(W // k)
                ]
                for h in range(H // k)
            ]
            for c in range(C)
        ]
        for b in range(B)
    ]


def l2_normalise(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, 1e-12) for x in v]


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v))


# ---------------------------------------------------------------------------------- FitNets


def test_hint_loss_value() -> None:
    r, t = randn(3, 4, 2, 2, seed=1), randn(3, 4, 2, 2, seed=2)
    R, T = r.tolist(), t.tolist()
    want = (
        sum(
            (R[b][c][h][w] - T[b][c][h][w]) ** 2 for b in range(3) for c in range(4) for h in range(2) for w in range(2)
        )
        / 48
    )
    assert hint_loss(r, t).item() == pytest.approx(want, rel=1e-12)


def test_fitnets_value_through_regressor() -> None:
    """The whole method: pool 4x4 -> 2x2, conv 1x1, batch-norm (batch statistics), ReLU, MSE, beta."""
    B, Cs, Ct = 3, 2, 3
    f_s, f_t = randn(B, Cs, 4, 4, seed=3), randn(B, Ct, 2, 2, seed=4).abs()
    ctx = make_context(shapes_only([(Cs, 4, 4)], 5), shapes_only([(Ct, 2, 2)], 7))
    method = FitNets(FitNets.Options(), ctx).double().train()
    weight = randn(Ct, Cs, seed=5)
    gamma, shift = [1.5, 0.5, 2.0], [0.1, -0.2, 0.3]
    with torch.no_grad():
        method.regressor.conv.weight.copy_(weight.view(Ct, Cs, 1, 1))
        method.regressor.bn.weight.copy_(torch.tensor(gamma))
        method.regressor.bn.bias.copy_(torch.tensor(shift))
    got = method(output([f_s], randn(B, 5)), output([f_t], randn(B, 7)), None, None, 0.0)["fitnets"]

    x = pool_blocks(f_s.tolist(), 2)  # (B, Cs, 2, 2)
    W, T = weight.tolist(), f_t.tolist()
    y = [
        [[[sum(W[o][c] * x[b][c][h][w] for c in range(Cs)) for w in range(2)] for h in range(2)] for o in range(Ct)]
        for b in range(B)
    ]
    total = 0.0
    for o in range(Ct):
        vals = [y[b][o][h][w] for b in range(B) for h in range(2) for w in range(2)]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / len(vals)  # biased, as batch norm normalises with
        for b in range(B):
            for h in range(2):
                for w in range(2):
                    z = max(0.0, (y[b][o][h][w] - mean) / math.sqrt(var + 1e-5) * gamma[o] + shift[o])
                    total += (z - T[b][o][h][w]) ** 2
    want = 100.0 * total / (B * Ct * 4)
    assert got.item() == pytest.approx(want, rel=1e-6)  # the method computes in float32


@pytest.mark.parametrize("s_size,t_size", [(4, 2), (2, 4), (3, 3)])
def test_fitnets_gradcheck_through_regressor(s_size: int, t_size: int) -> None:
    """Gradients wrt the student's features and the regressor's weights, with pooling,
    upsampling and no resampling (ReLU off: gradcheck needs a smooth function)."""
    reg = HintRegressor(2, 3, (t_size, t_size), relu=False).double().train()
    f_s = randn(3, 2, s_size, s_size, seed=6).requires_grad_()
    hint = randn(3, 3, t_size, t_size, seed=7)
    w = reg.conv.weight.detach().clone().requires_grad_()
    g = reg.bn.weight.detach().clone().requires_grad_()

    def fn(f, w, g):
        out = torch.func.functional_call(reg, {"conv.weight": w, "bn.weight": g}, (f,))
        return hint_loss(out, hint)

    assert gradcheck(fn, (f_s, w, g))


def test_fitnets_regressor_shapes_and_default_stages() -> None:
    # the seed pair has two stages: the middle one (L // 2) is the deeper
    ctx = make_context(shapes_only([(16, 16, 16), (32, 8, 8)], 128), shapes_only([(32, 16, 16), (64, 8, 8)], 512))
    m = FitNets(FitNets.Options(), ctx)
    assert (m.student_stage, m.teacher_stage) == (1, 1)
    # three stages: the middle one, as RepDistiller's hint_layer=2
    ctx = make_context(
        shapes_only([(16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
        shapes_only([(64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    )
    m = FitNets(FitNets.Options(), ctx)
    assert (m.student_stage, m.teacher_stage) == (1, 1)
    m = FitNets(FitNets.Options(student_stage=0, teacher_stage=-1), ctx)
    assert m.regressor(torch.randn(2, 16, 32, 32)).shape == (2, 256, 8, 8)
    with pytest.raises(ConfigError, match=r"fitnets.student_stage=3.*valid indices -3..2"):
        FitNets(FitNets.Options(student_stage=3), ctx)


# --------------------------------------------------------------------------------------- AT


def reference_attention(f: list) -> list[list[float]]:
    """a(f)[b] = normalise(mean_c f_c^2), flattened, from nested lists (B, C, H, W)."""
    out = []
    for fb in f:
        C, H, W = len(fb), len(fb[0]), len(fb[0][0])
        q = [sum(fb[c][h][w] ** 2 for c in range(C)) / C for h in range(H) for w in range(W)]
        out.append(l2_normalise(q))
    return out


def reference_at(f_s: list, f_t: list) -> float:
    a_s, a_t = reference_attention(f_s), reference_attention(f_t)
    diffs = [(x - y) ** 2 for rs, rt in zip(a_s, a_t) for x, y in zip(rs, rt)]
    return sum(diffs) / len(diffs)


def test_at_loss_value_same_size() -> None:
    f_s, f_t = randn(3, 2, 3, 3, seed=10), randn(3, 5, 3, 3, seed=11)
    assert at_loss(f_s, f_t).item() == pytest.approx(reference_at(f_s.tolist(), f_t.tolist()), rel=1e-12)


def test_at_loss_pools_the_larger_map() -> None:
    f_s, f_t = randn(2, 2, 4, 4, seed=12), randn(2, 3, 2, 2, seed=13)
    want = reference_at(pool_blocks(f_s.tolist(), 2), f_t.tolist())
    assert at_loss(f_s, f_t).item() == pytest.approx(want, rel=1e-12)
    # symmetric: a larger teacher map is pooled too
    assert at_loss(f_t, f_s).item() == pytest.approx(want, rel=1e-12)


def test_at_method_sums_pairs_times_beta_and_default_pairs() -> None:
    # student 3 stages, teacher 2: default pairs the deepest two from the deep end
    ctx = make_context(shapes_only([(2, 8, 8), (2, 4, 4), (2, 2, 2)], 4), shapes_only([(3, 4, 4), (3, 2, 2)], 4))
    m = AT(AT.Options(), ctx)
    assert m.pairs == [(1, 0), (2, 1)]
    fs = [randn(2, 2, 8, 8, seed=1), randn(2, 2, 4, 4, seed=2), randn(2, 2, 2, 2, seed=3)]
    ft = [randn(2, 3, 4, 4, seed=4), randn(2, 3, 2, 2, seed=5)]
    got = m(output(fs, randn(2, 4)), output(ft, randn(2, 4)), None, None, 0.0)["at"]
    want = 1000 * (reference_at(fs[1].tolist(), ft[0].tolist()) + reference_at(fs[2].tolist(), ft[1].tolist()))
    assert got.item() == pytest.approx(want, rel=1e-6)  # the method computes in float32
    assert AT(AT.Options(student_stages=[0], teacher_stages=[-1]), ctx).pairs == [(0, 1)]
    with pytest.raises(ConfigError, match="must pair up"):
        AT(AT.Options(student_stages=[0, 1], teacher_stages=[0]), ctx)
    with pytest.raises(ConfigError, match=r"at.teacher_stages=2"):
        AT(AT.Options(student_stages=[2]), ctx)


def test_at_gradcheck() -> None:
    f_t = randn(2, 3, 2, 2, seed=14)
    for s in (2, 4):
        f_s = randn(2, 2, s, s, seed=15).requires_grad_()
        assert gradcheck(lambda f: at_loss(f, f_t), (f_s,))


# --------------------------------------------------------------------------------------- SP


def reference_sp(f_s: torch.Tensor, f_t: torch.Tensor) -> float:
    def gram(f):
        q = f.flatten(1).tolist()
        return [l2_normalise([dot(qi, qj) for qj in q]) for qi in q]

    gs, gt = gram(f_s), gram(f_t)
    b = len(gs)
    return sum((gs[i][j] - gt[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_loss_value() -> None:
    f_s, f_t = randn(4, 2, 3, 3, seed=20), randn(4, 5, 2, 2, seed=21)
    assert sp_loss(f_s, f_t).item() == pytest.approx(reference_sp(f_s, f_t), rel=1e-12)


def test_sp_method_default_last_stage_gamma() -> None:
    ctx = make_context(shapes_only([(2, 4, 4), (3, 2, 2)], 4), shapes_only([(4, 4, 4), (5, 2, 2)], 4))
    m = SP(SP.Options(), ctx)
    assert m.pairs == [(1, 1)]
    fs, ft = (
        [randn(4, 2, 4, 4, seed=1), randn(4, 3, 2, 2, seed=2)],
        [randn(4, 4, 4, 4, seed=3), randn(4, 5, 2, 2, seed=4)],
    )
    got = m(output(fs, randn(4, 4)), output(ft, randn(4, 4)), None, None, 0.0)["sp"]
    assert got.item() == pytest.approx(3000 * reference_sp(fs[1], ft[1]), rel=1e-5)


def test_sp_gradcheck() -> None:
    f_t = randn(4, 3, 2, 2, seed=22)
    f_s = randn(4, 2, 3, 3, seed=23).requires_grad_()
    assert gradcheck(lambda f: sp_loss(f, f_t), (f_s,))


# -------------------------------------------------------------------------------------- RKD


def reference_rkd(e_s: torch.Tensor, e_t: torch.Tensor) -> tuple[float, float, int]:
    """(distance loss, angle loss, how many Huber arguments fell in the linear branch)."""

    def distances(e):
        x = e.tolist()
        b = len(x)
        d = [
            [math.sqrt(sum((p - q) ** 2 for p, q in zip(x[i], x[j]))) if i != j else 0.0 for j in range(b)]
            for i in range(b)
        ]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[v / mu for v in row] for row in d]

    def angles(e):
        x = e.tolist()
        b = len(x)
        out = {}
        for a in range(b):
            for i in range(b):
                for k in range(b):
                    u = [p - q for p, q in zip(x[i], x[a])]
                    v = [p - q for p, q in zip(x[k], x[a])]
                    nu, nv = math.sqrt(dot(u, u)), math.sqrt(dot(v, v))
                    out[a, i, k] = dot(u, v) / (nu * nv) if nu > 0 and nv > 0 else 0.0
        return out

    ds, dt = distances(e_s), distances(e_t)
    b = len(ds)
    dist_args = [ds[i][j] - dt[i][j] for i in range(b) for j in range(b)]
    a_s, a_t = angles(e_s), angles(e_t)
    ang_args = [a_s[key] - a_t[key] for key in a_s]
    linear = sum(abs(x) >= 1 for x in dist_args + ang_args)
    return sum(map(huber, dist_args)) / b**2, sum(map(huber, ang_args)) / b**3, linear


def test_rkd_losses_value() -> None:
    e_s, e_t = randn(5, 3, seed=30), randn(5, 4, seed=31)
    e_t[0] *= 8  # an outlier, so that both branches of the Huber loss are exercised
    want_d, want_a, linear = reference_rkd(e_s, e_t)
    assert linear > 0
    assert rkd_distance_loss(e_s, e_t).item() == pytest.approx(want_d, rel=1e-12)
    assert rkd_angle_loss(e_s, e_t).item() == pytest.approx(want_a, rel=1e-12)


def test_rkd_method_weights_and_pre_logits() -> None:
    e_s, e_t = randn(6, 3, seed=32), randn(6, 4, seed=33)
    ctx = make_context(shapes_only([(2, 2, 2)], 3), shapes_only([(2, 2, 2)], 4))
    out = RKD(RKD.Options(), ctx)(output([randn(6, 2, 2, 2)], e_s), output([randn(6, 2, 2, 2)], e_t), None, None, 0.0)
    want_d, want_a, _ = reference_rkd(e_s, e_t)
    assert out["rkd_distance"].item() == pytest.approx(25 * want_d, rel=1e-5)
    assert out["rkd_angle"].item() == pytest.approx(50 * want_a, rel=1e-5)


def test_rkd_gradcheck() -> None:
    e_t = randn(5, 4, seed=34)
    e_s = randn(5, 3, seed=35).requires_grad_()
    assert gradcheck(lambda e: rkd_distance_loss(e, e_t), (e_s,))
    assert gradcheck(lambda e: rkd_angle_loss(e, e_t), (e_s,))


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.01, 100), shift=st.floats(-10, 10), seed=st.integers(0, 1000))
def test_rkd_invariant_to_similarity_transforms(scale: float, shift: float, seed: int) -> None:
    """Both potentials ignore scale, translation and rotation of either embedding."""
    e_s, e_t = randn(6, 4, seed=seed), randn(6, 5, seed=seed + 1)
    rotation, _ = torch.linalg.qr(randn(4, 4, seed=seed + 2))
    moved = scale * e_s @ rotation + shift
    for loss in (rkd_distance_loss, rkd_angle_loss):
        assert loss(moved, e_t).item() == pytest.approx(loss(e_s, e_t).item(), rel=1e-6, abs=1e-9)


# -------------------------------------------------------------------------------------- PKT


def reference_pkt(x_s: torch.Tensor, x_t: torch.Tensor, eps: float = 1e-7) -> float:
    def probs(x):
        rows = [[v / (math.sqrt(dot(r, r)) + eps) for v in r] for r in x.tolist()]
        k = [[(dot(ri, rj) + 1) / 2 for rj in rows] for ri in rows]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(x_s), probs(x_t)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_loss_value() -> None:
    x_s, x_t = randn(5, 3, seed=40), randn(5, 6, seed=41)
    assert pkt_loss(x_s, x_t).item() == pytest.approx(reference_pkt(x_s, x_t), rel=1e-12)


def test_pkt_method_beta() -> None:
    x_s, x_t = randn(4, 3, seed=42), randn(4, 6, seed=43)
    ctx = make_context(shapes_only([(2, 2, 2)], 3), shapes_only([(2, 2, 2)], 6))
    got = PKT(PKT.Options(), ctx)(output([randn(4, 2, 2, 2)], x_s), output([randn(4, 2, 2, 2)], x_t), None, None, 0.0)[
        "pkt"
    ]
    assert got.item() == pytest.approx(30000 * reference_pkt(x_s, x_t), rel=1e-5)


def test_pkt_gradcheck() -> None:
    x_t = randn(5, 6, seed=44)
    x_s = randn(5, 3, seed=45).requires_grad_()
    assert gradcheck(lambda x: pkt_loss(x, x_t), (x_s,))


# ------------------------------------------------------------- shared: identity and precision


RELATIONAL = {"at": AT, "sp": SP, "rkd": RKD, "pkt": PKT}


@pytest.mark.parametrize("name", ["at", "sp", "rkd", "pkt"])
def test_zero_when_student_equals_teacher(name: str) -> None:
    ctx = make_context(shapes_only([(3, 4, 4), (4, 2, 2)], 5), shapes_only([(3, 4, 4), (4, 2, 2)], 5))
    cls = RELATIONAL[name]
    same = output([randn(6, 3, 4, 4, seed=1), randn(6, 4, 2, 2, seed=2)], randn(6, 5, seed=3))
    for value in cls(cls.Options(), ctx)(same, same, None, None, 0.0).values():
        assert value.item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("name", ["at", "sp", "rkd", "pkt"])
def test_losses_computed_in_float32_under_bf16_autocast(name: str) -> None:
    ctx = make_context(shapes_only([(3, 4, 4), (4, 2, 2)], 5), shapes_only([(6, 4, 4), (8, 2, 2)], 7))
    cls = RELATIONAL[name]
    method = cls(cls.Options(), ctx)
    s = output([randn(8, 3, 4, 4, seed=1).float(), randn(8, 4, 2, 2, seed=2).float()], randn(8, 5, seed=3).float())
    t = output([randn(8, 6, 4, 4, seed=4).float(), randn(8, 8, 2, 2, seed=5).float()], randn(8, 7, seed=6).float())
    plain = method(s, t, None, None, 0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = method(s, t, None, None, 0.0)
    for term, value in plain.items():
        assert mixed[term].dtype == torch.float32
        torch.testing.assert_close(mixed[term], value, rtol=1e-5, atol=1e-7)


def test_feature_methods_need_stage_features() -> None:
    no_features = output([], torch.zeros(2, 4))
    ctx = make_context(no_features, shapes_only([(3, 4, 4)], 5))
    with pytest.raises(ConfigError, match="exposes no stage features"):
        FitNets(FitNets.Options(), ctx)
    with pytest.raises(ConfigError, match="no stage pairs"):
        AT(AT.Options(), ctx)


# -------------------------------------------------------------------------------------- CRD


def crd_context(num_samples: int = 20, ds: int = 5, dt: int = 7) -> MethodContext:
    return make_context(shapes_only([(2, 2, 2)], ds), shapes_only([(2, 2, 2)], dt), num_samples)


def reference_nce(scores: list[list[float]], z: float, n: int) -> float:
    """-(1/B) sum_b [log h(P_pos) + sum_k log(1 - h(P_k))], h(P) = P / (P + K/N), P = score / Z."""
    total = 0.0
    for row in scores:
        k = len(row) - 1
        noise = k / n
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + noise + 1e-7))
        total += sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
    return -total / len(scores)


def test_nce_loss_and_scores_value() -> None:
    memory = F.normalize(randn(10, 4, seed=50), dim=1)
    anchor = F.normalize(randn(3, 4, seed=51), dim=1)
    idx = torch.tensor([[0, 4, 5, 9], [1, 0, 0, 2], [7, 3, 8, 1]])
    scores = contrast_scores(anchor, memory, idx, 0.07)
    M, A = memory.tolist(), anchor.tolist()
    want = [[math.exp(dot(M[i], A[b]) / 0.07) for i in idx[b].tolist()] for b in range(3)]
    torch.testing.assert_close(scores, torch.tensor(want, dtype=D64), rtol=1e-12, atol=0)
    z = 123.0
    assert nce_loss(scores / z, 10).item() == pytest.approx(reference_nce(want, z, 10), rel=1e-12)


def test_crd_gradcheck() -> None:
    memory = F.normalize(randn(10, 4, seed=52), dim=1)
    idx = torch.tensor([[0, 4, 5, 9], [1, 0, 0, 2]])
    raw = randn(2, 4, seed=53).requires_grad_()
    assert gradcheck(lambda x: nce_loss(contrast_scores(F.normalize(x, dim=1), memory, idx, 0.5) / 7.0, 10), (raw,))


def test_negatives_are_uniform_over_the_other_samples() -> None:
    pos = torch.tensor([0, 3, 4, 4])
    idx = sample_contrast_indices(pos, 5, 4000)
    assert idx.shape == (4, 4001)
    assert torch.equal(idx[:, 0], pos)
    neg = idx[:, 1:]
    assert (neg != pos[:, None]).all() and neg.min() >= 0 and neg.max() < 5
    for row, p in zip(neg, pos.tolist()):
        counts = torch.bincount(row, minlength=5).float()
        others = [i for i in range(5) if i != p]
        assert counts[p] == 0 and (counts[others] / 4000 - 0.25).abs().max() < 0.04


def test_momentum_update_rows() -> None:
    memory = randn(6, 3, seed=54)
    before = memory.clone()
    values = F.normalize(randn(2, 3, seed=55), dim=1)
    momentum_update(memory, torch.tensor([4, 1]), values, 0.5)
    for row, i in enumerate([4, 1]):
        want = l2_normalise([0.5 * a + 0.5 * b for a, b in zip(before[i].tolist(), values[row].tolist())])
        torch.testing.assert_close(memory[i], torch.tensor(want, dtype=D64))
    for i in (0, 2, 3, 5):
        assert torch.equal(memory[i], before[i])


def test_crd_forward_value_memory_and_z() -> None:
    n, b = 20, 4
    method = CRD(CRD.Options(nce_k=6), crd_context(n))
    assert method.k == 6 and (method.z < 0).all()
    s_pre, t_pre = randn(b, 5, seed=56).float().requires_grad_(), randn(b, 7, seed=57).float()
    indices = torch.tensor([3, 0, 19, 7])
    mem_s, mem_t = method.memory_s.clone(), method.memory_t.clone()

    torch.manual_seed(1)
    idx = sample_contrast_indices(indices, n, 6)  # the draw the method will make with the same seed
    torch.manual_seed(1)
    out = method(output([], s_pre), output([], t_pre), None, indices, 0.0)["crd"]

    def embed(x, linear):
        w, bias = linear.weight.tolist(), linear.bias.tolist()
        return [l2_normalise([dot(wr, row) + bb for wr, bb in zip(w, bias)]) for row in x.tolist()]

    v_s, v_t = embed(s_pre, method.embed_s.linear), embed(t_pre, method.embed_t.linear)
    scores_s = [[math.exp(dot(mem_t[i].tolist(), v_s[r]) / 0.07) for i in idx[r].tolist()] for r in range(b)]
    scores_t = [[math.exp(dot(mem_s[i].tolist(), v_t[r]) / 0.07) for i in idx[r].tolist()] for r in range(b)]
    z_s = n * sum(map(sum, scores_s)) / (b * 7)  # Z = N * mean score over the first batch
    z_t = n * sum(map(sum, scores_t)) / (b * 7)
    assert method.z.tolist() == pytest.approx([z_s, z_t], rel=1e-5)
    want = 0.8 * (reference_nce(scores_s, z_s, n) + reference_nce(scores_t, z_t, n))
    assert out.item() == pytest.approx(want, rel=1e-5)

    # memory: the batch's rows move halfway to the new embeddings and stay unit-norm; the rest is untouched
    rest = torch.ones(n, dtype=torch.bool)
    rest[indices] = False
    for bank, old, v in ((method.memory_s, mem_s, v_s), (method.memory_t, mem_t, v_t)):
        for r, i in enumerate(indices.tolist()):
            want_row = l2_normalise([0.5 * a + 0.5 * c for a, c in zip(old[i].tolist(), v[r])])
            assert bank[i].tolist() == pytest.approx(want_row, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(bank[indices].norm(dim=1), torch.ones(b))
        assert torch.equal(bank[rest], old[rest])

    # gradients reach both embeddings and the student's features
    out.backward()
    for p in (method.embed_s.linear.weight, method.embed_t.linear.weight, s_pre):
        assert p.grad is not None and p.grad.abs().sum() > 0

    # Z is fixed after the first batch
    z = method.z.clone()
    method(
        output([], randn(b, 5, seed=58).float()),
        output([], randn(b, 7, seed=59).float()),
        None,
        torch.tensor([1, 2, 5, 6]),
        1.0,
    )
    assert torch.equal(method.z, z)


def test_crd_state_restores_z_and_banks() -> None:
    n = 12
    a = CRD(CRD.Options(), crd_context(n))
    assert a.k == n - 1  # 16384 negatives clipped to N - 1
    a(output([], torch.randn(4, 5)), output([], torch.randn(4, 7)), None, torch.tensor([0, 1, 2, 3]), 0.0)
    state = a.state_dict()
    assert {"memory_s", "memory_t", "z", "embed_s.linear.weight", "embed_t.linear.weight"} <= set(state)
    b = CRD(CRD.Options(), crd_context(n))
    b.load_state_dict(state)
    b(output([], torch.randn(4, 5)), output([], torch.randn(4, 7)), None, torch.tensor([4, 5, 6, 7]), 0.0)
    assert torch.equal(b.z, a.z)  # a restored Z is kept, not re-estimated
    assert torch.equal(b.memory_s[:4], a.memory_s[:4])
    assert not torch.equal(b.memory_s[4:8], a.memory_s[4:8])


def test_crd_eval_mode_leaves_memory_alone() -> None:
    m = CRD(CRD.Options(), crd_context(10)).eval()
    before = m.memory_s.clone()
    out = m(output([], torch.randn(3, 5)), output([], torch.randn(3, 7)), None, torch.tensor([0, 1, 2]), 0.0)["crd"]
    assert torch.isfinite(out) and torch.equal(m.memory_s, before)


def _crd_ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial banks on every rank, as DDP's broadcast would give
        method = CRD(CRD.Options(nce_k=5), crd_context(12))
        torch.manual_seed(rank + 1)
        indices = torch.tensor([0, 1, 2]) if rank == 0 else torch.tensor([5, 6])  # shards may differ in size
        b = len(indices)
        method(output([], torch.randn(b, 5)), output([], torch.randn(b, 7)), None, indices, 0.0)
        torch.save(dict(method.named_buffers()), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_crd_banks_stay_identical_across_ddp_ranks(tmp_path) -> None:
    """Each rank updates the rows of every rank's batch, so the banks never diverge."""
    # fork where it is safe (Linux): the children need not re-import torch (seconds on a busy runner)
    method = "fork" if sys.platform == "linux" else "spawn"
    torch.multiprocessing.start_processes(
        _crd_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method=method
    )
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    initial = CRD(CRD.Options(nce_k=5), crd_context(12))
    updated = torch.zeros(12, dtype=torch.bool)
    updated[[0, 1, 2, 5, 6]] = True
    for name in ("memory_s", "memory_t"):
        assert torch.equal(r0[name], r1[name])
        assert torch.equal(r0[name][~updated], getattr(initial, name)[~updated])
        assert not torch.isclose(r0[name][updated], getattr(initial, name)[updated]).all(dim=1).any()
    assert torch.equal(r0["z"], r1["z"]) and (r0["z"] > 0).all()


def test_crd_needs_the_training_set_size() -> None:
    with pytest.raises(ConfigError, match="training set size"):
        CRD(CRD.Options(), crd_context(num_samples=-1))


# ----------------------------------------------------------------- inside a Distillation task


def test_method_parameters_are_trained_and_checkpointed() -> None:
    student, teacher = kdistill.create_model("seed_student"), kdistill.create_model("seed_teacher")
    ctx = MethodContext(feature_shapes(student, (3, 32, 32)), feature_shapes(teacher, (3, 32, 32)), 10, 40, 1)
    fitnets, crd = FitNets(FitNets.Options(), ctx), CRD(CRD.Options(), ctx)
    task = Distillation(student, teacher, {"fitnets": fitnets, "crd": crd}, alpha=0.9, ce_weight=0.1)
    params = {id(p) for p in task.parameters()}
    own = [*fitnets.regressor.parameters(), *crd.embed_s.parameters(), *crd.embed_t.parameters()]
    assert own and all(id(p) in params for p in own)
    assert not any(id(p) in params for p in teacher.parameters())
    state = task.state_dict()
    for key in (
        "methods.crd.memory_s",
        "methods.crd.memory_t",
        "methods.crd.z",
        "methods.fitnets.regressor.bn.running_mean",
    ):
        assert key in state

    batch = Batch(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)), torch.arange(8) * 5)
    task.train()
    _, losses = task(batch, 0.0)
    assert set(losses) == {"ce", "fitnets", "crd"}
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in own)


# ------------------------------------------------------------------------- end to end, tiny

# Feature methods are weighted as KD is (alpha 0.9, CE 0.1): with CE alone at 0.1 the
# student gains only ~6 points here, so passing shows the method's own term teaches. CRD is
# the exception: its memory banks start random and each row is refreshed once per epoch, so
# in two epochs its term cannot teach yet (it pulls embeddings towards random rows). It gets
# RepDistiller's recipe instead (CE weight 1, alpha 1) with its term at a quarter weight; at
# full weight it still trains but gains less than CE alone (~10 vs ~18 points), which is the
# expected start of a 240-epoch recipe, not a failure.
KD_STYLE = {"alpha": 0.9, "ce_weight": 0.1}
E2E = {
    "fitnets": (FitNets, {}, KD_STYLE),
    "at": (AT, {}, KD_STYLE),
    "sp": (SP, {}, KD_STYLE),
    "rkd": (RKD, {}, KD_STYLE),
    "pkt": (PKT, {}, KD_STYLE),
    "crd": (CRD, {"weight": 0.25}, {"alpha": 1.0, "ce_weight": 1.0}),
}
E2E_BATCH = 32


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """cifar10-mini subsets (the files are sorted by class, so subsets are strided) and a
    seed teacher trained on 1250 images for two epochs; students learn from 1000."""
    cache = None if os.environ.get("KDISTILL_CACHE") else tmp_path_factory.mktemp("kdistill-cache")
    ds = kdistill.load_dataset("cifar10-mini", data_dir=cache)
    test = {"test_images": ds.test_images[::2], "test_labels": ds.test_labels[::2]}  # 500, 50 per class
    teacher_ds = dataclasses.replace(ds, train_images=ds.train_images[::4], train_labels=ds.train_labels[::4], **test)
    student_ds = dataclasses.replace(ds, train_images=ds.train_images[::5], train_labels=ds.train_labels[::5], **test)
    torch.manual_seed(0)
    teacher = kdistill.create_model("seed_teacher")
    kdistill.train(teacher, teacher_ds, epochs=2, device="cpu", batch_size=E2E_BATCH)
    return student_ds, teacher


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(E2E))
def test_end_to_end_tiny(name: str, mini) -> None:
    data, teacher = mini
    cls, options, weights = E2E[name]
    cpu = torch.device("cpu")
    cfg = make_train_config(epochs=2, grad_clip=5.0, batch_size=E2E_BATCH)
    prepared = prepare_data(data, cfg=cfg, device=cpu)
    torch.manual_seed(0)
    student = kdistill.create_model("seed_student")
    test = prepared.eval_sets["test"]
    before = quick_metrics(predict(student, test), test.labels)["top1"]
    context = MethodContext(
        student=feature_shapes(student, (3, 32, 32)),
        teacher=feature_shapes(teacher, (3, 32, 32)),
        num_classes=prepared.num_classes,
        num_samples=prepared.num_samples,
        epochs=cfg.epochs,
    )
    task = Distillation(student, teacher, {name: cls(cls.Options(**options), context)}, **weights)
    result = fit(task, prepared.loader, cfg, device=cpu, eval_sets=prepared.eval_sets)
    after = result.history[-1]["test_top1"]
    assert all(math.isfinite(v) for k, v in result.history[-1].items() if k.startswith("train_"))
    assert after > before + 10, f"{name}: test accuracy {before:.1f}% -> {after:.1f}%"


@pytest.mark.parametrize(("n", "k"), [(1000, 7), (20, 31)])  # the bank larger than the sample, and smaller
def test_crd_scores_both_ways_equal_the_formula(n: int, k: int) -> None:
    from kdistill.methods.crd import contrast_scores, sample_contrast_indices

    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(n, 8, generator=g, dtype=torch.float64), dim=1)
    anchor = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    idx = sample_contrast_indices(torch.tensor([0, 3, 5, 9]), n, k)
    want = torch.stack(
        [torch.stack([torch.exp(memory[j] @ anchor[i] / 0.07) for j in idx[i].tolist()]) for i in range(4)]
    )
    got = contrast_scores(anchor, memory, idx, 0.07)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got.log().sum(), anchor)
    (g_want,) = torch.autograd.grad(want.log().sum(), anchor)
    torch.testing.assert_close(g_got, g_want)
