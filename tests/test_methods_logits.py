"""Logit-based methods (DKD, logit standardisation, DIST) against their papers' formulas.

Every reference value below is computed independently of the implementation: explicit
probabilities, logs and sums in float64 (or ``torch.corrcoef`` for Pearson), never the
implementation's helpers. The end-to-end tests distill a real (tiny) student on the
bundled cifar10-mini images.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdistill
from kdistill.api import make_train_config, prepare_data
from kdistill.data.dataset import ImageDataset
from kdistill.engine import fit, predict
from kdistill.errors import ConfigError
from kdistill.methods.base import MethodContext
from kdistill.methods.dist import DIST, DISTOptions, dist_loss
from kdistill.methods.dkd import DKD, DKDOptions, dkd_loss
from kdistill.methods.kd import KD, KDOptions, kd_loss
from kdistill.methods.logit_std import LogitStdKD, LogitStdKDOptions
from kdistill.methods.shared import standardize
from kdistill.models.base import ModelOutput, feature_shapes
from kdistill.tasks import Distillation

F64 = torch.float64


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def out(logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits, [], logits)


def context(num_classes: int = 5, epochs: int = 30) -> MethodContext:
    return MethodContext(out(torch.zeros(2, num_classes)), out(torch.zeros(2, num_classes)), num_classes, 100, epochs)


def softmax_explicit(z: list[float], T: float) -> list[float]:
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def kl_explicit(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def zscore_explicit(row: list[float]) -> list[float]:
    """(v - mean) / sample standard deviation (K - 1 in the denominator, as torch.std)."""
    m = sum(row) / len(row)
    sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
    return [(v - m) / sd for v in row]


# ---------------------------------------------------------------------------- DKD


def dkd_explicit(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float) -> tuple[float, float]:
    """Unweighted (TCKD, NCKD) of the paper, from probabilities, sample by sample."""
    tckd = nckd = 0.0
    for zs, zt, c in zip(s.tolist(), t.tolist(), y.tolist()):
        ps, pt = softmax_explicit(zs, T), softmax_explicit(zt, T)
        tckd += kl_explicit([pt[c], 1 - pt[c]], [ps[c], 1 - ps[c]]) * T**2
        hat_s = softmax_explicit([v for j, v in enumerate(zs) if j != c], T)
        hat_t = softmax_explicit([v for j, v in enumerate(zt) if j != c], T)
        nckd += kl_explicit(hat_t, hat_s) * T**2
    return tckd / len(y), nckd / len(y)


def test_dkd_matches_paper_formula() -> None:
    s = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.5], [0.3, 0.2, -2.0, 4.0, 1.0], [-1.0, 0.0, 1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 1.0, -1.0, 0.5], [0.0, 1.0, -1.0, 5.0, 2.0], [0.5, 0.5, 0.0, 1.0, 6.0]])
    y = torch.tensor([0, 3, 1])  # the last sample's target is not the teacher's top class
    for T in (1.0, 4.0):
        ref_t, ref_n = dkd_explicit(s, t, y, T)
        tckd, nckd = dkd_loss(s.to(F64), t.to(F64), y, alpha=1.0, beta=1.0, temperature=T)
        assert tckd.item() == pytest.approx(ref_t, rel=1e-10)
        assert nckd.item() == pytest.approx(ref_n, rel=1e-10)
        tckd, nckd = dkd_loss(s.to(F64), t.to(F64), y, alpha=0.5, beta=8.0, temperature=T)
        assert tckd.item() == pytest.approx(0.5 * ref_t, rel=1e-10)
        assert nckd.item() == pytest.approx(8.0 * ref_n, rel=1e-10)
        # float32 agrees to its precision (TCKD is a small difference of O(1) logs)
        tckd32, nckd32 = dkd_loss(s, t, y, 1.0, 1.0, T)
        assert tckd32.item() == pytest.approx(ref_t, rel=1e-4)
        assert nckd32.item() == pytest.approx(ref_n, rel=1e-4)


def test_kd_decomposes_into_tckd_and_nckd() -> None:
    """The paper's Eq. (7): KD = TCKD + (1 - p_y^teacher) * NCKD, per sample."""
    s, t = torch.randn(1, 7, dtype=F64) * 3, torch.randn(1, 7, dtype=F64) * 3
    y, T = torch.tensor([2]), 3.0
    tckd, nckd = dkd_loss(s, t, y, 1.0, 1.0, T)
    p_y = torch.softmax(t / T, dim=1)[0, 2]
    assert kd_loss(s, t, T).item() == pytest.approx((tckd + (1 - p_y) * nckd).item(), rel=1e-10)


