"""Neighbour-sampled DGL blocks of the heterograph, for sampled mini-batch training (``model.execution: sampled``).

Every block here is drawn by DGL's own samplers: :class:`dgl.dataloading.NeighborSampler` for the L
user–item layers of LightGCN (fanouts per layer, the kNN relations left out), and
:func:`dgl.sampling.sample_neighbors` + :func:`dgl.to_block` for the one-hop means of DGMRec (a user's
train items, Eq. 6; an item's users, Eq. 2). Draws are uniform without replacement and come from DGL's
random engine; :func:`seed_sampling` seeds it, so a batch seeded the same way gets the same blocks (for the
same thread count).

Normalisation of a sampled user–item layer. The full layer is ``h_v = n_v sum_{u in N(v)} n_u h_u`` with
the full graph's degree terms ``n = (deg + 1e-7)^-1/2`` (:mod:`.hetero`). A sampled layer keeps those
degree terms and multiplies each destination's sum by ``|N(v)| / |S(v)|``, the inverse of the share of its
neighbours that were drawn, so the sampled sum is an unbiased estimate of the full one (Horvitz–Thompson
weights for uniform sampling without replacement). Re-normalising with the block's own degrees instead
would make the layer a different operator, whose expectation is not LightGCN's. When a fanout is at least
the largest degree, every neighbour is drawn, the factor is 1 and the layer is the full one; the sampled
means of Eq. 2 and Eq. 6 are then the full means as well (``tests/test_sampled.py``).
"""

from __future__ import annotations

import torch

from dgmrec_dgl._dgl import dgl
from dgmrec_dgl.graphs.hetero import IU, UI, propagate

__all__ = ["dgl_threads", "lightgcn_blocks", "node_rows", "relation_fanouts", "sample_one_hop", "sample_ui_blocks",
           "seed_sampling", "ui_degrees"]

_DST_RELATION = {"user": IU, "item": UI}     # the relation each node type receives its messages through


def seed_sampling(seed: int) -> None:
    """Seed DGL's random engine (every OpenMP thread of the calling thread's team)."""
    dgl.seed(int(seed) % (2**31 - 1))


def dgl_threads(n: int) -> None:
    """OpenMP threads of DGL's kernels called from this thread (an OpenMP setting of the calling thread only).

    With more than one, DGL's samplers hand rows to threads in whatever order they run, so the same seed
    can draw different neighbours (seen here at 2 threads); the trainer's sampler thread uses one.
    """
    dgl.utils.set_num_threads(int(n))


def relation_fanouts(g, chosen, fanout: int) -> dict:
    """A fanout per relation of ``g``: ``fanout`` for the ``chosen`` ones, 0 (none) for the rest."""
    return {etype: (fanout if etype in chosen else 0) for etype in g.canonical_etypes}


