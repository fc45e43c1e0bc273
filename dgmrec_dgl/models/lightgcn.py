"""LightGCN propagation on the user–item relations of the heterograph.

He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", SIGIR 2020.

.. math::
    e^{(l+1)}_i = \\sum_{u \\in N_i} \\frac{1}{\\sqrt{|N_u||N_i|}} e^{(l)}_u, \\qquad
    e^{(l+1)}_u = \\sum_{i \\in N_u} \\frac{1}{\\sqrt{|N_u||N_i|}} e^{(l)}_i, \\qquad
    E = \\frac{1}{L+1} \\sum_{l=0}^{L} E^{(l)}

The symmetric weights live on the edges (field ``w`` of ``interacts`` / ``interacted_by``), so each layer is
two weighted message-passing steps through DGL.

The layer mean is linear in E^(0) and Â is symmetric, so the map is its own adjoint: the backward pass
applies the same layer mean to the incoming gradient (:class:`_LayerMean`). Autograd therefore keeps no
activation of the L layers, and the backward pass reads the same two relations (in-edges, CSC) as the
forward pass, so the graph never needs their CSR or COO. At 200K items, 400K users and 6.2M interactions
(d = 64, Adam) this, with the chain order of :func:`layer_sum`, took a step's peak from 2.10 to 1.77 GB
and the resident graph + state from 1.53 to 1.25 GB; ``tests/test_hetero.py`` checks values and gradients
against dense autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphs.hetero import IU, UI, propagate


def layer_sum(g, user: torch.Tensor, item: torch.Tensor, n_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_{l=0}^{L} Â^l [user; item]`` without autograd.

    On the bipartite graph the layers form two independent chains, user^(0) → item^(1) → user^(2) → ... and
    item^(0) → user^(1) → item^(2) → ...; following one chain, then the other, keeps a single layer tensor
    alive besides the two running sums, and a layer past the first, once in its sum, is scaled for the next
    hop in place (``propagate(..., overwrite=True)``).
    """
    with torch.no_grad():
        user_sum, item_sum = user.clone(), item.clone()
        for h, on_users in ((user, True), (item, False)):
            for layer in range(n_layers):
                h = propagate(g, UI if on_users else IU, h, overwrite=layer > 0)
                on_users = not on_users
                (user_sum if on_users else item_sum).add_(h)
    return user_sum, item_sum


class _LayerMean(torch.autograd.Function):
    """``E = (1/(L+1)) sum_l Â^l E^(0)`` with a hand-written backward.

    Â is symmetric (both directions carry the same weight ``w_ui``), so the map is its own adjoint: the
    gradient w.r.t. E^(0) is the same layer mean applied to the gradient w.r.t. E. Nothing is saved for the
    backward pass but the graph, and it runs over the same two relations as the forward pass.
    """

    @staticmethod
    def forward(ctx, user, item, g, n_layers):
        ctx.graph, ctx.n_layers = g, n_layers
        user_sum, item_sum = layer_sum(g, user, item, n_layers)
        return user_sum.div_(n_layers + 1), item_sum.div_(n_layers + 1)

    @staticmethod
    def backward(ctx, grad_user, grad_item):
        n = ctx.n_layers   # an unused output's gradient arrives as zeros (autograd materialises it)
        du, di = layer_sum(ctx.graph, grad_user.contiguous(), grad_item.contiguous(), n)
        return du.div_(n + 1), di.div_(n + 1), None, None


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
    return _LayerMean.apply(user, item, g, n_layers)


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