def test_dkd_confident_logits_stay_finite() -> None:
    """A student 250 nats sure of the target at T=4: 1 - p_y underflows in float32."""
    T = 4.0
    s = torch.tensor([[1000.0, 0.0, 0.0, 0.0], [0.0, 0.0, -3.0, 1000.0]], requires_grad=True)
    t = torch.tensor([[8.0, 1.0, 0.0, -1.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([0, 3])

    # the naive computation (probabilities, then their log) is not finite here
    p = torch.softmax(s.detach() / T, dim=1)
    p_y = p.gather(1, y[:, None])
    naive = (torch.softmax(t / T, 1).gather(1, y[:, None]).neg() + 1) * (-torch.log(1 - p_y))
    assert not torch.isfinite(naive).all()

    tckd, nckd = dkd_loss(s, t, y, 1.0, 8.0, T)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd) and torch.isfinite(nckd)
    assert torch.isfinite(s.grad).all()

    # exact values: log(1 - p_y) = lse(non-target) - lse(all) by hand, in float64
    tckd_ref = nckd_ref = 0.0
    for zs, zt, c in zip(s.tolist(), t.tolist(), y.tolist()):
        others = [v / T for j, v in enumerate(zs) if j != c]
        m = zs[c] / T  # dominates every other logit by > 200 nats
        log_other = math.log(sum(math.exp(v) for v in others))
        log_all = m + math.log1p(sum(math.exp(v - m) for v in others))
        log_bs = [m - log_all, log_other - log_all]
        pt = softmax_explicit(zt, T)
        bt = [pt[c], 1 - pt[c]]
        tckd_ref += sum(b * (math.log(b) - lb) for b, lb in zip(bt, log_bs)) * T**2 / 2
        hat_s = softmax_explicit([v for j, v in enumerate(zs) if j != c], T)
        hat_t = softmax_explicit([v for j, v in enumerate(zt) if j != c], T)
        nckd_ref += kl_explicit(hat_t, hat_s) * T**2 / 2
    assert tckd.item() == pytest.approx(tckd_ref, rel=1e-5)
    assert nckd.item() == pytest.approx(8.0 * nckd_ref, rel=1e-5)

    # the same with the teacher as sure as the student: gradients still finite (no 0 * inf)
    s2 = s.detach().clone().requires_grad_(True)
    tckd, nckd = dkd_loss(s2, s.detach() + 1.0, y, 1.0, 8.0, T)
    (tckd + nckd).backward()
    assert torch.isfinite(tckd + nckd) and torch.isfinite(s2.grad).all()


def test_dkd_gradcheck() -> None:
    s = torch.randn(3, 6, dtype=F64, requires_grad=True)
    t = torch.randn(3, 6, dtype=F64) * 2
    y = torch.tensor([0, 5, 2])
    assert torch.autograd.gradcheck(lambda x: torch.stack(dkd_loss(x, t, y, 1.0, 8.0, 4.0)), (s,))
    assert torch.autograd.gradcheck(lambda x: torch.stack(dkd_loss(x, t, y, 0.3, 2.0, 1.0)), (s,))


@pytest.mark.parametrize("epoch, factor", [(0, 0.0), (10, 0.5), (20, 1.0), (30, 1.0)])
def test_dkd_warmup(epoch: float, factor: float) -> None:
    method = DKD(DKDOptions(warmup_epochs=20), context())
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    tckd, nckd = dkd_loss(s, t, y, 1.0, 8.0, 4.0)
    terms = method(out(s), out(t), y, torch.arange(4), epoch)
    assert set(terms) == {"dkd_tckd", "dkd_nckd"}
    assert terms["dkd_tckd"].item() == pytest.approx(factor * tckd.item(), rel=1e-6, abs=1e-12)
    assert terms["dkd_nckd"].item() == pytest.approx(factor * nckd.item(), rel=1e-6, abs=1e-12)


def test_dkd_options() -> None:
    o = DKDOptions()
    assert (o.alpha, o.beta, o.temperature, o.warmup_epochs, o.logit_std, o.weight) == (1.0, 8.0, 4.0, None, False, 1.0)
    with pytest.raises(ValueError):
        DKDOptions(warmup=5)  # unknown key
    no_warmup = DKD(DKDOptions(warmup_epochs=0), context())
    s, t, y = torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 4])
    assert no_warmup(out(s), out(t), y, torch.arange(2), 0.0)["dkd_nckd"] > 0