def node_rows(g, ntype: str, field: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of node field ``field`` of ``g`` (a heterograph, or a ``DistGraph`` whose fields are
    ``DistTensor`` s read over the network)."""
    data = g.nodes[ntype].data[field]
    return torch.index_select(data, 0, ids) if isinstance(data, torch.Tensor) else data[ids]


def ui_degrees(g, ntype: str, ids: torch.Tensor) -> torch.Tensor:
    """In-degrees of nodes ``ids`` of ``ntype`` through its user–item relation (its train interactions).

    A ``DistGraph`` answers ``in_degrees`` for homogeneous graphs only (DGL 2.1), so on one the partition's
    node field ``degree`` (:func:`~.partition.partition_graph_of`) is read instead.
    """
    if isinstance(g, dgl.DGLGraph):
        return g.in_degrees(ids, etype=_DST_RELATION[ntype])
    return node_rows(g, ntype, "degree", ids)


def _set_sampled_norms(g, block) -> None:
    """Node fields ``norm`` of a sampled user–item block, read by :func:`~.hetero.propagate`.

    Sources get the full graph's ``n_u``; destinations ``n_v · deg(v) / drawn(v)`` (module docstring).
    """
    for ntype, relation in _DST_RELATION.items():
        if ntype not in block.dsttypes:
            continue
        block.srcnodes[ntype].data["norm"] = node_rows(g, ntype, "norm", block.srcnodes[ntype].data[dgl.NID])
        dst = block.dstnodes[ntype].data[dgl.NID]
        norm = node_rows(g, ntype, "norm", dst)
        if relation not in block.canonical_etypes:
            block.dstnodes[ntype].data["norm"] = norm
            continue
        full = ui_degrees(g, ntype, dst).to(norm.dtype)
        drawn = block.in_degrees(etype=relation).to(norm.dtype)
        share = torch.where(drawn > 0, full / drawn.clamp(min=1), torch.ones_like(full))
        block.dstnodes[ntype].data["norm"] = norm * share.unsqueeze(1)


def sample_ui_blocks(g, users: torch.Tensor, items: torch.Tensor, fanouts: list[int]) -> list:
    """The L sampled user–item blocks that compute layers 1..L of LightGCN at ``users`` and ``items``.

    Args:
        g: the heterograph (``interacts`` / ``interacted_by`` with node fields ``norm``; kNN relations are
            left out).
        users, items: int64 distinct seed ids (``[n_u]``, ``[n_i]``).
        fanouts: neighbours drawn per node in each layer, input layer first (DGL's order); -1 draws all.

    Returns:
        blocks in the order they are applied; ``blocks[0]``'s source nodes are the layer-0 rows to read,
        and each block lists its destination nodes first among its sources, so the seeds are the first
        ``n_u`` users and ``n_i`` items of every block's sources.
    """
    chosen = {UI: None, IU: None}
    sampler = dgl.dataloading.NeighborSampler([relation_fanouts(g, chosen, f) for f in fanouts])
    _, _, blocks = sampler.sample_blocks(g, {"user": users, "item": items})
    for block in blocks:
        _set_sampled_norms(g, block)
    return blocks


def lightgcn_blocks(blocks: list, user0: torch.Tensor, item0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Layer-mean LightGCN embeddings of the seeds, on blocks from :func:`sample_ui_blocks`.

    Args:
        blocks: the L blocks.
        user0, item0: layer-0 embeddings of ``blocks[0]``'s source users ``[n_src_u, d]`` and items ``[n_src_i, d]``.

    Returns:
        ``(user, item, user_seed0, item_seed0)``: ``(1/(L+1)) sum_l E^(l)`` at the seed users ``[n_u, d]`` and
        items ``[n_i, d]``, in seed order, and the seeds' layer-0 rows (the first rows of ``user0`` / ``item0``;
        one slice each, shared by the layer sum and any other use, so the backward pass zero-fills the
        ``[n_src, d]`` gradient of the input rows once per table, not once per use).
    """
    n_u, n_i = blocks[-1].num_dst_nodes("user"), blocks[-1].num_dst_nodes("item")
    user_seed0, item_seed0 = user0[:n_u], item0[:n_i]
    user_sum, item_sum = user_seed0, item_seed0
    user, item = user0, item0
    for block in blocks:
        user, item = propagate(block, IU, item), propagate(block, UI, user)
        user_sum, item_sum = user_sum + user[:n_u], item_sum + item[:n_i]
    return user_sum / (len(blocks) + 1), item_sum / (len(blocks) + 1), user_seed0, item_seed0


def sample_one_hop(g, etype, dst: torch.Tensor, fanout: int):
    """A block of at most ``fanout`` uniformly drawn in-edges of relation ``etype`` per node of ``dst`` (-1: all).

    ``dst`` [n] are distinct ids of the relation's destination type; the block has that one relation, its
    destination nodes in the order given; :func:`~.hetero.mean_aggregate` on it averages over the drawn edges.
    On a ``DistGraph``: DGL's distributed sampler (:func:`~.distgraph.sample_relation`).
    """
    if not isinstance(g, dgl.DGLGraph):
        from dgmrec_dgl.graphs.distgraph import sample_relation

        return sample_relation(g, etype, dst, fanout)
    _, _, dst_type = g.to_canonical_etype(etype)
    dst = torch.as_tensor(dst, dtype=torch.int64)
    frontier = dgl.sampling.sample_neighbors(g, {dst_type: dst}, relation_fanouts(g, {g.to_canonical_etype(etype)}, fanout),
                                             copy_ndata=False, copy_edata=False)
    return dgl.to_block(frontier.edge_type_subgraph([etype]), {dst_type: dst})

