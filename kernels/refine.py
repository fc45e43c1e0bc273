"""Graph-refinement kernels on CSR item–item graphs (DGMRec, SIGIR 2025, Eq. 16).

A modality graph ``S`` is stored as CSR ``(indptr [n+1] int64, indices [nnz] int64, data [nnz] float32)``.
Row ``i`` is the aggregation *target*: ``h_i <- sum_j S_ij h_j``, so ``indices`` of row ``i`` are the
source items ``j``. Refinement (Eq. 16, ``S = alpha * S + (1 - alpha) * S_hat``) rewrites only the rows of
items missing the modality, i.e. it adds or reweights directed edges *into* those items; every other row
is copied bit for bit.

Public functions (all O(n + nnz of the touched rows) apart from the plain copy of untouched rows):

- :func:`refine_rows` — blend the touched rows with new rows, Eq. 16.
- :func:`row_sums` — ``D = S 1`` as float64 ``[n]``.
- :func:`sym_normalize_rows` — ``D^-1/2 S D^-1/2`` restricted to some rows.

The wrappers validate and coerce their inputs and raise ``ValueError`` with the offending argument named;
the ``_``-prefixed Numba kernels assume valid input. Pure numpy/scipy twins live in
:mod:`kernels.reference` and are used only by the tests.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["refine_rows", "row_sums", "sym_normalize_rows"]

# Segments up to this length are sorted by insertion sort; longer ones by a bottom-up merge of such runs.
_INSERTION_SORT_MAX = 32


# --------------------------------------------------------------------------------------------------
# input coercion and validation (pure Python, shared with kernels.sampling)
# --------------------------------------------------------------------------------------------------


def _as_index_array(a, name: str) -> np.ndarray:
    """Return ``a`` as a contiguous 1-D int64 array; reject non-integer dtypes."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_value_array(a, name: str) -> np.ndarray:
    """Return ``a`` as a contiguous 1-D float32 array; reject non-numeric dtypes."""
    arr = np.asarray(a)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "fiu":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_indptr(indptr: np.ndarray, nnz: int, name: str) -> None:
    """``indptr`` must start at 0, never decrease and end at ``nnz``."""
    if indptr.size == 0:
        raise ValueError(f"{name} must have at least one element (n_rows + 1), got 0")
    if indptr[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {indptr[0]}")
    if indptr[-1] != nnz:
        raise ValueError(f"{name}[-1] = {indptr[-1]} but the index/value arrays hold {nnz} entries")
    if indptr.size > 1 and np.any(indptr[1:] < indptr[:-1]):
        raise ValueError(f"{name} must be non-decreasing")


def _check_columns(indices: np.ndarray, n_cols: int, name: str) -> None:
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(
            f"{name} must lie in [0, {n_cols}), got values in [{indices.min()}, {indices.max()}]"
        )


def _coerce_csr(indptr, indices, data, n_cols: int | None, name: str):
    """Coerce a CSR triple to (int64, int64, float32) and check its shape invariants.

    ``n_cols=None`` means square: the column bound is the number of rows. ``data=None`` skips values.
    """
    indptr = _as_index_array(indptr, f"{name} indptr")
    indices = _as_index_array(indices, f"{name} indices")
    if data is not None:
        data = _as_value_array(data, f"{name} data")
        if data.size != indices.size:
            raise ValueError(
                f"{name} data has {data.size} entries but {name} indices has {indices.size}"
            )
    _check_indptr(indptr, indices.size, f"{name} indptr")
    _check_columns(indices, indptr.size - 1 if n_cols is None else n_cols, f"{name} indices")
    return indptr, indices, data


def _coerce_rows(rows, n: int, name: str = "rows") -> np.ndarray:
    """``rows`` must be sorted, unique and inside ``[0, n)``."""
    rows = _as_index_array(rows, name)
    if rows.size:
        if rows[0] < 0 or rows[-1] >= n:
            raise ValueError(f"{name} must lie in [0, {n}), got first {rows[0]} and last {rows[-1]}")
        steps = np.diff(rows)
        if np.any(steps <= 0):
            bad = int(np.flatnonzero(steps <= 0)[0])
            problem = "duplicated" if steps[bad] == 0 else "not sorted"
            raise ValueError(
                f"{name} must be sorted ascending and unique; {problem} at position {bad + 1} "
                f"({rows[bad]} then {rows[bad + 1]}); pass np.unique(rows)"
            )
    return rows


# --------------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _insertion_sort(cols, vals, lo, hi):
    """Stable in-place sort of the pairs ``(cols[k], vals[k])``, ``lo <= k < hi``, by column."""
    for a in range(lo + 1, hi):
        c = cols[a]
        v = vals[a]
        b = a
        while b > lo and cols[b - 1] > c:
            cols[b] = cols[b - 1]
            vals[b] = vals[b - 1]
            b -= 1
        cols[b] = c
        vals[b] = v


@numba.njit(cache=True)
def _sort_by_column(cols, vals, m):
    """Stable in-place sort of the pairs ``(cols[k], vals[k])``, ``k < m``, by column.

    Insertion sort for short segments (kNN rows); otherwise insertion-sorted runs merged bottom-up.
    """
    run = _INSERTION_SORT_MAX
    if m <= run:
        _insertion_sort(cols, vals, 0, m)
        return
    for lo in range(0, m, run):
        _insertion_sort(cols, vals, lo, min(lo + run, m))
    src_cols = cols[:m].copy()
    src_vals = vals[:m].copy()
    dst_cols = np.empty_like(src_cols)
    dst_vals = np.empty_like(src_vals)
    width = run
    while width < m:
        for lo in range(0, m, 2 * width):
            mid = min(lo + width, m)
            hi = min(lo + 2 * width, m)
            a = lo
            b = mid
            for k in range(lo, hi):
                if b >= hi or (a < mid and src_cols[a] <= src_cols[b]):
                    dst_cols[k] = src_cols[a]
                    dst_vals[k] = src_vals[a]
                    a += 1
                else:
                    dst_cols[k] = src_cols[b]
                    dst_vals[k] = src_vals[b]
                    b += 1
        src_cols, dst_cols = dst_cols, src_cols
        src_vals, dst_vals = dst_vals, src_vals
        width *= 2
    for k in range(m):  # explicit loops: slice assignment costs seconds of compile time
        cols[k] = src_cols[k]
        vals[k] = src_vals[k]


@numba.njit(cache=True)
def _blend_row(indptr, indices, data, i, new_indptr, new_indices, new_data, r, alpha, tolerance,
               buf_cols, buf_vals):
    """Blend old row ``i`` with new row ``r`` into the buffers; return how many entries survive.

    On return ``buf_cols[:m]`` holds the columns ascending and ``buf_vals[:m]`` the float32-rounded,
    non-zero values (stored in float64, exactly) whose magnitude is at least ``tolerance`` times the row's
    largest. Old entries go first so that, after the stable sort, a column on both sides is computed as
    ``alpha * old + (1 - alpha) * new``.
    """
    beta = 1.0 - alpha
    p = 0
    for e in range(indptr[i], indptr[i + 1]):
        buf_cols[p] = indices[e]
        buf_vals[p] = alpha * np.float64(data[e])
        p += 1
    for e in range(new_indptr[r], new_indptr[r + 1]):
        buf_cols[p] = new_indices[e]
        buf_vals[p] = beta * np.float64(new_data[e])
        p += 1
    _sort_by_column(buf_cols, buf_vals, p)
    kept = 0
    q = 0
    while q < p:
        col = buf_cols[q]
        acc = buf_vals[q]
        q += 1
        while q < p and buf_cols[q] == col:
            acc += buf_vals[q]
            q += 1
        value = np.float32(acc)
        if value != 0.0:
            buf_cols[kept] = col
            buf_vals[kept] = value
            kept += 1
    if tolerance > 0.0 and kept > 0:
        largest = 0.0
        for q in range(kept):
            largest = max(largest, abs(buf_vals[q]))
        floor = tolerance * largest
        survivors = 0
        for q in range(kept):
            if abs(buf_vals[q]) >= floor:
                buf_cols[survivors] = buf_cols[q]
                buf_vals[survivors] = buf_vals[q]
                survivors += 1
        kept = survivors
    return kept


@numba.njit(parallel=True, cache=True)
def _merge_touched(indptr, indices, data, rows, new_indptr, new_indices, new_data, alpha, tolerance,
                   scratch_ptr):
    """Pass 1: blend every touched row into its own segment of a scratch buffer and count the survivors.

    Touched row ``r`` owns ``scratch_ptr[r]:scratch_ptr[r + 1]`` (room for its old plus new entries);
    after the pass its first ``counts[r]`` slots hold the blended row.
    """
    n_rows = rows.shape[0]
    total = scratch_ptr[n_rows]
    s_cols = np.empty(total, dtype=np.int64)
    s_vals = np.empty(total, dtype=np.float64)
    counts = np.empty(n_rows, dtype=np.int64)
    for r in numba.prange(n_rows):
        start = scratch_ptr[r]
        counts[r] = _blend_row(
            indptr, indices, data, rows[r], new_indptr, new_indices, new_data, r, alpha, tolerance,
            s_cols[start:], s_vals[start:],
        )
    return s_cols, s_vals, counts


@numba.njit(parallel=True, cache=True)
def _assemble(indptr, indices, data, rows, scratch_ptr, s_cols, s_vals, counts):
    """Pass 2: prefix-sum the row lengths, then copy the untouched rows and the blended touched rows.

    Block b holds the untouched rows strictly between ``rows[b-1]`` and ``rows[b]`` (contiguous in both
    the input and the output, shifted by ``shift[b]``) followed by the touched row ``rows[b]``; the last
    block (b = R) has no touched row.
    """
    n = indptr.shape[0] - 1
    n_rows = rows.shape[0]
    shift = np.empty(n_rows + 1, dtype=np.int64)
    shift[0] = 0
    for r in range(n_rows):
        i = rows[r]
        shift[r + 1] = shift[r] + counts[r] - (indptr[i + 1] - indptr[i])
    nnz_out = indptr[n] + shift[n_rows]
    out_indptr = np.empty(n + 1, dtype=np.int64)
    out_indices = np.empty(nnz_out, dtype=np.int64)
    out_data = np.empty(nnz_out, dtype=np.float32)
    out_indptr[0] = 0
    for b in numba.prange(n_rows + 1):
        lo = 0
        if b > 0:
            lo = rows[b - 1] + 1
        hi = n
        if b < n_rows:
            hi = rows[b]
        sh = shift[b]
        for i in range(lo, hi):
            out_indptr[i + 1] = indptr[i + 1] + sh
        # explicit loops: slice assignment costs seconds of compile time
        for e in range(indptr[lo], indptr[hi]):
            out_indices[e + sh] = indices[e]
            out_data[e + sh] = data[e]
        if b < n_rows:
            t = rows[b]
            dst = indptr[t] + sh
            src = scratch_ptr[b]
            m = counts[b]
            out_indptr[t + 1] = dst + m
            for q in range(m):
                out_indices[dst + q] = s_cols[src + q]
                out_data[dst + q] = np.float32(s_vals[src + q])
    return out_indptr, out_indices, out_data


@numba.njit(parallel=True, cache=True)
def _row_sums(indptr, data):
    n = indptr.shape[0] - 1
    out = np.empty(n, dtype=np.float64)
    for i in numba.prange(n):
        acc = 0.0
        for e in range(indptr[i], indptr[i + 1]):
            acc += data[e]
        out[i] = acc
    return out


@numba.njit(parallel=True, cache=True)
def _sym_normalize(indptr, indices, data, degree, rows, out):
    for r in numba.prange(rows.shape[0]):
        i = rows[r]
        d_i = degree[i]
        for e in range(indptr[i], indptr[i + 1]):
            d = d_i * degree[indices[e]]
            if d > 0.0:
                out[e] = np.float32(data[e] / np.sqrt(d))
            else:
                out[e] = np.float32(0.0)


# --------------------------------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------------------------------


def refine_rows(indptr, indices, data, rows, new_indptr, new_indices, new_data, alpha, tolerance=0.0):
    r"""Blend the rows of items missing a modality with newly built rows (DGMRec Eq. 16).

    For every target row :math:`i \in` ``rows`` and column :math:`j`:

    .. math:: S'_{ij} = \alpha\, S_{ij} + (1-\alpha)\, \hat S_{ij}

    where an entry absent on one side counts as 0. Every other row is copied bit for bit.

    Parameters
    ----------
    1. indptr, indices, data : old CSR graph, ``[n+1]`` int64, ``[nnz]`` int64, ``[nnz]`` float32
       (other integer / real dtypes are coerced). Square: columns lie in ``[0, n)``.
    2. rows : ``[R]`` int64, sorted, unique target rows in ``[0, n)``.
    3. new_indptr, new_indices, new_data : CSR with ``R`` rows; row ``r`` holds the new edges into
       ``rows[r]`` (``[R+1]``, ``[nnz_new]``, ``[nnz_new]``).
    4. alpha : float in ``[0, 1]``, weight of the *old* row (the paper's alpha; a weight ``lam`` on the
       rebuilt graph is ``alpha = 1 - lam``).
    5. tolerance : float in ``[0, 1)``; a blended entry whose magnitude is below ``tolerance`` times its
       row's largest is dropped. 0 (default) keeps every non-zero entry: the dense maths of the reference.

    Returns
    -------
    ``(out_indptr [n+1] int64, out_indices [nnz'] int64, out_data [nnz'] float32)``.

    Notes
    -----
    Touched rows come out canonical: columns ascending, duplicate columns (on either side) summed, and
    entries whose float32 value is exactly 0.0 (or below the tolerance) dropped. Hence ``alpha=1`` returns
    the old touched rows and ``alpha=0`` the new rows (canonicalised). Values are blended in float64 and
    rounded once to float32.
    Repeated calls grow a touched row by up to the new row's length each time: old entries decay by
    ``alpha`` per call but never reach 0. A positive ``tolerance`` bounds that: if every new row carries
    the row's largest weight, an entry from ``g`` calls ago weighs ``alpha^g`` of the newest and survives
    only while ``alpha^g >= tolerance``, so a row keeps ``floor(ln tolerance / ln alpha) + 1`` calls'
    worth of entries at most (10 at ``alpha=0.6, tolerance=0.01``).
    Cost: O(n + nnz) for the copy of the untouched rows, O(k log k) per touched row of k old + new
    entries (insertion sort for k <= 32), plus a scratch buffer of 16 bytes per old + new touched entry.
    Two Numba passes: blend + count the touched rows, then prefix-sum and fill the output.

    Example
    -------
    >>> import numpy as np
    >>> indptr, indices, data = np.array([0, 1, 2]), np.array([0, 1]), np.ones(2, np.float32)
    >>> out = refine_rows(indptr, indices, data, [1], [0, 1], [0], [1.0], alpha=0.25)
    >>> out[1].tolist(), out[2].tolist()
    ([0, 0, 1], [1.0, 0.75, 0.25])
    """
    indptr, indices, data = _coerce_csr(indptr, indices, data, None, "graph")
    n = indptr.size - 1
    rows = _coerce_rows(rows, n)
    new_indptr, new_indices, new_data = _coerce_csr(new_indptr, new_indices, new_data, n, "new")
    if new_indptr.size != rows.size + 1:
        raise ValueError(
            f"new indptr must have len(rows) + 1 = {rows.size + 1} elements (one new row per target row), "
            f"got {new_indptr.size}"
        )
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    tolerance = float(tolerance)
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must lie in [0, 1), got {tolerance}")
    room = (indptr[rows + 1] - indptr[rows]) + np.diff(new_indptr)
    scratch_ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(room, out=scratch_ptr[1:])
    s_cols, s_vals, counts = _merge_touched(
        indptr, indices, data, rows, new_indptr, new_indices, new_data, alpha, tolerance, scratch_ptr
    )
    return _assemble(indptr, indices, data, rows, scratch_ptr, s_cols, s_vals, counts)


def row_sums(indptr, data):
    """Row sums of a CSR matrix, ``[n]`` float64 (the degree vector ``D = S 1``).

    ``indptr`` is ``[n+1]``; ``data`` is ``[nnz]`` (coerced to float32, summed in float64).
    """
    indptr = _as_index_array(indptr, "indptr")
    data = _as_value_array(data, "data")
    _check_indptr(indptr, data.size, "indptr")
    return _row_sums(indptr, data)


def sym_normalize_rows(indptr, indices, data, degree, rows=None):
    r"""Symmetric normalisation :math:`D^{-1/2} S D^{-1/2}` of some rows of a CSR graph.

    For each entry ``e`` of a row ``i`` in ``rows`` with column ``j``:
    ``data'[e] = data[e] / sqrt(degree[i] * degree[j])``, and 0 when that product is 0. Entries of the
    other rows are copied unchanged.

    Parameters
    ----------
    1. indptr, indices, data : CSR graph, ``[n+1]``, ``[nnz]``, ``[nnz]`` (coerced to int64/int64/float32).
    2. degree : ``[n]`` non-negative float64, usually ``row_sums(indptr, data)`` of the graph.
    3. rows : sorted unique ``[R]`` rows to normalise, or ``None`` for all rows (default).

    Returns
    -------
    ``new_data`` : ``[nnz]`` float32, aligned with ``indices``.
    """
    indptr, indices, data = _coerce_csr(indptr, indices, data, None, "graph")
    n = indptr.size - 1
    degree = np.asarray(degree)
    if degree.shape != (n,):
        raise ValueError(f"degree must have shape ({n},), got {degree.shape}")
    if degree.size and degree.dtype.kind not in "fiu":
        raise ValueError(f"degree must hold real numbers, got dtype {degree.dtype}")
    degree = np.ascontiguousarray(degree, dtype=np.float64)
    if not np.all(degree >= 0.0):
        raise ValueError("degree must be non-negative and not NaN (row sums of a non-negative graph)")
    if rows is None:
        out = np.empty_like(data)
        rows = np.arange(n, dtype=np.int64)
    else:
        out = data.copy()
        rows = _coerce_rows(rows, n)
    _sym_normalize(indptr, indices, data, degree, rows, out)
    return out