@pytest.mark.parametrize("epochs, expected", [(240, 20.0), (15, 1.25), (30, 2.5)])
def test_dkd_default_warmup_is_the_papers_share_of_the_run(epochs: int, expected: float) -> None:
    assert DKD(DKDOptions(), context(epochs=epochs)).warmup_epochs == expected  # the paper: 20 of 240 epochs


def test_dkd_warmup_longer_than_the_run_is_refused() -> None:
    """A 20-epoch warm-up in a 15-epoch run would never reach full weight: refused, not ignored."""
    with pytest.raises(ConfigError, match=r"dkd\.warmup_epochs: 20 is longer than the run's 15 epochs.*1\.25"):
        DKD(DKDOptions(warmup_epochs=20), context(epochs=15))
    assert DKD(DKDOptions(warmup_epochs=15), context(epochs=15)).warmup_epochs == 15


def test_dkd_logit_std_option() -> None:
    s, t, y = torch.randn(3, 5, dtype=F64), torch.randn(3, 5, dtype=F64) * 4, torch.tensor([0, 1, 2])
    method = DKD(DKDOptions(logit_std=True, warmup_epochs=0), context())
    terms = method(out(s), out(t), y, torch.arange(3), 5.0)
    zs = torch.tensor([zscore_explicit(r) for r in s.tolist()], dtype=F64)
    zt = torch.tensor([zscore_explicit(r) for r in t.tolist()], dtype=F64)
    ref_t, ref_n = dkd_explicit(zs, zt, y, 4.0)
    # up to eps = 1e-7 in the denominator of the z-score
    assert terms["dkd_tckd"].item() == pytest.approx(ref_t, rel=1e-6)
    assert terms["dkd_nckd"].item() == pytest.approx(8.0 * ref_n, rel=1e-6)


# ----------------------------------------------------------------- standardisation


def test_standardize_matches_z_score() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, -10.0, 0.0, 0.0]], dtype=F64)
    # row 1: mean 2.5, sample std sqrt(5/3); row 2: mean 0, sample std sqrt(200/3)
    expected = torch.tensor(
        [[(v - 2.5) / math.sqrt(5 / 3) for v in (1, 2, 3, 4)], [v / math.sqrt(200 / 3) for v in (10, -10, 0, 0)]],
        dtype=F64,
    )
    torch.testing.assert_close(standardize(z, eps=0.0), expected)
    torch.testing.assert_close(standardize(z), expected, rtol=1e-6, atol=0)


def test_standardize_constant_row_is_finite() -> None:
    z = torch.full((2, 5), 3.0, requires_grad=True)
    y = standardize(z)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.equal(y.detach(), torch.zeros(2, 5))
    assert torch.isfinite(z.grad).all()


