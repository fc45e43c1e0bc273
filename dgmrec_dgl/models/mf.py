r"""MF-BPR: matrix factorisation trained with the BPR loss, the plainest CF baseline.

Rendle et al., "BPR: Bayesian Personalized Ranking from Implicit Feedback", UAI 2009.

.. math::
    \hat y_{ui} = \langle e_u, e_i \rangle, \qquad
    \mathcal L = -\frac1B \sum_{(u,i,j)} \log \sigma(\hat y_{ui} - \hat y_{uj})
                 + \lambda \frac{\lVert E_U[u] \rVert + \lVert E_I[i] \rVert + \lVert E_I[j] \rVert}{B}

The regulariser is MMRec's ``EmbLoss`` (Frobenius norms of the batch's embedding rows, not squared,
divided by the batch size) with weight ``reg``. No graph is used; the trainer's graph is passed through.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MFBPRConfig
from .base import Recommender, gather_rows, scalar_parts
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

    def loss(self, reps, users, pos, neg, generator=None):
        user, item = reps
        parts = {"bpr": bpr_loss(gather_rows(user, users), gather_rows(item, pos), gather_rows(item, neg))}
        if self.config.reg:
            parts["reg"] = self.config.reg * emb_loss(gather_rows(self.user_emb, users),
                                                      gather_rows(self.item_emb, pos), gather_rows(self.item_emb, neg))
        return sum(parts.values()), scalar_parts(parts)
