"""Probabilistic knowledge transfer, Passalis & Tefas, "Learning Deep Representations with
Probabilistic Knowledge Transfer", ECCV 2018 (arXiv:1803.10837).

The batch's embeddings x (B, D) define, through a cosine-similarity kernel, conditional
probabilities p_{j|i} of "sample j is a neighbour of sample i"; the student matches the
teacher's by minimising the KL divergence between them:

    x_i <- x_i / (||x_i|| + eps)
    K_ij = (cos(x_i, x_j) + 1) / 2                    in [0, 1]
    p_{j|i} = K_ij / sum_k K_ik
    L_pkt = beta * mean_{i,j} p^t_{j|i} * log( (p^t_{j|i} + eps) / (p^s_{j|i} + eps) ),   eps = 1e-7

Note the mean over all B^2 entries: this is the authors' code as used by
HobbitLong/RepDistiller (``distiller_zoo/PKT.py``, "code from author"), checked line by
line, and the weight beta = 30000 is RepDistiller's (``-b 30000``) for that convention
(with its batch size 64). It equals (1/B) * the batch mean of the row-wise KL divergences
sum_j p^t log(p^t / p^s), so the term's scale falls as 1/B with the batch size; divide
``beta`` accordingly if you want the per-row KL at a different batch size. Embeddings:
the pooled features (``feat[-1]`` in RepDistiller), i.e. the pre-logits here.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from kdistill.methods.shared import EmbeddingMethod, EmbeddingOptions
from kdistill.models.base import ModelOutput


def pkt_probabilities(x: Tensor, eps: float = 1e-7) -> Tensor:
    """(B, D) -> (B, B): row i holds p_{j|i} from the cosine kernel (cos + 1) / 2."""
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    k = (x @ x.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


def pkt_loss(x_s: Tensor, x_t: Tensor, eps: float = 1e-7) -> Tensor:
    """mean_{i,j} p_t log((p_t + eps) / (p_s + eps)) over the B x B conditional probabilities.
    x_s: (B, D_s), x_t: (B, D_t)."""
    p_s, p_t = pkt_probabilities(x_s, eps), pkt_probabilities(x_t, eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


class PKTOptions(EmbeddingOptions):
    beta: float = Field(30000.0, ge=0)
    """Reference weight, applied inside the term (on top of ``weight``)."""


class PKT(EmbeddingMethod):
    name = "pkt"
    Options = PKTOptions

    def forward(self, student: ModelOutput, teacher: ModelOutput, labels, indices, epoch) -> dict[str, Tensor]:
        x_s, x_t = self.embeddings(student, teacher)  # (B, D) float32 each
        with torch.autocast(x_s.device.type, enabled=False):  # similarities in float32
            loss = pkt_loss(x_s, x_t)
        return {"pkt": self.options.beta * loss}
