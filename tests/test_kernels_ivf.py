"""Tests of kernels.ivf (the IVF scan behind dgmrec_dgl.graphs.knn) against its numpy twin."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.ivf import ivf_topk
from kernels.reference import ivf_topk_reference

SETTINGS = settings(deadline=None, max_examples=80)


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    return (1.0 / np.linalg.norm(x.astype(np.float64), axis=1)).astype(np.float32)


@st.composite
def ivf_problems(draw):
    """Small integer features (exact inner products, many ties), random lists, probes and k.

    Returns the argument tuple of ``ivf_topk``. Inverse norms are the true ones ("cosine"), all 1 (raw
    inner products: ties everywhere) or random powers of two. Some lists are empty, some items are in no
    list, queries may repeat an item, and k often exceeds the number of candidates.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_items = draw(st.integers(1, 30))
    d = draw(st.integers(1, 9))
    x = rng.integers(-2, 3, size=(n_items, d)).astype(np.float32)
    zero = ~x.any(axis=1)
    x[zero, rng.integers(0, d, size=zero.sum())] = 1.0
    norms = draw(st.sampled_from(["cosine", "ones", "powers_of_two"]))
    if norms == "cosine":
        inv = _inverse_norms(x)
    elif norms == "ones":
        inv = np.ones(n_items, np.float32)
    else:
        inv = (2.0 ** rng.integers(-2, 3, size=n_items)).astype(np.float32)

    n_lists = draw(st.integers(1, 6))
    indexed = rng.permutation(n_items)[:rng.integers(0, n_items + 1)]  # order within a list is arbitrary
    owner = rng.integers(0, n_lists, size=indexed.size)
    order = np.argsort(owner, kind="stable")
    list_items = indexed[order].astype(np.int64)
    list_ptr = np.searchsorted(owner[order], np.arange(n_lists + 1)).astype(np.int64)

    n_queries = draw(st.integers(0, 12))
    nprobe = draw(st.integers(0, n_lists))
    query_items = rng.integers(0, n_items, size=n_queries).astype(np.int64)
    probes = np.array([rng.permutation(n_lists)[:nprobe] for _ in range(n_queries)],
                      dtype=np.int64).reshape(n_queries, nprobe)
    k = draw(st.integers(1, 12))
    return x, query_items, inv[query_items], list_ptr, list_items, inv[list_items], probes, k


@SETTINGS
@given(ivf_problems())
def test_ivf_topk_equals_reference_exactly(problem):
    items, scores = ivf_topk(*problem)
    want_items, want_scores = ivf_topk_reference(*problem)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert items.shape == scores.shape == (problem[1].size, problem[-1])
    np.testing.assert_array_equal(items, want_items)
    assert scores.tobytes() == want_scores.tobytes()


@SETTINGS
@given(ivf_problems())
def test_ivf_topk_rows_are_ordered_and_padded(problem):
    _, query_items, _, list_ptr, _, _, probes, k = problem
    items, scores = ivf_topk(*problem)
    for q in range(query_items.size):
        n_candidates = sum(int(list_ptr[lst + 1] - list_ptr[lst]) for lst in probes[q])
        found = min(k, n_candidates)
        assert np.all(items[q, found:] == -1) and np.all(scores[q, found:] == -np.inf)
        kept = list(zip(-scores[q, :found], items[q, :found]))
        assert kept == sorted(kept), "score descending, then item ascending"
        assert len(set(items[q, :found].tolist())) == found


def test_ivf_topk_float_features_match_reference_up_to_rounding():
    # d = 389: the vectorised tile loop plus a remainder; lists of 1 to 40 members (tile tails)
    rng = np.random.default_rng(0)
    n, d, n_lists, nprobe, k = 600, 389, 23, 5, 10
    x = rng.standard_normal((n, d)).astype(np.float32) + 0.2
    inv = _inverse_norms(x)
    owner = rng.integers(0, n_lists, size=n)
    list_items = np.argsort(owner, kind="stable")
    list_ptr = np.searchsorted(owner[list_items], np.arange(n_lists + 1))
    queries = rng.integers(0, n, size=97)
    probes = np.array([rng.permutation(n_lists)[:nprobe] for _ in queries])
    args = (x, queries, inv[queries], list_ptr, list_items, inv[list_items], probes, k)
    items, scores = ivf_topk(*args)
    want_items, want_scores = ivf_topk_reference(*args)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    same = (items == want_items).all(axis=1)
    assert same.mean() > 0.95  # rows may differ only where two scores are within rounding
    cosine = np.einsum("qd,qkd->qk", x[queries].astype(np.float64), x[items].astype(np.float64))
    cosine *= inv[queries, None].astype(np.float64) * inv[items].astype(np.float64)
    np.testing.assert_allclose(scores, cosine, rtol=1e-5, atol=1e-6)


