r"""LightGCN as a :class:`~dgmrec_dgl.models.base.Recommender` (the CF backbone baseline).

He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for Recommendation", SIGIR 2020.
Propagation is :func:`dgmrec_dgl.models.lightgcn.lightgcn` (symmetric normalisation, layer-mean readout,
3 layers by default); the loss is BPR on the propagated embeddings plus MMRec's regulariser on the
batch's *layer-0* embeddings:

.. math::
    \mathcal L = -\frac1B \sum \log \sigma(\langle e_u, e_i \rangle - \langle e_u, e_j \rangle)
                 + \lambda \frac{\lVert E^{(0)}_U[u] \rVert + \lVert E^{(0)}_I[i] \rVert
                 + \lVert E^{(0)}_I[j] \rVert}{B}

Large catalogs: ``execution`` (``full | blocks | sampled | auto``, see
:class:`~dgmrec_dgl.config.LightGCNConfig`). ``full`` and ``blocks`` run the same exact per-step full-graph
pass: the batch's layer-mean embeddings depend on the 3-hop neighbourhood of its users and items, and that
neighbourhood is the whole graph (from a 2,048-triple batch it held 100% of the users and >= 99.99% of the
items on synthetic catalogs of 7K, 19K and 50K items), so an exact block would only add the cost of building
it. ``sampled`` propagates over L blocks drawn by DGL's neighbour sampler (``model.fanouts`` per layer,
:mod:`dgmrec_dgl.graphs.sampling`): an unbiased estimate of each layer, exact when every fanout reaches the
largest degree. The step then reads the layer-0 rows of the sampled receptive field only, through sparse
embeddings, and the lazy Adam steps those rows. With ``history_every: R`` a sampled step propagates over one
sampled hop and reads layers 2..L from historical embeddings refreshed every R steps
(:mod:`dgmrec_dgl.models.history`).
"""

from __future__ import annotations

import torch

from ..config import LightGCNConfig, drawn_fanouts, resolve_execution
from ..graphs.blocks import src_ids
from ..graphs.sampling import lightgcn_blocks, sample_ui_blocks
from .base import Batch, Recommender, distinct_rows, gather_rows, scalar_parts, sparse_rows
from .dgmrec.losses import bpr_loss, emb_loss
from .history import Histories, lightgcn_history, one_hop_layer_means
from .lightgcn import LightGCN


class LightGCNRecommender(Recommender):
    """LightGCN on the heterograph's user–item relations.

    Args:
        n_users, n_items: table sizes.
        config: :class:`~dgmrec_dgl.config.LightGCNConfig` (width 64, 3 layers, reg 1e-4).
    """

    def __init__(self, n_users: int, n_items: int, config: LightGCNConfig):
        super().__init__()
        self.config = config
        self.n_items = n_items
        self.backbone = LightGCN(n_users, n_items, config.embedding_dim, config.n_layers)
        self.history = Histories(config.history_every)

    @classmethod
    def from_dataset(cls, dataset, config: LightGCNConfig) -> LightGCNRecommender:
        return cls(dataset.n_users, dataset.n_items, config)

    def forward(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_users, d], [n_items, d])`` layer-mean embeddings."""
        return self.backbone(g)

    def fused(self, reps) -> tuple[torch.Tensor, torch.Tensor]:
        return reps[0], reps[1]

    def execution(self) -> str:
        return resolve_execution(self.config, self.n_items)

    def row_tables(self) -> dict[str, str]:
        return {"backbone.user": "user", "backbone.item": "item"}

    def sample_batch(self, g, users, pos, neg) -> Batch:
        """Sampled mode: the L user–item blocks onto the batch's distinct users and items (DGL's sampler)."""
        if self.execution() != "sampled":
            return Batch(users, pos, neg)
        return Batch(users, pos, neg, sampled_seeds(g, users, pos, neg, drawn_fanouts(self.config)))

    def batch_forward(self, g, batch: Batch):
        """Full mode: ``(self(g), users, pos, neg)``. Sampled: ``((user, item, user layer 0, item layer 0), rows)``
        at the batch's seeds, and the batch as rows of them."""
        if not batch.drawn:
            return super().batch_forward(g, batch)
        user0, item0, (user, item) = sampled_id_branch(self.backbone.user, self.backbone.item, g, batch.drawn,
                                                       self.history, self.config.n_layers)
        return (user, item, user0, item0), *batch.drawn["rows"]

    def before_epoch(self, epoch, g, generator=None):
        self.history.invalidate()
        return g, {}

    def loss(self, reps, users, pos, neg, generator=None):
        """BPR + reg on ``reps``: ``(user, item)`` of :meth:`forward` (layer 0 = the tables) or sampled mode's 4-tuple."""
        user, item = reps[:2]
        user0, item0 = reps[2:] or (self.backbone.user, self.backbone.item)
        parts = {"bpr": bpr_loss(gather_rows(user, users), gather_rows(item, pos), gather_rows(item, neg))}
        if self.config.reg:
            parts["reg"] = self.config.reg * emb_loss(gather_rows(user0, users), gather_rows(item0, pos),
                                                      gather_rows(item0, neg))
        return sum(parts.values()), scalar_parts(parts)


def sampled_seeds(g, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, fanouts: list[int]) -> dict:
    """The sampled user–item blocks onto a batch's distinct users and items, and the batch as rows of them.

    Returns ``{"blocks": [...], "rows": (users, pos, neg), "items": seed items}``: the rows index the seeds
    (sorted distinct users; sorted distinct items of ``pos ∪ neg``), which are the first rows of every
    block's sources.
    """
    seed_users, seed_items, rows = distinct_rows(users, pos, neg)
    return {"blocks": sample_ui_blocks(g, seed_users, seed_items, fanouts), "rows": rows, "items": seed_items}


def sampled_id_branch(user_table: torch.Tensor, item_table: torch.Tensor, g, seeds: dict, history: Histories,
                      n_layers: int):
    """:func:`sampled_layer_means` on ``seeds`` (:func:`sampled_seeds`), or with ``history`` on, its one-hop form."""
    if not history.every:
        return sampled_layer_means(user_table, item_table, seeds["blocks"])
    tables = history.read(lambda: lightgcn_history(g, user_table, item_table, n_layers))
    return one_hop_layer_means(user_table, item_table, seeds["blocks"][0], tables, n_layers)


def sampled_layer_means(user_table: torch.Tensor, item_table: torch.Tensor, blocks: list):
    """``(user layer 0, item layer 0, (user, item) layer means)`` at the seeds of ``blocks``.

    The layer-0 rows of the receptive field are read through :func:`~.base.sparse_rows`, so the tables get
    row-sparse gradients (or, as ``DistEmbedding`` s, record the read for DGL's distributed optimiser); the
    returned layer-0 rows are the seeds' (the first rows of the sources).
    """
    user, item, user0, item0 = lightgcn_blocks(blocks, sparse_rows(user_table, src_ids(blocks[0], "user")),
                                               sparse_rows(item_table, src_ids(blocks[0], "item")))
    return user0, item0, (user, item)
