"""The kNN relations of DGMRec on partitions: fixed-width rows (``DistTensor`` s on the partitions) and the
blocks built from them, checked exactly against the heterograph's own kNN blocks. In-process, no server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgmrec_dgl._dgl import dgl
from dgmrec_dgl.graphs.blocks import knn_blocks, relation_block, src_ids
from dgmrec_dgl.graphs.distgraph import KNN_IDS, KNN_WEIGHTS, block_from_rows, knn_row_blocks, pack_knn_rows
from dgmrec_dgl.graphs.hetero import build_heterograph, knn_etype, propagate
from dgmrec_dgl.graphs.knn import modality_knn_graphs

KNN_K = 4


@pytest.fixture(scope="module")
def graph(masked_sparse):
    """The masked sparse set's heterograph (kNN graphs with k = 4; 40% of the items miss a modality)."""
    ds = masked_sparse[0]
    knn = modality_knn_graphs({m: ds.features[m] for m in ds.modalities}, ds.present, KNN_K, progress=False)
    return ds, build_heterograph(ds, knn)


def rows_of(g, m: str, width: int):
    """Every item's kNN row, packed as the trainers pack their own (from the relation's in-edges)."""
    etype = knn_etype(m)
    src, dst, eid = g.in_edges(torch.arange(g.num_nodes("item")), etype=etype, form="all")
    return pack_knn_rows(src, dst, g.edges[etype].data["w"][eid], torch.arange(g.num_nodes("item")), width)


class _Rows:
    """What :func:`knn_row_blocks` reads of a ``DistGraph``: item fields indexable by ids."""

    def __init__(self, fields: dict):
        self.nodes = {"item": type("Frame", (), {"data": fields})()}


def edge_set(block, m):
    etype = knn_etype(m)
    s, d, e = block.edges(etype=etype, form="all")
    src, dst = src_ids(block, "item")[s], block.dstnodes["item"].data[dgl.NID][d]
    w = block.edges[etype].data["w"][e]
    return sorted(zip(dst.tolist(), src.tolist(), w.tolist()))


def test_blocks_from_the_rows_equal_the_graphs_knn_blocks(graph):
    ds, g = graph
    seeds = torch.unique(torch.randint(0, ds.n_items, (150,), generator=torch.Generator().manual_seed(0)))
    for m in ds.modalities:
        ids, weights = rows_of(g, m, KNN_K)
        assert ((ids >= 0).sum(1) == g.in_degrees(etype=knn_etype(m))).all()       # every entry, none cut
        ours, theirs = block_from_rows(m, seeds, ids[seeds], weights[seeds]), relation_block(g, knn_etype(m), seeds)
        assert edge_set(ours, m) == edge_set(theirs, m)
        assert torch.equal(src_ids(ours, "item")[:len(seeds)], seeds)               # destination items first
        assert set(src_ids(ours, "item").tolist()) == set(src_ids(theirs, "item").tolist())
        # two layers through the DistGraph reader: the same propagation as on the heterograph
        fake = _Rows({KNN_IDS.format(m): ids, KNN_WEIGHTS.format(m): weights})
        h = torch.randn(ds.n_items, 8, generator=torch.Generator().manual_seed(1))
        out = []
        for blocks in (knn_row_blocks(fake, m, seeds, 2), knn_blocks(g, m, seeds, 2)):
            x = h[src_ids(blocks[0], "item")]
            for block in blocks:
                x = propagate(block, knn_etype(m), x)
            out.append(x)
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)


def test_a_row_longer_than_the_width_keeps_its_largest_weights():
    src = torch.tensor([5, 1, 9, 3, 2, 7])
    dst = torch.tensor([0, 0, 0, 0, 4, 4])
    w = torch.tensor([0.1, 0.4, 0.3, 0.2, 0.5, 0.6])
    ids, weights = pack_knn_rows(src, dst, w, torch.tensor([0, 4]), 3)
    assert ids.tolist() == [[1, 3, 9], [2, 7, -1]]                   # ascending ids, padding -1
    assert np.allclose(weights.numpy(), [[0.4, 0.2, 0.3], [0.5, 0.6, 0.0]])