def kd_std_explicit(s: torch.Tensor, t: torch.Tensor, T: float) -> float:
    rows = zip(s.tolist(), t.tolist())
    total = sum(
        kl_explicit(softmax_explicit(zscore_explicit(rt), T), softmax_explicit(zscore_explicit(rs), T))
        for rs, rt in rows
    )
    return total / len(s) * T**2


def test_kd_with_logit_std_matches_formula() -> None:
    # float32: the KD method computes in float32 whatever it is given
    s = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, 9.0]])
    t = torch.tensor([[30.0, 0.0, 10.0, -5.0], [1.0, 1.5, 0.0, 2.0]])
    for method, T in (
        (KD(KDOptions(logit_std=True, temperature=3.0), context(4)), 3.0),
        (LogitStdKD(LogitStdKDOptions(), context(4)), 2.0),
    ):
        terms = method(out(s), out(t), torch.tensor([0, 3]), torch.arange(2), 0.0)
        assert list(terms) == [method.name]
        assert terms[method.name].item() == pytest.approx(kd_std_explicit(s, t, T), rel=1e-5)
    # without the option KD is unchanged
    plain = KD(KDOptions(), context(4))(out(s), out(t), torch.tensor([0, 3]), torch.arange(2), 0.0)
    assert plain["kd"].item() == pytest.approx(kd_loss(s, t, 4.0).item(), rel=1e-6)


def test_ls_options() -> None:
    o = LogitStdKDOptions()
    assert o.logit_std and o.temperature == 2.0
    assert LogitStdKD.name == "ls" and not KDOptions().logit_std