def test_long_lists_swept_in_blocks_equal_reference_exactly():
    # d = 2048: blocks of 64 members, so lists of up to 200 members span several blocks (integer
    # features keep every inner product exact, hence bit-equal to the twin)
    rng = np.random.default_rng(3)
    n, d, n_lists = 700, 2048, 5
    x = rng.integers(-1, 2, size=(n, d)).astype(np.float32)
    x[~x.any(axis=1), 0] = 1.0
    inv = _inverse_norms(x)
    owner = rng.integers(0, n_lists, size=n)
    list_items = np.argsort(owner, kind="stable")
    list_ptr = np.searchsorted(owner[list_items], np.arange(n_lists + 1))
    assert np.diff(list_ptr).max() > 2 * 64
    queries = rng.integers(0, n, size=23)
    probes = np.array([rng.permutation(n_lists)[:3] for _ in queries])
    args = (x, queries, inv[queries], list_ptr, list_items, inv[list_items], probes, 12)
    items, scores = ivf_topk(*args)
    want_items, want_scores = ivf_topk_reference(*args)
    np.testing.assert_array_equal(items, want_items)
    assert scores.tobytes() == want_scores.tobytes()


def test_probing_every_list_gives_the_exact_cosine_topk():
    rng = np.random.default_rng(1)
    x = rng.integers(-3, 4, size=(50, 6)).astype(np.float32)
    x[~x.any(axis=1), 0] = 1.0
    inv = _inverse_norms(x)
    list_items = rng.permutation(50)
    list_ptr = np.array([0, 7, 7, 30, 50])
    queries = np.arange(50)
    probes = np.tile(np.arange(4), (50, 1))
    items, _ = ivf_topk(x, queries, inv, list_ptr, list_items, inv[list_items], probes, 5)
    cosine = (x @ x.T) * inv[:, None] * inv[None, :]
    for q in queries:
        order = np.lexsort((np.arange(50), -cosine[q]))[:5]
        np.testing.assert_array_equal(items[q], order)
        assert items[q, 0] == q or np.isclose(cosine[q, items[q, 0]], 1.0, atol=1e-6)


def test_ivf_topk_independent_of_thread_count():
    rng = np.random.default_rng(2)
    n, d, n_lists = 3000, 40, 30
    x = rng.standard_normal((n, d)).astype(np.float32)
    inv = _inverse_norms(x)
    owner = rng.integers(0, n_lists, size=n)
    list_items = np.argsort(owner, kind="stable")
    list_ptr = np.searchsorted(owner[list_items], np.arange(n_lists + 1))
    probes = np.array([rng.permutation(n_lists)[:6] for _ in range(n)])
    args = (x, np.arange(n), inv, list_ptr, list_items, inv[list_items], probes, 10)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = ivf_topk(*args)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        multi = ivf_topk(*args)
    finally:
        numba.set_num_threads(before)
    for a, b in zip(single, multi):
        assert a.tobytes() == b.tobytes()


def test_ivf_topk_empty_inputs():
    x = np.eye(3, dtype=np.float32)
    ones = np.ones(3, np.float32)
    items, scores = ivf_topk(x, [], [], [0, 3], [0, 1, 2], ones, np.zeros((0, 1), np.int64), 2)
    assert items.shape == scores.shape == (0, 2)
    # no probes, or only empty lists: every slot stays empty
    items, scores = ivf_topk(x, [1], [1.0], [0, 0, 3], [0, 1, 2], ones, [[0]], 2)
    assert items.tolist() == [[-1, -1]] and np.all(scores == -np.inf)
    items, _ = ivf_topk(x, [1], [1.0], [0, 3], [0, 1, 2], ones, np.zeros((1, 0), np.int64), 2)
    assert items.tolist() == [[-1, -1]]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(features=np.ones(4, np.float32)), "2-D"),
        (dict(query_items=[0, 9]), r"query_items must lie in \[0, 4\)"),
        (dict(query_inv_norm=[1.0]), "query_inv_norm must have 2 entries"),
        (dict(query_inv_norm=[1.0, 0.0]), "finite and positive"),
        (dict(list_inv_norm=[1.0, np.inf, 1.0, 1.0]), "finite and positive"),
        (dict(list_ptr=[0, 2, 3]), r"list_ptr\[-1\]"),
        (dict(list_ptr=[0, 3, 2, 4]), "non-decreasing"),
        (dict(list_items=[0, 1, 2, 7]), "list_items must lie"),
        (dict(probes=[[0, 1]]), "probes must have shape"),
        (dict(probes=[[0, 3], [1, 2]]), r"probes must lie in \[0, 3\)"),
        (dict(probes=[[1, 1], [0, 2]]), "must not repeat"),
        (dict(probes=[[0.0, 1.0], [1.0, 2.0]]), "must hold integers"),
        (dict(k=0), "k must be an integer"),
        (dict(k=2.0), "k must be an integer"),
    ],
)
def test_ivf_topk_validation(change, message):
    args = dict(
        features=np.eye(4, dtype=np.float32), query_items=[0, 3], query_inv_norm=[1.0, 1.0],
        list_ptr=[0, 1, 3, 4], list_items=[0, 1, 2, 3], list_inv_norm=[1.0, 1.0, 1.0, 1.0],
        probes=[[0, 1], [1, 2]], k=2,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        ivf_topk(**args)
