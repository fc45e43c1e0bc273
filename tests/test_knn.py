"""kNN graph construction (dgmrec_dgl.graphs.knn) against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from dgmrec_dgl.graphs.knn import (KnnGraph, build_knn, clustered_features, normalize_knn, query_rows)


def dense_cosine(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x @ x.T


def dense_knn(x, k, present=None, candidates="present"):
    """The reference rule, dense: top-k cosine (self included), missing rows/cols zeroed, diag 1."""
    n = x.shape[0]
    present = np.ones(n, bool) if present is None else present
    sim = dense_cosine(x)
    cand = np.flatnonzero(present) if candidates == "present" else np.arange(n)
    out = np.zeros((n, n))
    for i in np.flatnonzero(present):
        top = cand[np.argsort(-sim[i, cand], kind="stable")[:k]]
        out[i, top] = sim[i, top]
    out[~present, :] = 0
    out[:, ~present] = 0
    out[np.flatnonzero(~present), np.flatnonzero(~present)] = 1.0
    return out


def dense_sym_norm(s):
    deg = s.sum(axis=1)
    inv = 1.0 / np.sqrt(deg)
    return s * inv[:, None] * inv[None, :]


def assert_graph_equals_dense(g: KnnGraph, dense: np.ndarray, atol=1e-5):
    got = g.to_scipy().toarray()
    np.testing.assert_array_equal(got != 0, dense != 0)
    np.testing.assert_allclose(got, dense, atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 12)).astype(np.float32)
    present = rng.random(60) < 0.6
    return x, present


def test_exact_topk_matches_bruteforce_all_present(small):
    x, _ = small
    g = build_knn(x, 5, index="exact", progress=False)
    assert g.n_items == 60 and g.nnz == 60 * 5
    assert_graph_equals_dense(g, dense_knn(x, 5))
    # the item itself is in its row with cosine 1
    s = g.to_scipy()
    np.testing.assert_allclose(s.diagonal(), 1.0, atol=1e-6)


@pytest.mark.parametrize("candidates", ["present", "all"])
def test_missing_items_get_self_loop_only(small, candidates):
    x, present = small
    g = build_knn(x, 6, present, candidates=candidates, index="exact", chunk_size=7, progress=False)
    assert_graph_equals_dense(g, dense_knn(x, 6, present, candidates))
    s = g.to_scipy().tocsc()
    for i in np.flatnonzero(~present):
        row = g.indices[g.indptr[i]:g.indptr[i + 1]]
        assert row.tolist() == [i] and g.weights[g.indptr[i]] == 1.0
        assert s[:, i].nnz == 1  # appears in no other row
    if candidates == "present":
        assert np.all(np.diff(g.indptr)[present] == 6)


def test_missing_features_are_never_read():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 8)).astype(np.float32)
    present = np.ones(30, bool)
    present[[3, 7]] = False
    x[3] = np.nan  # a missing item's row may be garbage (it is not indexed or queried)
    x[7] = 0.0
    g = build_knn(x, 4, present, index="exact", progress=False)
    assert g.indices[g.indptr[3]:g.indptr[4]].tolist() == [3]


def test_normalize_equals_dense(small):
    x, present = small
    raw = build_knn(x, 6, present, index="exact", progress=False)
    norm = normalize_knn(raw)
    assert norm.indptr is raw.indptr and norm.indices is raw.indices
    dense = dense_sym_norm(dense_knn(x, 6, present))
    assert_graph_equals_dense(norm, dense)
    np.testing.assert_allclose(raw.row_degree(), dense_knn(x, 6, present).sum(axis=1), rtol=1e-5)


def test_query_rows_restricted_to_sources(small):
    x, _ = small
    rows = np.array([0, 5, 9, 40])
    sources = np.array([1, 2, 5, 8, 13, 21, 34, 40, 55])
    got = query_rows(x, rows, sources, 4, index="exact", progress=False)
    sim = dense_cosine(x)
    for t, i in enumerate(rows):
        want = np.sort(sources[np.argsort(-sim[i, sources])[:4]])
        cols = got.indices[got.indptr[t]:got.indptr[t + 1]]
        np.testing.assert_array_equal(cols, want)
        np.testing.assert_allclose(got.weights[got.indptr[t]:got.indptr[t + 1]], sim[i, want], atol=1e-5)
    # fewer sources than k: every source, once
    few = query_rows(x, rows, np.array([2, 3]), 4, index="exact", progress=False)
    assert np.diff(few.indptr).tolist() == [2, 2, 2, 2]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_recall_and_self(kind):
    x = clustered_features(3000, 32, n_clusters=10, seed=5)
    exact = build_knn(x, 10, index="exact", progress=False).to_scipy()
    approx = build_knn(x, 10, index=kind, nlist=32, nprobe=8, progress=False)
    a = approx.to_scipy()
    hits = exact.multiply(a) != 0
    assert hits.sum() / exact.nnz >= 0.9
    assert np.all(a.diagonal() > 0.99)  # every item in its own row
    assert np.all(np.diff(approx.indptr) == 10)


def test_ivf_is_deterministic_for_a_seed():
    x = clustered_features(2000, 16, seed=2)
    present = np.random.default_rng(1).random(2000) < 0.7
    kw = dict(index="ivf", nlist=20, nprobe=3, seed=7, progress=False)
    g1, g2 = build_knn(x, 10, present, **kw), build_knn(x, 10, present, **kw)
    np.testing.assert_array_equal(g1.indptr, g2.indptr)
    np.testing.assert_array_equal(g1.indices, g2.indices)
    np.testing.assert_array_equal(g1.weights, g2.weights)


def test_auto_uses_exact_below_threshold(small):
    x, present = small
    auto = build_knn(x, 5, present, progress=False)
    exact = build_knn(x, 5, present, index="exact", progress=False)
    np.testing.assert_array_equal(auto.indices, exact.indices)


def test_bad_input_errors(small):
    x, present = small
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_knn(bad, 5, progress=False)
    zero = x.copy()
    zero[4] = 0
    with pytest.raises(ValueError, match="all zero"):
        build_knn(zero, 5, progress=False)
    with pytest.raises(ValueError, match="k must lie"):
        build_knn(x, 61, progress=False)
    with pytest.raises(ValueError, match="k must lie"):
        build_knn(x, 0, progress=False)
    with pytest.raises(ValueError, match="present must have shape"):
        build_knn(x, 5, present[:-1], progress=False)
    with pytest.raises(ValueError, match="boolean"):
        build_knn(x, 5, present.astype(int), progress=False)
    with pytest.raises(ValueError, match="shape"):
        build_knn(x[0], 1, progress=False)
    with pytest.raises(ValueError, match="index must be"):
        build_knn(x, 5, index="lsh", progress=False)
    with pytest.raises(ValueError, match="sorted"):
        query_rows(x, np.array([3, 1]), np.arange(10), 2, progress=False)


def test_knngraph_validation():
    ok = KnnGraph(np.array([0, 1, 3]), np.array([0, 0, 1]), np.ones(3, np.float32))
    assert ok.nnz == 3 and ok.n_items == 2
    with pytest.raises(ValueError, match="dtype"):
        KnnGraph(np.array([0, 1], np.int32), np.array([0]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match=r"indices must lie"):
        KnnGraph(np.array([0, 1]), np.array([1]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="strictly increasing"):
        KnnGraph(np.array([0, 2]), np.array([0, 0]), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="indptr"):
        KnnGraph(np.array([0, 2]), np.array([0]), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        KnnGraph(np.array([0, 1]), np.array([0]), np.array([np.nan], np.float32))


@pytest.mark.slow
def test_ivf_recall_at_100k_x_384():
    """The default approximate index reaches >= 0.95 recall@10 against exact search (100K x 384)."""
    n = 100_000
    x = clustered_features(n, 384, seed=11)
    rows = np.sort(np.random.default_rng(0).choice(n, 2000, replace=False))
    everyone = np.arange(n)
    exact = query_rows(x, rows, everyone, 10, index="exact", progress=False)
    graph = build_knn(x, 10, progress=False)  # "auto": above the exact threshold -> IVF
    hits = 0
    for t, i in enumerate(rows):
        want = set(exact.indices[exact.indptr[t]:exact.indptr[t + 1]].tolist())
        hits += len(want & set(graph.indices[graph.indptr[i]:graph.indptr[i + 1]].tolist()))
    assert hits / (10 * rows.size) >= 0.95
