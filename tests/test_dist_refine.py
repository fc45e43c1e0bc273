"""Eq. 16 split over partitions (:mod:`dgmrec_dgl.graphs.dist_refine`) against the single-machine refinement.

Two parts of a 300-item catalog, each holding the raw rows of its own items only: the merged per-part
FAISS top-k equals one FAISS query over all sources, and the rows each part refines equal
:func:`~dgmrec_dgl.graphs.refine.refine_knn`'s on the same features. In-process, no server; < 1 s.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgmrec_dgl.graphs.dist_refine import merge_top_k, part_top_k, refine_own_rows, row_cosine_sums
from dgmrec_dgl.graphs.distgraph import pack_knn_rows
from dgmrec_dgl.graphs.knn import modality_knn_graphs, query_rows
from dgmrec_dgl.graphs.refine import refine_knn

N, D, K, SPLIT = 300, 16, 4, 140


@pytest.fixture(scope="module")
def catalog():
    """(features after generation [N, D], present mask, the normalised kNN graph built before generation)."""
    rng = np.random.default_rng(7)
    features = rng.standard_normal((N, D)).astype(np.float32)
    present = rng.random(N) > 0.35
    graph = modality_knn_graphs({"v": features}, {"v": present}, K, index="exact", progress=False)["v"]
    generated = features.copy()
    generated[~present] = rng.standard_normal((int((~present).sum()), D)).astype(np.float32)
    return generated, present, graph


def packed(graph, items: np.ndarray, width: int):
    """The graph's rows of ``items`` as the kNN DistTensors hold them."""
    dst = np.repeat(np.arange(graph.n_items), np.diff(graph.indptr))
    keep = np.isin(dst, items)
    ids, w = pack_knn_rows(torch.from_numpy(graph.indices[keep]), torch.from_numpy(dst[keep]),
                           torch.from_numpy(graph.weights[keep]), torch.from_numpy(items), width)
    return ids.numpy(), w.numpy()


def distributed_refine(features, present, graph, alpha, tolerance=0.0):
    """What the trainers of two parts do, with the exchanges written out; returns part -> (rows, refined CSR)."""
    parts = [np.arange(0, SPLIT), np.arange(SPLIT, N)]
    mine = [p[~present[p]] for p in parts]                           # each part's rows to refine
    queries = np.concatenate([features[r] for r in mine])            # all_gather of the query rows
    answers = []
    for own in parts:                                                # each part answers every query
        sources = own[present[own]]
        answers.append(part_top_k(sources, features[sources], queries, K, index="exact"))
    out, offset = {}, 0
    for p, rows in enumerate(mine):                                  # each part merges its own queries' answers
        new = merge_top_k([(a[offset:offset + len(rows)], c[offset:offset + len(rows)]) for a, c in answers], K)
        offset += len(rows)
        used = np.unique(new[1])
        nbr, _ = packed(graph, used, 2 * K)
        degree = row_cosine_sums(features[used], nbr, features[np.where(nbr >= 0, nbr, 0)])
        old_ids, old_w = packed(graph, rows, 3 * K)
        out[p] = rows, new, refine_own_rows(rows, old_ids, old_w, new, used, degree, alpha, tolerance)
    return out


def test_the_merged_per_part_top_k_is_the_single_query_top_k(catalog):
    features, present, graph = catalog
    missing = np.flatnonzero(~present)
    single = query_rows(features, missing, np.flatnonzero(present), K, index="exact", progress=False)
    merged_indptr = [0]
    merged_idx, merged_cos = [], []
    for rows, new, _ in distributed_refine(features, present, graph, 0.2).values():
        merged_indptr += list(merged_indptr[-1] + new[0][1:])
        merged_idx.append(new[1])
        merged_cos.append(new[2])
    assert np.array_equal(np.array(merged_indptr), single.indptr)
    assert np.array_equal(np.concatenate(merged_idx), single.indices)
    np.testing.assert_allclose(np.concatenate(merged_cos), single.weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha, tolerance", [(0.2, 0.0), (0.6, 0.05)])
def test_two_parts_refine_the_rows_as_the_single_machine_refinement(catalog, alpha, tolerance):
    features, present, graph = catalog
    single = refine_knn(graph, features, np.flatnonzero(~present), alpha, K, present=present, index="exact",
                        tolerance=tolerance, progress=False)
    for rows, _, (indptr, indices, weights) in distributed_refine(features, present, graph, alpha, tolerance).values():
        for t, item in enumerate(rows):
            lo, hi = single.indptr[item], single.indptr[item + 1]
            assert np.array_equal(indices[indptr[t]:indptr[t + 1]], single.indices[lo:hi]), item
            np.testing.assert_allclose(weights[indptr[t]:indptr[t + 1]], single.weights[lo:hi], rtol=1e-6, atol=1e-7)
        assert len(rows) and indptr[-1] > len(rows)                   # rows grew past their self-loop