@settings(max_examples=25, deadline=None)
@given(a=st.floats(0.01, 100.0), b=st.floats(-1000.0, 1000.0))
def test_logit_std_kd_is_affine_invariant(a: float, b: float) -> None:
    """KD on standardised logits ignores the student's logit scale and shift (float64)."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 10, generator=g, dtype=F64)
    t = torch.randn(4, 10, generator=g, dtype=F64) * 5
    zt = standardize(t)
    # exactly without eps; with the default eps = 1e-7 up to about eps / std, for both sides
    exact = kd_loss(standardize(s, eps=0.0), zt, 2.0).item()
    assert kd_loss(standardize(a * s + b, eps=0.0), zt, 2.0).item() == pytest.approx(exact, rel=1e-9)
    base = kd_loss(standardize(s), zt, 2.0).item()
    assert kd_loss(standardize(a * s + b), zt, 2.0).item() == pytest.approx(base, rel=1e-6 * (1 + 1 / a))
    # plain KD is not invariant: the check above is not vacuous
    if abs(a - 1) > 0.1:
        assert kd_loss(a * s + b, t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-3)


def test_ls_method_is_affine_invariant() -> None:
    """The same through the ``ls`` method, in float32 (its training precision)."""
    s, t = torch.randn(8, 10), torch.randn(8, 10) * 5
    method = LogitStdKD(LogitStdKDOptions(), context(10))
    y, idx = torch.zeros(8, dtype=torch.long), torch.arange(8)
    base = method(out(s), out(t), y, idx, 0.0)["ls"].item()
    for a, b in ((0.1, 3.0), (7.0, -20.0), (1.0, 50.0)):
        assert method(out(a * s + b), out(t), y, idx, 0.0)["ls"].item() == pytest.approx(base, rel=1e-4)


def test_logit_std_gradcheck() -> None:
    s = torch.randn(3, 6, dtype=F64, requires_grad=True)
    t = torch.randn(3, 6, dtype=F64) * 3
    assert torch.autograd.gradcheck(lambda x: standardize(x), (s,))
    assert torch.autograd.gradcheck(lambda x: kd_loss(standardize(x), standardize(t), 2.0), (s,))


# ---------------------------------------------------------------------------- DIST


def dist_explicit(s: torch.Tensor, t: torch.Tensor, T: float) -> tuple[float, float]:
    ys = torch.tensor([softmax_explicit(r, T) for r in s.tolist()], dtype=F64)
    yt = torch.tensor([softmax_explicit(r, T) for r in t.tolist()], dtype=F64)
    rows = [torch.corrcoef(torch.stack([ys[i], yt[i]]))[0, 1].item() for i in range(len(ys))]
    cols = [torch.corrcoef(torch.stack([ys[:, c], yt[:, c]]))[0, 1].item() for c in range(ys.shape[1])]
    return (1 - sum(rows) / len(rows)) * T**2, (1 - sum(cols) / len(cols)) * T**2


def test_dist_matches_paper_formula() -> None:
    s = torch.tensor([[2.0, -1.0, 0.5, 0.0, 1.5], [0.3, 0.2, -2.0, 4.0, 1.0], [-1.0, 0.0, 1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 0.0, 1.0, -1.0, 0.5], [0.0, 1.0, -1.0, 5.0, 2.0], [0.5, 0.5, 0.0, 1.0, 6.0]])
    for T in (1.0, 4.0):
        ref_inter, ref_intra = dist_explicit(s, t, T)
        # eps = 0: the paper's formula exactly
        inter, intra = dist_loss(s.to(F64), t.to(F64), beta=1.0, gamma=1.0, temperature=T, eps=0.0)
        assert inter.item() == pytest.approx(ref_inter, rel=1e-9)
        assert intra.item() == pytest.approx(ref_intra, rel=1e-9)
        inter, intra = dist_loss(s.to(F64), t.to(F64), beta=2.0, gamma=0.5, temperature=T, eps=0.0)
        assert inter.item() == pytest.approx(2.0 * ref_inter, rel=1e-9)
        assert intra.item() == pytest.approx(0.5 * ref_intra, rel=1e-9)
        # the default eps (1e-8, as the reference code) barely moves it, float32 neither
        inter, intra = dist_loss(s, t, beta=1.0, gamma=1.0, temperature=T)
        assert inter.item() == pytest.approx(ref_inter, rel=1e-4)
        assert intra.item() == pytest.approx(ref_intra, rel=1e-4)


def test_dist_zero_when_student_is_teacher() -> None:
    z = torch.randn(8, 10) * 3
    inter, intra = dist_loss(z, z.clone(), 1.0, 1.0, 1.0)
    assert abs(inter.item()) < 1e-5 and abs(intra.item()) < 1e-5
    # and invariant to what Pearson ignores: here a second teacher with the same probabilities
    terms = DIST(DISTOptions(), context(10))(
        out(z), out(z + 7.0), torch.zeros(8, dtype=torch.long), torch.arange(8), 0.0
    )
    assert set(terms) == {"dist_inter", "dist_intra"}
    assert all(abs(v.item()) < 1e-5 for v in terms.values())


def test_dist_gradcheck_and_options() -> None:
    s = torch.randn(4, 6, dtype=F64, requires_grad=True)
    t = torch.randn(4, 6, dtype=F64) * 2
    for T in (1.0, 4.0):
        assert torch.autograd.gradcheck(lambda x, T=T: torch.stack(dist_loss(x, t, 1.0, 2.0, T)), (s,))
    o = DISTOptions()
    assert (o.beta, o.gamma, o.temperature) == (1.0, 1.0, 1.0)
    # a batch of one: the intra-class term is degenerate (constant) but finite
    one = torch.randn(1, 6, requires_grad=True)
    inter, intra = dist_loss(one, torch.randn(1, 6), 1.0, 1.0, 1.0)
    (inter + intra).backward()
    assert torch.isfinite(one.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: DKD(DKDOptions(warmup_epochs=0, logit_std=True), context(10)),
        lambda: DIST(DISTOptions(), context(10)),
        lambda: LogitStdKD(LogitStdKDOptions(), context(10)),
    ],
    ids=["dkd", "dist", "ls"],
)
def test_bf16_logits_are_computed_in_float32(make) -> None:
    """Under bf16 autocast the logits arrive in bf16; the losses are computed in float32."""
    s = (torch.randn(6, 10) * 4).to(torch.bfloat16).requires_grad_(True)
    t = (torch.randn(6, 10) * 4).to(torch.bfloat16)
    y = torch.arange(6) % 10
    terms = make()(out(s), out(t), y, torch.arange(6), 1.0)
    for v in terms.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    sum(terms.values()).backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    # same value as from float32 logits holding the same numbers
    ref = make()(out(s.detach().float()), out(t.float()), y, torch.arange(6), 1.0)
    for k, v in terms.items():
        assert v.item() == pytest.approx(ref[k].item(), rel=1e-6)


# ----------------------------------------------------------------------- end to end

# Small enough for about a minute on two CPU cores, teacher included; batches of 32 give
# 60 optimizer steps per run, enough for the student to clear chance by well over 10 points.
TRAIN_IMAGES, BATCH = 1000, 32


@pytest.fixture(scope="module")
def trained(mini: ImageDataset) -> tuple[ImageDataset, torch.nn.Module, float]:
    """cifar10-mini (``mini``, tests/conftest.py) cut to TRAIN_IMAGES training images, and a
    teacher trained on it for 2 epochs (about 30% test accuracy; chance is 10%)."""
    g = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(mini.train_labels), generator=g)[:TRAIN_IMAGES]
    ds = replace(mini, train_images=mini.train_images[keep], train_labels=mini.train_labels[keep])
    torch.manual_seed(0)
    teacher = kdistill.create_model("seed_teacher")
    result = kdistill.train(teacher, ds, epochs=2, device="cpu", batch_size=BATCH)
    return ds, teacher, result.metrics["top1"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls, options, terms",
    [
        # the paper's 20-epoch warm-up would keep DKD near zero weight for a 2-epoch run
        (DKD, {"warmup_epochs": 1.0}, {"dkd_tckd", "dkd_nckd"}),
        (LogitStdKD, {}, {"ls"}),
        (DIST, {}, {"dist_inter", "dist_intra"}),
    ],
    ids=["dkd", "ls", "dist"],
)
def test_distill_end_to_end(trained, cls, options, terms) -> None:
    ds, teacher, teacher_top1 = trained
    assert teacher_top1 > 20, "the teacher did not learn: the fixture, not the method, is broken"
    device = torch.device("cpu")
    cfg = make_train_config(epochs=2, grad_clip=5.0, batch_size=BATCH)
    prepared = prepare_data(ds, cfg=cfg, device=device)
    torch.manual_seed(1)
    student = kdistill.create_model("seed_student")
    ctx = MethodContext(
        student=feature_shapes(student, prepared.input_shape),
        teacher=feature_shapes(teacher, prepared.input_shape),
        num_classes=prepared.num_classes,
        num_samples=prepared.num_samples,
        epochs=cfg.epochs,
    )
    test_set = prepared.eval_sets["test"]
    initial = (predict(student, test_set).argmax(1) == test_set.labels).float().mean().item() * 100
    task = Distillation(student, teacher, {cls.name: cls(cls.Options(**options), ctx)}, alpha=0.9, ce_weight=0.1)
    result = fit(task, prepared.loader, cfg, device=device, eval_sets=prepared.eval_sets, desc=cls.name)
    last = result.history[-1]
    print(f"{cls.name}: test top-1 {initial:.1f}% -> {last['test_top1']:.1f}% (teacher {teacher_top1:.1f}%)")
    assert last["test_top1"] > initial + 10
    # every term is logged, and finite
    for term in terms | {"ce"}:
        assert math.isfinite(last[f"train_{term}"]), term
