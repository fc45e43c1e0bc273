"""Losses of DGMRec (Eq. 8, 14, 20–24), written once and used for every modality.

- :func:`info_nce`: InfoNCE with in-batch negatives on cosine similarities (Eq. 8, 20, 21), mean over rows.
- :func:`bpr_loss`: ``−mean log σ(y_ui+ − y_ui−)`` (Eq. 23; the paper's "−σ(·)" is a typo for this).
- :func:`emb_loss`: MMRec's ``EmbLoss``, Frobenius norms (not squared) of embedding rows over the batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """``mean_r −log softmax_c(cos(a_r, b_c)/τ)[r]`` for ``a``, ``b`` [B, d] (row r of b is a_r's positive).

    ``1/τ`` scales the ``[B, d]`` rows of ``a`` rather than the ``[B, B]`` logits (the same values up to rounding,
    two passes over B² entries fewer per call; the loss makes up to eight calls per step with two modalities).
    """
    logits = (F.normalize(a, dim=1) / temperature) @ F.normalize(b, dim=1).T
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def bpr_loss(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """BPR on representations ``user``, ``pos``, ``neg`` [B, d]."""
    return -F.logsigmoid((user * pos).sum(dim=1) - (user * neg).sum(dim=1)).mean()


def emb_loss(*rows: torch.Tensor) -> torch.Tensor:
    """``(‖rows_1‖ + ‖rows_2‖ + ...) / B`` for embedding rows ``[B, d]`` of one batch (MMRec's EmbLoss)."""
    return sum(r.norm() for r in rows) / len(rows[0])
