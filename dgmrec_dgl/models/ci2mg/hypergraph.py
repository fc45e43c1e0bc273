r"""Intra-modality generation: prototype-clustering hypergraph convolution (CI2MG Eq. 3–5).

Lin et al., "Contrastive Intra- and Inter-Modality Generation for Enhancing Incomplete Multimedia
Recommendation", MM 2023.

.. math::
    H^m[i, k] = \frac{f_i^{V,m} \cdot e_k^m}{\lVert f_i^{V,m} \rVert_2 \, \lVert e_k^m \rVert_2}
    \quad (\text{Eq. 4}), \qquad
    Q^{m,(l+1)} = \sigma\big(D^{-1} H^m W B^{-1} H^{m\top} Q^{m,(l)}\big) \quad (\text{Eq. 5})

The K learnable prototypes :math:`e_k^m` are the hyperedges; the incidence :math:`H^m` [I, K] says how
strongly item i belongs to cluster k. :math:`D = \mathrm{diag}(H\mathbf 1)` (row sums, one per item) and
:math:`B = \mathrm{diag}(H^\top \mathbf 1)` (column sums, one per hyperedge), a sum of exactly zero replaced
by 1 as in the release. So :math:`D^{-1}H` has rows summing to 1 (an item's membership spread over the
hyperedges) and :math:`B^{-1}H^\top` has rows summing to 1 (a hyperedge's members averaged): node →
hyperedge → node message passing. :math:`W` is a learnable K×K hyperedge weight (the release's bias-free
Linear weight, used untransposed; it works there only because K = d = 64).

The product is never formed as an I×I matrix: :func:`hypergraph_conv` evaluates
:math:`D^{-1}\big(H\,(W\,(B^{-1}(H^\top Q)))\big)` right to left, O(I·K·d) time and O(I·K + K·d) memory.

Incidence variants (``kind``): ``cosine`` is Eq. 4 as released (similarities may be negative, so a row
sum can be near zero); ``positive`` clamps negative similarities to zero, the reading of H as the
membership probability of Eq. 3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INCIDENCES = ("cosine", "positive")


def incidence(items: torch.Tensor, prototypes: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Eq. 4: ``H`` [I, K], cosine similarity of item features [I, d] and prototypes [K, d]."""
    if kind not in INCIDENCES:
        raise ValueError(f"incidence kind must be one of {INCIDENCES}, got {kind!r}")
    h = F.normalize(items, dim=1) @ F.normalize(prototypes, dim=1).T
    return h.clamp_min(0.0) if kind == "positive" else h


def _safe_inverse(sums: torch.Tensor) -> torch.Tensor:
    """``1 / sums`` with sums of exactly zero replaced by 1 (the release's guard)."""
    return 1.0 / torch.where(sums == 0, torch.ones_like(sums), sums)


def node_to_edge(h: torch.Tensor) -> torch.Tensor:
    """``B^{-1} H^T`` [K, I]: each hyperedge's row sums to 1 (or is all zero)."""
    return _safe_inverse(h.sum(dim=0))[:, None] * h.T


def edge_to_node(h: torch.Tensor) -> torch.Tensor:
    """``D^{-1} H`` [I, K]: each item's row sums to 1 (or is all zero)."""
    return _safe_inverse(h.sum(dim=1))[:, None] * h


def hypergraph_conv(q: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``D^{-1} H W B^{-1} H^T q`` without an I×I matrix.

    Args:
        q: ``[I, d]`` item features.
        h: ``[I, K]`` incidence.
        weight: ``[K, K]`` hyperedge weight W.

    Returns:
        ``[I, d]`` (before the activation of Eq. 5).
    """
    col = _safe_inverse(h.sum(dim=0))               # B^{-1}  [K]
    row = _safe_inverse(h.sum(dim=1))               # D^{-1}  [I]
    edges = col[:, None] * (h.T @ q)                # B^{-1} H^T q       [K, d]
    return row[:, None] * (h @ (weight @ edges))    # D^{-1} H W (...)   [I, d]


class PrototypeHypergraph(nn.Module):
    """Eq. 3–5 for one modality: K prototypes, a K×K hyperedge weight, L sigmoid layers.

    Args:
        d: feature width (64).
        n_prototypes: K (64 in the release).
        n_layers: L (2 in the release).
        kind: incidence variant, ``cosine`` (release) or ``positive``.

    Example::

        hg = PrototypeHypergraph(64, 64, 2)
        q = hg(seed_features)          # [I, 64] -> [I, 64], entries in (0, 1)
    """

    def __init__(self, d: int, n_prototypes: int = 64, n_layers: int = 2, kind: str = "cosine"):
        super().__init__()
        if kind not in INCIDENCES:
            raise ValueError(f"incidence kind must be one of {INCIDENCES}, got {kind!r}")
        self.prototypes = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_prototypes, d)))
        bound = 1.0 / math.sqrt(n_prototypes)      # nn.Linear's default range, as the release leaves it
        self.weight = nn.Parameter(torch.empty(n_prototypes, n_prototypes).uniform_(-bound, bound))
        self.n_layers = n_layers
        self.kind = kind

    def forward(self, seed: torch.Tensor) -> torch.Tensor:
        """``seed`` [I, d] (the Eq. 1 item features F^{V,m}) → Q^m [I, d]."""
        h = incidence(seed, self.prototypes, self.kind)
        q = seed
        for _ in range(self.n_layers):
            q = torch.sigmoid(hypergraph_conv(q, h, self.weight))
        return q
