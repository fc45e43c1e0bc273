"""LightGCN propagation on the user–item relations of the heterograph.

He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", SIGIR 2020.

.. math::
    e^{(l+1)}_i = \\sum_{u \\in N_i} \\frac{1}{\\sqrt{|N_u||N_i|}} e^{(l)}_u, \\qquad
    e^{(l+1)}_u = \\sum_{i \\in N_u} \\frac{1}{\\sqrt{|N_u||N_i|}} e^{(l)}_i, \\qquad
    E = \\frac{1}{L+1} \\sum_{l=0}^{L} E^{(l)}

The symmetric weights live on the edges (field ``w`` of ``interacts`` / ``interacted_by``), so each layer is
two weighted message-passing steps through DGL.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphs.hetero import propagate


def lightgcn(g, user: torch.Tensor, item: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-mean LightGCN embeddings.

    Args:
        g: heterograph with ``interacts`` (user→item) and ``interacted_by`` (item→user) weighted edges.
        user: ``[n_users, d]`` layer-0 user embeddings.
        item: ``[n_items, d]`` layer-0 item embeddings.
        n_layers: L.

    Returns:
        ``([n_users, d], [n_items, d])`` means over layers 0..L.
    """
    # A running sum, not a stack of the L + 1 layers: no layer output is needed by the backward pass (the
    # sparse products save only the graph), so each layer is freed once added; at 1M items and 2M users
    # that keeps ~2 [n, d] tensors per node type alive instead of L + 2.
    u, i = user, item
    user_sum, item_sum = user, item
    for _ in range(n_layers):
        u, i = propagate(g, "interacted_by", i), propagate(g, "interacts", u)
        user_sum, item_sum = user_sum + u, item_sum + i
    return user_sum / (n_layers + 1), item_sum / (n_layers + 1)


class LightGCN(nn.Module):
    """ID embeddings propagated by :func:`lightgcn` (the CF baseline and DGMRec's ID branch).

    Args:
        n_users, n_items: table sizes.
        d: embedding width (64 in the reference).
        n_layers: propagation layers (3 in the reference).
    """

    def __init__(self, n_users: int, n_items: int, d: int = 64, n_layers: int = 3):
        super().__init__()
        self.user = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.n_layers = n_layers

    def forward(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        return lightgcn(g, self.user, self.item, self.n_layers)
