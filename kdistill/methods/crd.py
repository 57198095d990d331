"""Contrastive representation distillation, Tian, Krishnan & Isola, "Contrastive
Representation Distillation", ICLR 2020 (arXiv:1910.10699).

Both models' pre-logits are embedded by learned linear maps into a shared d = 128 space
and L2-normalised: v_s = g_s(s) / ||g_s(s)||, v_t likewise. Two memory banks M_s, M_t
(N x d, one row per training sample, N = training set size) hold momentum averages of past
embeddings and supply negatives. For an anchor v and a bank M, with the sample's own row
i_0 (the positive) and K rows i_1..i_K drawn at random (the negatives):

    P(i | v) = exp(<M_i, v> / tau) / Z              (Z: estimated once, see below)
    h(P) = P / (P + K / N)                          ("probability the pair is real")
    L_nce(v, M) = -1/B sum_b [ log h(P(i_0 | v_b)) + sum_{k=1..K} log(1 - h(P(i_k | v_b))) ]
    L_crd = beta * ( L_nce(v_s, M_t) + L_nce(v_t, M_s) )

(1 - h = (K/N) / (P + K/N); eps = 1e-7 is added to both denominators as in the
reference.) After the loss, the batch's rows are updated without gradient:
M[i] <- normalise(m * M[i] + (1 - m) * v_i), momentum m = 0.5.

Conventions checked against HobbitLong/RepDistiller (``crd/criterion.py``,
``crd/memory.py``, ``helper/loops.py``) and mdistiller's CRD:

- Banks start uniform in [-stdv, stdv], stdv = 1 / sqrt(d / 3) (rows of about unit norm),
  and are buffers: saved in checkpoints, moved by ``.to(device)``.
- Z = N * mean(exp(<M_i, v> / tau)) over the first batch's scores, one per direction,
  then fixed (a buffer, so a resumed run keeps it; -1 until set).
- Student anchors are scored against the *teacher* bank and vice versa; both NCE terms
  are summed. K = 16384 negatives per anchor, tau = 0.07, beta = 0.8 (the paper's weight).
- Negatives: the references draw them in the data loader from the samples of *other
  classes* (RepDistiller's ``cls_negative``), or uniformly over all N (its AliasMethod
  fallback). Here they are drawn uniformly (``torch.randint`` on the training device) over
  the N - 1 samples other than the positive, with replacement, so a few may share the
  anchor's class. K is clipped to N - 1 for small data sets (draws are with replacement,
  so this only keeps the noise ratio K/N below 1).
- Under ``torch.distributed``, the memory update and the Z estimate gather every rank's
  batch, so all ranks keep identical banks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from kdistill.distributed import all_gather_rows as _all_gather_rows
from kdistill.errors import ConfigError
from kdistill.methods.base import Method, MethodContext, MethodOptions
from kdistill.models.base import ModelOutput

_EPS = 1e-7


def contrast_scores(anchor: Tensor, memory: Tensor, sample_idx: Tensor, temperature: float) -> Tensor:
    """Unnormalised exp(<M_i, v> / tau) of each anchor against its positive and negatives.

    anchor: (B, d) unit vectors; memory: (N, d); sample_idx: (B, 1 + K), column 0 the
    positive. Returns (B, 1 + K). The bank rows are constants (no gradient).
    """
    b, k1 = sample_idx.shape
    memory = memory.detach()
    if b * k1 > memory.shape[0]:
        # more sampled rows than the bank has (CIFAR: 128 x 16,385 against 50,000): gathering
        # them would copy B x (1+K) x d floats (1 GB) every step; scoring the anchors against
        # the whole bank once (one matrix product) and picking the sampled scores gives the same
        # number, many times cheaper, most of all on a CPU. (The product's backward needs the
        # bank as it is now, and the bank is updated in place before the backward: a copy.)
        dots = (anchor @ memory.clone().t()).gather(1, sample_idx)  # (B, N) -> (B, 1+K)
    else:
        rows = memory.index_select(0, sample_idx.reshape(-1)).view(b, k1, -1)  # (B, 1+K, d)
        dots = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
    return torch.exp(dots / temperature)


def nce_loss(probs: Tensor, num_samples: int) -> Tensor:
    """NCE loss (the paper's Eq. 18 in the reference's form) of normalised scores P (B, 1 + K),
    column 0 the positive, against uniform noise 1/N with K noise samples per positive."""
    b, k1 = probs.shape
    noise = (k1 - 1) / num_samples  # K * P_n
    log_pos = torch.log(probs[:, 0] / (probs[:, 0] + noise + _EPS))
    log_neg = torch.log(noise / (probs[:, 1:] + noise + _EPS))
    return -(log_pos.sum() + log_neg.sum()) / b


def sample_contrast_indices(indices: Tensor, num_samples: int, k: int) -> Tensor:
    """(B,) positives -> (B, 1 + K): the positive, then K indices drawn uniformly, with
    replacement, from the other N - 1 samples (on the indices' device)."""
    neg = torch.randint(0, num_samples - 1, (indices.shape[0], k), device=indices.device)
    neg += (neg >= indices.unsqueeze(1)).long()  # skip the positive: uniform over the others
    return torch.cat([indices.unsqueeze(1), neg], dim=1)


@torch.no_grad()
def momentum_update(memory: Tensor, indices: Tensor, values: Tensor, momentum: float) -> None:
    """memory[i] <- normalise(m * memory[i] + (1 - m) * v) for the given rows, in place."""
    rows = memory.index_select(0, indices) * momentum + values.to(memory.dtype) * (1 - momentum)
    memory.index_copy_(0, indices, F.normalize(rows, dim=1))


class Embed(nn.Module):
    """Linear map to the contrast space, then L2 normalisation: (B, D) -> (B, d)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


class CRDOptions(MethodOptions):
    feat_dim: int = Field(128, gt=0)
    nce_k: int = Field(16384, gt=0)
    """Negatives per anchor (clipped to N - 1)."""
    nce_t: float = Field(0.07, gt=0)
    nce_m: float = Field(0.5, ge=0, lt=1)
    """Momentum of the memory banks."""
    beta: float = Field(0.8, ge=0)
    """Paper weight, applied inside the term (on top of ``weight``)."""


class CRD(Method):
    name = "crd"
    Options = CRDOptions
    needs_features = True

    memory_s: Tensor
    memory_t: Tensor
    z: Tensor

    def __init__(self, options: CRDOptions, context: MethodContext):
        super().__init__(options, context)
        n = context.num_samples
        if n < 2:
            raise ConfigError(
                f"crd: needs the training set size (got {n}); it indexes one memory row per sample, "
                "so train on an ImageDataset or a pair of tensors, not an iterable of batches"
            )
        self.num_samples = n
        self.k = min(options.nce_k, n - 1)
        d = options.feat_dim
        self.embed_s = Embed(context.student.pre_logits.shape[1], d)
        self.embed_t = Embed(context.teacher.pre_logits.shape[1], d)
        stdv = 1.0 / math.sqrt(d / 3)  # uniform(-stdv, stdv) rows have E||row||^2 = 1
        self.register_buffer("memory_s", torch.rand(n, d).mul_(2 * stdv).sub_(stdv))  # student embeddings (N, d)
        self.register_buffer("memory_t", torch.rand(n, d).mul_(2 * stdv).sub_(stdv))  # teacher embeddings (N, d)
        self.register_buffer("z", torch.full((2,), -1.0))  # normalisation constants (student anchor, teacher anchor)
        self._z_checked = False

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices: Tensor, epoch) -> dict[str, Tensor]:
        o = self.options
        with torch.autocast(indices.device.type, enabled=False):  # exp(<.,.>/0.07) needs float32
            v_s = self.embed_s(student.pre_logits.float())  # (B, d)
            v_t = self.embed_t(teacher.pre_logits.float())  # (B, d)
            idx = sample_contrast_indices(indices, self.num_samples, self.k)  # (B, 1+K)
            scores_s = contrast_scores(v_s, self.memory_t, idx, o.nce_t)  # student anchors, teacher bank
            scores_t = contrast_scores(v_t, self.memory_s, idx, o.nce_t)  # teacher anchors, student bank
            if not self._z_checked:
                self._set_z(scores_s, scores_t)
            loss = nce_loss(scores_s / self.z[0], self.num_samples) + nce_loss(scores_t / self.z[1], self.num_samples)
            if self.training:
                all_idx = _all_gather_rows(indices)
                momentum_update(self.memory_s, all_idx, _all_gather_rows(v_s.detach()), o.nce_m)
                momentum_update(self.memory_t, all_idx, _all_gather_rows(v_t.detach()), o.nce_m)
        return {"crd": o.beta * loss}

    @torch.no_grad()
    def _set_z(self, scores_s: Tensor, scores_t: Tensor) -> None:
        """Estimate Z = N * mean score on the first batch (once per run; a loaded Z is kept)."""
        if bool((self.z < 0).any()):  # one host sync, on the first call only
            est = torch.stack([scores_s.mean(), scores_t.mean()]) * self.num_samples
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(est)
                est /= dist.get_world_size()
            self.z.copy_(torch.where(self.z < 0, est, self.z))
        self._z_checked = True
