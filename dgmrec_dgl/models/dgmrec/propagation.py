"""Modality-graph propagation and user modality features (DGMRec Eq. 4–6).

.. math::
    \\bar E^{(l)}_m = S^m \\bar E^{(l-1)}_m,\\quad \\bar E^{(0)}_m = \\tilde E_m,\\quad \\bar E_m = \\bar E^{(L)}_m,
    \\qquad \\bar f_{u,m} = \\frac{1}{|N_u|}\\sum_{i \\in N_u} \\bar e_{i,m}

``S^m`` is the normalised top-k cosine graph of modality m, stored as the heterograph relation
``('item', 'knn_<m>', 'item')``; the LAST layer is the output (not a layer mean). General and specific
features travel together as one ``[n_items, 2d]`` tensor, one sparse product per layer.

In blocks mode (:meth:`DGMRec.batch_forward`) the same steps run on exact full-neighbour DGL blocks
(:func:`dgmrec_dgl.graphs.blocks.knn_blocks`, :func:`~dgmrec_dgl.graphs.blocks.item_user_block`): layer l
computes ``S^m h`` only at the items layer l + 1 reads, from all of their neighbours.
"""

from __future__ import annotations

import torch

from ..._dgl import dgl
from ...graphs.hetero import mean_aggregate, propagate
from ..history import history_rows


def propagate_modality(g, modality: str, h: torch.Tensor, n_layers: int) -> torch.Tensor:
    """``n_layers`` steps of ``h ← S^m h`` on ``h`` [n_items, w]; returns the last layer."""
    for _ in range(n_layers):
        h = propagate(g, f"knn_{modality}", h)
    return h


def propagate_modality_blocks(blocks: list, modality: str, h: torch.Tensor) -> torch.Tensor:
    """One step of ``h ← S^m h`` per block: ``h`` [n_src of blocks[0], w] → [n_dst of blocks[-1], w].

    ``blocks`` come from :func:`~dgmrec_dgl.graphs.blocks.knn_blocks`; with none, ``h`` is returned as is.
    """
    for block in blocks:
        h = propagate(block, f"knn_{modality}", h)
    return h


def propagate_modality_history(blocks: list, modality: str, h: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
    """``len(layers) - 1`` steps of ``h ← S^m h`` at a block's destination items, the other sources from histories.

    ``blocks`` holds one kNN block onto items T (destination items first among its sources; none when there
    are no layers), ``h`` [len(T), w] is layer 0 at T, and ``layers[l]`` [n_items, w] the history of layer l
    (:mod:`dgmrec_dgl.models.history`; on partitions a ``DistTensor``): layer l + 1 at T reads T's own rows from layer l as just computed and
    every other source from ``layers[l]``. Returns the last layer at T.
    """
    for table in layers[:-1]:
        block = blocks[0]
        outside = block.srcnodes["item"].data[dgl.NID][len(h):]
        h = propagate(block, f"knn_{modality}", torch.cat([h, history_rows(table, outside)]))
    return h


def user_modality_features(g, item_h: torch.Tensor) -> torch.Tensor:
    """Eq. 6: ``item_h`` [n_items, w] → [n_users, w], mean over each user's train items.

    ``g`` may be an ``interacted_by`` block (``item_user_block``): then ``item_h`` holds its source items
    and the result its destination users.
    """
    return mean_aggregate(g, "interacted_by", item_h)
