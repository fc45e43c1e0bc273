r"""MF-BPR: matrix factorisation trained with the BPR loss, the plainest CF baseline.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009.

.. math::
    \hat y_{ui} = \langle e_u, e_i \rangle, \qquad
    \mathcal L = -\frac1B \sum_{(u,i,j)} \log \sigma(\hat y_{ui} - \hat y_{uj})
                 + \lambda \frac{\lVert E_U[u] \rVert + \lVert E_I[i] \rVert + \lVert E_I[j] \rVert}{B}

The regulariser is MMRec's ``EmbLoss`` (Frobenius norms of the batch's embedding rows, not squared,
divided by the batch size) with weight ``reg``. No graph is used; the trainer's graph is passed through.

``execution: sampled`` reads the batch's rows through sparse embeddings, so the tables get row-sparse
gradients and the lazy Adam steps only those rows (:mod:`dgmrec_dgl.optim`); the gradients are the full
mode's, the optimiser is what differs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MFBPRConfig, resolve_execution
from .base import Batch, Recommender, distinct_rows, gather_rows, scalar_parts, sparse_rows
from .dgmrec.losses import bpr_loss, emb_loss


class MFBPR(Recommender):
    """ID embedding tables scored by inner product.

    Args:
        n_users, n_items: table sizes.
        config: :class:`~dgmrec_dgl.config.MFBPRConfig` (embedding width 64, reg 1e-4).
    """

    def __init__(self, n_users: int, n_items: int, config: MFBPRConfig):
        super().__init__()
        self.config = config
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, config.embedding_dim)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, config.embedding_dim)))

    @classmethod
    def from_dataset(cls, dataset, config: MFBPRConfig) -> MFBPR:
        return cls(dataset.n_users, dataset.n_items, config)

    def forward(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_users, d], [n_items, d])``: the tables themselves."""
        return self.user_emb, self.item_emb

    def fused(self, reps) -> tuple[torch.Tensor, torch.Tensor]:
        return reps

    def execution(self) -> str:
        return resolve_execution(self.config, self.item_emb.shape[0])

    def batch_forward(self, g, batch: Batch):
        """Full mode: the tables and the global ids. Sampled: the batch's distinct rows (sparse reads) and the
        batch as rows of them."""
        if self.execution() != "sampled":
            return super().batch_forward(g, batch)
        users, items, rows = distinct_rows(batch.users, batch.pos, batch.neg)
        return (sparse_rows(self.user_emb, users), sparse_rows(self.item_emb, items)), *rows

    def loss(self, reps, users, pos, neg, generator=None):
        user, item = reps           # the tables (or the batch's rows of them) themselves
        u, i, j = gather_rows(user, users), gather_rows(item, pos), gather_rows(item, neg)
        parts = {"bpr": bpr_loss(u, i, j)}
        if self.config.reg:
            parts["reg"] = self.config.reg * emb_loss(u, i, j)
        return sum(parts.values()), scalar_parts(parts)
