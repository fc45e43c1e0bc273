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
    a, b = F.normalize(a, dim=1) / temperature, F.normalize(b, dim=1)
    if torch.is_autocast_enabled(a.device.type):
        return F.cross_entropy(a @ b.T, torch.arange(len(a), device=a.device))
    return _InBatchCrossEntropy.apply(a, b)


class _InBatchCrossEntropy(torch.autograd.Function):
    """``mean_r (logsumexp_c L[r, c] − L[r, r])`` for the logits ``L = a bᵀ`` of rows ``a``, ``b`` [B, d].

    The same value and gradients as ``F.cross_entropy(a @ b.T, arange(B))`` up to rounding, with one [B, B]
    tensor where the composed ops make four and exponentiate it twice: the forward keeps ``exp(L − c)``, the
    backward turns it in place into the gradient ``(softmax(L) − I) / B`` of the logits. The shift ``c`` is
    the bound ``max_r ‖a_r‖ · max_c ‖b_c‖ ≥ L[r, c]`` (``1/τ`` for InfoNCE's rows), so no row maximum is
    needed while every exponent stays in [−2c, 0]; with ``2c`` past float32's exponent range the row maxima
    are taken instead.
    """

    @staticmethod
    def forward(ctx, a, b):
        logits = a @ b.T
        bound = float(a.norm(dim=1).max() * b.norm(dim=1).max())
        shift = logits.amax(dim=1, keepdim=True) if 2 * bound > 80 else bound
        logits.sub_(shift).exp_()
        total = logits.sum(dim=1)
        diagonal = (a * b).sum(dim=1)
        ctx.save_for_backward(a, b, logits, total)
        ctx.consumed = False
        return (total.log() + (shift.squeeze(1) if torch.is_tensor(shift) else shift) - diagonal).mean()

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("_InBatchCrossEntropy's backward reuses its saved [B, B] tensor; it runs once")
        ctx.consumed = True
        a, b, grad_logits, total = ctx.saved_tensors
        grad_logits.div_(total.unsqueeze(1))                  # softmax(L)
        grad_logits.diagonal().sub_(1.0)
        grad_logits.mul_(grad / len(a))
        return (grad_logits @ b if ctx.needs_input_grad[0] else None,
                grad_logits.T @ a if ctx.needs_input_grad[1] else None)


def bpr_loss(user: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """BPR on representations ``user``, ``pos``, ``neg`` [B, d]."""
    return -F.logsigmoid((user * pos).sum(dim=1) - (user * neg).sum(dim=1)).mean()


def emb_loss(*rows: torch.Tensor) -> torch.Tensor:
    """``(‖rows_1‖ + ‖rows_2‖ + ...) / B`` for embedding rows ``[B, d]`` of one batch (MMRec's EmbLoss)."""
    return sum(r.norm() for r in rows) / len(rows[0])
