"""Tests of kernels.refine (graph refinement, DGMRec Eq. 16) against the numpy/scipy twins."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference import (
    refine_rows_reference,
    row_sums_reference,
    sym_normalize_dense_reference,
    sym_normalize_rows_reference,
)
from kernels.refine import refine_rows, row_sums, sym_normalize_rows

SETTINGS = settings(deadline=None, max_examples=60)


def _random_rows(rng, n_rows, n_cols, max_len, duplicates, dyadic, canonical=False):
    """A random CSR with ``n_rows`` rows over ``n_cols`` columns, as (indptr, indices, data)."""
    indptr = [0]
    indices, data = [], []
    for _ in range(n_rows):
        k = int(rng.integers(0, max_len + 1))
        if duplicates:
            cols = rng.integers(0, n_cols, size=k)
        else:
            cols = rng.permutation(n_cols)[: min(k, n_cols)]
        if canonical:
            cols = np.sort(cols)
        if dyadic:  # multiples of 1/8: every sum below is exact in float64
            vals = rng.integers(-8, 9, size=len(cols)) / 8.0
        else:
            vals = rng.uniform(-1.0, 1.0, size=len(cols))
            vals[rng.random(len(cols)) < 0.1] = 0.0  # some explicit zeros
        if canonical:
            vals[vals == 0.0] = 0.5
        indices.append(cols)
        data.append(vals)
        indptr.append(indptr[-1] + len(cols))
    return (
        np.asarray(indptr, dtype=np.int64),
        np.concatenate(indices).astype(np.int64) if indices else np.zeros(0, np.int64),
        np.concatenate(data).astype(np.float32) if data else np.zeros(0, np.float32),
    )


@st.composite
def refine_problems(draw, duplicates=False, dyadic=False, canonical=False):
    """Random old graph, sorted touched rows, new CSR for them and alpha."""
    n = draw(st.integers(1, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    graph = _random_rows(rng, n, n, 6, duplicates, dyadic, canonical)
    rows = np.flatnonzero(rng.random(n) < draw(st.floats(0.0, 1.0))).astype(np.int64)
    new = _random_rows(rng, len(rows), n, 6, duplicates, dyadic, canonical)
    if dyadic:
        alpha = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]))
    else:
        alpha = draw(st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.5, 1.0]))
    return graph, rows, new, alpha


def _row(csr, i):
    indptr, indices, data = csr
    return indices[indptr[i]:indptr[i + 1]], data[indptr[i]:indptr[i + 1]]


@SETTINGS
@given(refine_problems())
def test_refine_rows_equals_reference_exactly(problem):
    graph, rows, new, alpha = problem
    out = refine_rows(*graph, rows, *new, alpha)
    ref = refine_rows_reference(*graph, rows, *new, alpha)
    assert [a.dtype for a in out] == [np.int64, np.int64, np.float32]
    for got, want in zip(out, ref):
        assert np.array_equal(got, want)


@SETTINGS
@given(refine_problems(duplicates=True, dyadic=True))
def test_refine_rows_sums_duplicate_columns_like_reference(problem):
    graph, rows, new, alpha = problem
    out = refine_rows(*graph, rows, *new, alpha)
    ref = refine_rows_reference(*graph, rows, *new, alpha)
    assert np.array_equal(out[0], ref[0])
    assert np.array_equal(out[1], ref[1])
    assert np.allclose(out[2], ref[2], rtol=1e-6, atol=0.0)


@SETTINGS
@given(refine_problems(duplicates=True))
def test_untouched_rows_bit_identical_and_edges_only_into_touched_rows(problem):
    graph, rows, new, alpha = problem
    out = refine_rows(*graph, rows, *new, alpha)
    touched = set(rows.tolist())
    n = len(graph[0]) - 1
    for i in range(n):
        old_cols, old_vals = _row(graph, i)
        cols, vals = _row(out, i)
        if i not in touched:
            assert cols.tobytes() == old_cols.tobytes()
            assert vals.tobytes() == old_vals.tobytes()
        else:
            assert np.all(np.diff(cols) > 0), "touched rows are sorted and unique"
            assert np.all(vals != 0.0), "touched rows hold no explicit zeros"
    old_edges = {(int(i), int(j)) for i, j in zip(np.repeat(np.arange(n), np.diff(graph[0])), graph[1])}
    new_edges = {(int(i), int(j)) for i, j in zip(np.repeat(np.arange(n), np.diff(out[0])), out[1])}
    assert all(i in touched for i, _ in new_edges - old_edges)


@SETTINGS
@given(refine_problems(canonical=True))
def test_alpha_one_keeps_old_rows_and_alpha_zero_gives_new_rows(problem):
    graph, rows, new, _ = problem
    keep = refine_rows(*graph, rows, *new, 1.0)
    for got, want in zip(keep, graph):
        assert np.array_equal(got, want)
    replace = refine_rows(*graph, rows, *new, 0.0)
    for r, i in enumerate(rows):
        cols, vals = _row(replace, i)
        new_cols, new_vals = _row(new, r)
        assert np.array_equal(cols, new_cols)
        assert np.array_equal(vals, new_vals)


@pytest.mark.parametrize("duplicates, dyadic, alpha", [(False, False, 0.3), (True, True, 0.75)])
def test_refine_rows_long_rows_match_reference(duplicates, dyadic, alpha):
    # rows of up to 2 * 150 entries go through the merge-sort path of the row blend
    rng = np.random.default_rng(5)
    graph = _random_rows(rng, 300, 300, 150, duplicates, dyadic)
    rows = np.flatnonzero(rng.random(300) < 0.5)
    new = _random_rows(rng, len(rows), 300, 150, duplicates, dyadic)
    out = refine_rows(*graph, rows, *new, alpha)
    ref = refine_rows_reference(*graph, rows, *new, alpha)
    for got, want in zip(out, ref):
        assert np.array_equal(got, want)


@SETTINGS
@given(refine_problems(duplicates=True), st.sampled_from([0.05, 0.3, 0.9]))
def test_refine_rows_tolerance_equals_reference_and_only_drops_entries(problem, tolerance):
    graph, rows, new, alpha = problem
    out = refine_rows(*graph, rows, *new, alpha, tolerance)
    ref = refine_rows_reference(*graph, rows, *new, alpha, tolerance)
    for got, want in zip(out, ref):
        assert np.array_equal(got, want)
    full = refine_rows(*graph, rows, *new, alpha)
    for i in rows:
        cols, vals = _row(out, i)
        full_cols, full_vals = _row(full, i)
        assert set(cols.tolist()) <= set(full_cols.tolist())
        if full_vals.size:
            largest = np.abs(full_vals).max()
            assert np.all(np.abs(vals) >= tolerance * largest)
            assert np.abs(vals).max() == largest, "the row's largest entry always survives"


def _refine_repeatedly(calls, k, alpha, tolerance):
    """Refine row 0 ``calls`` times, each time with k fresh columns of weight 1; return its lengths.

    The row starts as k columns of weight ``1 - alpha``, what one refinement gives a fresh column; the
    other rows of the square graph are empty.
    """
    n = (calls + 1) * k
    indptr = np.full(n + 1, k)
    indptr[0] = 0
    indices, data = np.arange(k), np.full(k, 1.0 - alpha, np.float32)
    lengths = []
    for call in range(1, calls + 1):
        fresh = np.arange(call * k, (call + 1) * k)
        indptr, indices, data = refine_rows(indptr, indices, data, [0], [0, k], fresh, np.ones(k), alpha,
                                            tolerance)
        lengths.append(int(indptr[1]))
        assert indptr[-1] == indptr[1]
    return lengths


def test_refine_rows_tolerance_bounds_row_growth():
    # Without a tolerance a row keeps every column it ever had: k more per refinement (Eq. 16 is a union).
    assert _refine_repeatedly(15, 4, 0.6, 0.0) == [4 * (c + 1) for c in range(1, 16)]
    # With alpha = 0.6 and tolerance 0.01 an entry from g calls ago weighs 0.6^g of the newest (after
    # scaling): it survives for g <= 9, so the row stops growing at 10 generations of k columns.
    lengths = _refine_repeatedly(15, 4, 0.6, 0.01)
    assert lengths[:9] == [4 * (c + 1) for c in range(1, 10)]
    assert lengths[9:] == [40] * 6


def test_refine_rows_small_example():
    # 3 self-loops; item 2 misses the modality and gets edges from items 0 and 1.
    indptr, indices, data = np.arange(4), np.arange(3), np.ones(3, np.float32)
    out = refine_rows(indptr, indices, data, [2], [0, 2], [1, 0], [0.5, 0.25], alpha=0.5)
    assert out[0].tolist() == [0, 1, 2, 5]
    assert out[1].tolist() == [0, 1, 0, 1, 2]
    assert out[2].tolist() == [1.0, 1.0, 0.125, 0.25, 0.5]


def test_refine_rows_coerces_dtypes_and_accepts_empty_rows():
    indptr, indices, data = np.array([0, 1, 2], np.int32), np.array([1, 0], np.int32), np.array([2.0, 3.0])
    out = refine_rows(indptr, indices, data, [], [0], [], [], 0.3)
    assert [a.dtype for a in out] == [np.int64, np.int64, np.float32]
    assert out[0].tolist() == [0, 1, 2] and out[1].tolist() == [1, 0] and out[2].tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rows=[2, 1]), "sorted"),
        (dict(rows=[1, 1]), "duplicated"),
        (dict(rows=[1, 3]), r"rows must lie in \[0, 3\)"),
        (dict(rows=[-1, 1]), r"rows must lie in \[0, 3\)"),
        (dict(new_indptr=[0, 2]), "len\\(rows\\) \\+ 1"),
        (dict(new_indptr=[0, 1, 3]), "new indptr\\[-1\\]"),
        (dict(new_indices=[0, 5], new_data=[1.0, 1.0]), "new indices must lie"),
        (dict(new_data=[1.0]), "new data has 1 entries"),
        (dict(alpha=1.5), "alpha must lie in"),
        (dict(alpha=float("nan")), "alpha must lie in"),
        (dict(tolerance=1.0), "tolerance must lie in"),
        (dict(tolerance=-0.1), "tolerance must lie in"),
        (dict(indptr=[0, 1, 1, 2]), "graph indptr\\[-1\\]"),
        (dict(indptr=[0, 2, 1, 3]), "non-decreasing"),
        (dict(indices=[0, 1, 7]), "graph indices must lie"),
        (dict(rows=[0.0, 1.0]), "must hold integers"),
    ],
)
def test_refine_rows_validation(change, message):
    args = dict(
        indptr=[0, 1, 2, 3], indices=[0, 1, 2], data=[1.0, 1.0, 1.0],
        rows=[0, 1], new_indptr=[0, 1, 2], new_indices=[2, 2], new_data=[0.5, 0.5], alpha=0.5,
    )
    args.update(change)
    with pytest.raises(ValueError, match=message):
        refine_rows(**args)


@SETTINGS
@given(refine_problems(duplicates=True), st.booleans())
def test_sym_normalize_rows_matches_per_entry_and_dense_reference(problem, all_rows):
    (indptr, indices, data), rows, _, _ = problem
    data = np.abs(data)  # a similarity graph: non-negative weights, some rows/columns of degree 0
    degree = row_sums(indptr, data)
    assert np.allclose(degree, row_sums_reference(indptr, data), rtol=1e-12, atol=1e-12)
    chosen = None if all_rows else rows
    got = sym_normalize_rows(indptr, indices, data, degree, chosen)
    assert got.dtype == np.float32
    assert np.allclose(got, sym_normalize_rows_reference(indptr, indices, data, degree, chosen), rtol=1e-6)
    n = len(indptr) - 1
    dense = np.zeros((n, n))
    np.add.at(dense, (np.repeat(np.arange(n), np.diff(indptr)), indices), got)
    assert np.allclose(dense, sym_normalize_dense_reference(indptr, indices, data, degree, chosen),
                       rtol=1e-6, atol=1e-7)
    if chosen is not None:
        untouched = ~np.isin(np.repeat(np.arange(n), np.diff(indptr)), chosen)
        assert got[untouched].tobytes() == data[untouched].tobytes()


def test_sym_normalize_zero_degree_and_validation():
    indptr, indices, data = [0, 2, 2], [0, 1], [1.0, 1.0]
    # row 1 is empty, so degree[1] = 0 and the edge 0 <- 1 becomes 0
    assert sym_normalize_rows(indptr, indices, data, row_sums(indptr, data)).tolist() == [0.5, 0.0]
    with pytest.raises(ValueError, match="shape"):
        sym_normalize_rows(indptr, indices, data, [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        sym_normalize_rows(indptr, indices, data, [1.0, -1.0])
    with pytest.raises(ValueError, match="sorted"):
        sym_normalize_rows(indptr, indices, data, [1.0, 1.0], rows=[1, 0])


def test_refine_rows_independent_of_thread_count():
    rng = np.random.default_rng(0)
    graph = _random_rows(rng, 300, 300, 8, True, False)
    rows = np.flatnonzero(rng.random(300) < 0.5)
    new = _random_rows(rng, len(rows), 300, 8, True, False)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = refine_rows(*graph, rows, *new, 0.3)
    finally:
        numba.set_num_threads(before)
    multi = refine_rows(*graph, rows, *new, 0.3)
    for a, b in zip(single, multi):
        assert a.tobytes() == b.tobytes()


def test_kernels_run_at_200k_rows():
    """Sanity at scale: 200,000 rows, 10 entries per row, 2/3 of the rows touched (no timing asserts)."""
    n, k = 200_000, 10
    rng = np.random.default_rng(1)
    indptr = np.arange(0, n * k + 1, k, dtype=np.int64)
    indices = rng.integers(0, n, size=n * k)
    data = rng.random(n * k, dtype=np.float32)
    rows = np.flatnonzero(rng.random(n) < 2 / 3)
    new_indptr = np.arange(0, len(rows) * k + 1, k, dtype=np.int64)
    new_indices = rng.integers(0, n, size=len(rows) * k)
    new_data = rng.random(len(rows) * k, dtype=np.float32)
    out_indptr, out_indices, out_data = refine_rows(
        indptr, indices, data, rows, new_indptr, new_indices, new_data, 0.5
    )
    assert out_indptr[-1] == len(out_indices) == len(out_data)
    lengths = np.diff(out_indptr)
    untouched = np.setdiff1d(np.arange(n), rows)
    assert np.array_equal(lengths[untouched], np.full(len(untouched), k))
    assert np.all(lengths[rows] <= 2 * k)
    degree = row_sums(out_indptr, out_data)
    normalised = sym_normalize_rows(out_indptr, out_indices, out_data, degree, rows)
    assert np.all(np.isfinite(normalised))
