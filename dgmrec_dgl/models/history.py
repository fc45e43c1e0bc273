r"""Historical embeddings for sampled training (``model.history_every: R``, sampled mode only).

After GNNAutoScale (Fey, Lenssen, Weichert and Leskovec, ICML 2021): a step computes one hop around its
batch and reads what lies further out from tables of the layers' outputs, which a no-grad pass over the whole
graph recomputes every R steps (and at the start of every epoch, after generation and refinement have changed
the features and graphs). Without histories a sampled step re-computes its whole L-hop receptive field: at
1M items three fanout-5 hops from a 2,048-triple batch read 446K users and 326K items per step.

ID branch (LightGCN, L layers). With ``C = sum_{l=1}^{L-1} Â^l E^(0)`` from the last refresh,

.. math::
    E = \frac{1}{L+1} \sum_{l=0}^{L} Â^l E^{(0)} = \frac{1}{L+1}\Big(E^{(0)} + Â\,(E^{(0)} + C)\Big)

and a step evaluates the right-hand side at its seeds on one neighbour-sampled hop (:func:`one_hop_layer_means`):
the layer-0 rows of the seeds and of their drawn neighbours are the current tables (their gradients are exact
for that hop), ``C`` is read from the history (no gradient flows through layers 2..L). Right after a refresh,
with every neighbour drawn, the values equal the full-graph ones (``tests/test_history.py``); in between, ``C``
is up to R - 1 optimiser steps old.

Modality branch (DGMRec): the tables are the filtered features ``Ẽ_m`` (layer 0 of Eq. 4) and each kNN layer's
output ``Ē^(l)_m``. A step computes the batch's items (pos ∪ neg) fresh, through the encoders, the preference
filter and the kNN propagation, and reads every other item it touches from the history: the kNN neighbours
outside the batch in each layer, and the train items outside the batch that a user's features average (Eq. 6).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..graphs.blocks import src_ids
from ..graphs.hetero import IU, UI, propagate
from .base import sparse_rows
from .lightgcn import layer_sum


class Histories:
    """Tables refreshed by ``compute()`` every ``every`` reads (0: histories off), and what refreshing cost.

    ``refreshes`` and ``seconds`` count the refreshes and their wall time since the model was built.
    """

    def __init__(self, every: int):
        self.every = int(every)
        self.tables: dict | None = None
        self.age = 0
        self.refreshes = 0
        self.seconds = 0.0

    def invalidate(self) -> None:
        """Drop the tables: the next read refreshes them (features or graphs changed)."""
        self.tables = None

    def due(self) -> bool:
        """Whether the next read refreshes the tables."""
        return self.tables is None or self.age >= self.every

    def refresh(self, compute: Callable[[], dict]) -> None:
        """Replace the tables by ``compute()`` (run without autograd); the next ``every`` reads return them.

        Training on partitions calls it on every trainer at once (the refresh is a collective pass there).
        """
        start = time.perf_counter()
        self.tables = None                      # free the old tables before the new ones are built
        with torch.no_grad():
            self.tables = compute()
        self.age = 0
        self.refreshes += 1
        self.seconds += time.perf_counter() - start

    def read(self, compute: Callable[[], dict]) -> dict:
        """The tables, refreshed by ``compute`` when missing or ``every`` reads old."""
        if self.due():
            self.refresh(compute)
        self.age += 1
        return self.tables


def drop_due(*histories: Histories) -> None:
    """Histories refreshed at the same read (DGMRec's ID and modality branches) drop their old tables before
    the first of them is recomputed, not each just before its own refresh: otherwise the ID branch's refresh
    runs beside the modalities' old tables (2 GB at 1M items, the run's memory peak). Nothing unless all are
    due."""
    if all(h.due() for h in histories):
        for h in histories:
            h.invalidate()


def histories_of(model) -> list[Histories]:
    """The model's historical embeddings that are on (the ID branch's; DGMRec's modality branches')."""
    found = (getattr(model, "history", None), getattr(model, "modality_history", None))
    return [h for h in found if isinstance(h, Histories) and h.every]


def refresh_totals(model) -> tuple[int, float]:
    """``(refreshes, seconds)`` of the model's histories since it was built (histories refreshed together count
    once; their seconds add up)."""
    histories = histories_of(model)
    return max((h.refreshes for h in histories), default=0), sum(h.seconds for h in histories)


def refreshes_since(model, before: tuple[int, float]) -> dict:
    """A log record's ``history`` entry: the refreshes and their seconds since ``before``
    (:func:`refresh_totals`)."""
    refreshes, seconds = refresh_totals(model)
    return {"refreshes": refreshes - before[0], "seconds": round(seconds - before[1], 3)}


def lightgcn_history(g, user: torch.Tensor, item: torch.Tensor, n_layers: int) -> dict:
    """``C = sum_{l=1}^{L-1} Â^l E^(0)``: ``{"user": [n_users, d], "item": [n_items, d]}``, no autograd."""
    user_sum, item_sum = layer_sum(g, user.detach(), item.detach(), n_layers - 1)
    return {"user": user_sum.sub_(user.detach()), "item": item_sum.sub_(item.detach())}


def one_hop_layer_means(user_table: torch.Tensor, item_table: torch.Tensor, block, history: dict, n_layers: int):
    """``(user layer 0, item layer 0, (user, item) layer means)`` at the seeds of one sampled hop ``block``.

    Args:
        user_table, item_table: the layer-0 tables ``[n_users, d]``, ``[n_items, d]`` (read as sparse rows).
        block: one user–item block of :func:`~dgmrec_dgl.graphs.sampling.sample_ui_blocks` (seeds first among
            its sources).
        history: :func:`lightgcn_history`'s tables (on partitions ``DistTensor`` s of the same rows).
        n_layers: L.

    Returns:
        as :func:`~dgmrec_dgl.models.lightgcn_rec.sampled_layer_means`: ``E = (E^(0) + Â (E^(0) + C)) / (L+1)``
        at the seed users ``[n_u, d]`` and items ``[n_i, d]``.
    """
    users, items = src_ids(block, "user"), src_ids(block, "item")
    user0, item0 = sparse_rows(user_table, users), sparse_rows(item_table, items)
    n_u, n_i = block.num_dst_nodes("user"), block.num_dst_nodes("item")
    user = propagate(block, IU, item0 + history_rows(history["item"], items))
    item = propagate(block, UI, user0 + history_rows(history["user"], users))
    return user0[:n_u], item0[:n_i], ((user0[:n_u] + user) / (n_layers + 1), (item0[:n_i] + item) / (n_layers + 1))


def history_rows(table, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of a history table: a tensor, or on partitions a ``dgl.distributed.DistTensor``."""
    return torch.index_select(table, 0, ids) if isinstance(table, torch.Tensor) else table[ids]


def with_history(fresh: torch.Tensor, fresh_ids: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` [n] of ``table``, except those in ``fresh_ids`` (sorted distinct), taken from ``fresh``.

    ``fresh`` [len(fresh_ids), w] carries the gradient; the history rows carry none.
    """
    old = history_rows(table, ids)
    if not len(fresh_ids):
        return old
    at = torch.searchsorted(fresh_ids, ids).clamp_(max=len(fresh_ids) - 1)
    return torch.where((fresh_ids[at] == ids).unsqueeze(1), torch.index_select(fresh, 0, at), old)
