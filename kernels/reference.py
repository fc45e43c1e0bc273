"""Pure numpy / scipy twins of the Numba kernels, used ONLY by the tests (slow, written for clarity).

- :func:`refine_rows_reference` — Eq. 16 on the touched rows with scipy sparse arithmetic.
- :func:`row_sums_reference`, :func:`sym_normalize_rows_reference` — per-entry numpy.
- :func:`sym_normalize_dense_reference` — the dense ``D^-1/2 S D^-1/2`` on the chosen rows.
- :func:`train_pairs_reference`, :func:`negatives_valid_reference` — what BPR sampling must satisfy.
- :func:`ivf_topk_reference` — per query, every probed list's members scored and sorted in numpy.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def _entry_rows(indptr: np.ndarray) -> np.ndarray:
    """Row id of every CSR entry, ``[nnz]``."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def refine_rows_reference(indptr, indices, data, rows, new_indptr, new_indices, new_data, alpha, tolerance=0.0):
    """Twin of :func:`kernels.refine.refine_rows`: returns ``(indptr, indices, data)`` of the result.

    Touched rows: scipy computes ``alpha * old[rows] + (1 - alpha) * new`` in float64 (summing duplicate
    columns), the result is rounded to float32, exact zeros and entries below ``tolerance`` times the
    row's largest magnitude are dropped and columns sorted. Untouched
    rows are sliced straight from the input arrays.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    data = np.asarray(data, dtype=np.float32)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(indptr) - 1
    old = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(n, n))
    new = sp.csr_matrix(
        (np.asarray(new_data, dtype=np.float64), np.asarray(new_indices, dtype=np.int64),
         np.asarray(new_indptr, dtype=np.int64)),
        shape=(len(rows), n),
    )
    old_rows = old[rows].tocsr()
    old_rows.sum_duplicates()
    new = new.tocsr()
    new.sum_duplicates()
    blended = (old_rows * alpha + new * (1.0 - alpha)).tocsr()
    blended.sum_duplicates()
    blended = sp.csr_matrix(
        (blended.data.astype(np.float32), blended.indices, blended.indptr), shape=blended.shape
    )
    blended.eliminate_zeros()
    blended.sort_indices()

    touched = {int(r): k for k, r in enumerate(rows)}
    out_indptr = [0]
    out_indices, out_data = [], []
    for i in range(n):
        if i in touched:
            k = touched[i]
            lo, hi = blended.indptr[k], blended.indptr[k + 1]
            cols, vals = blended.indices[lo:hi], blended.data[lo:hi]
            if tolerance > 0 and vals.size:
                magnitude = np.abs(vals.astype(np.float64))
                keep = magnitude >= tolerance * magnitude.max()
                cols, vals = cols[keep], vals[keep]
        else:
            lo, hi = indptr[i], indptr[i + 1]
            cols, vals = indices[lo:hi], data[lo:hi]
        out_indices.append(np.asarray(cols, dtype=np.int64))
        out_data.append(np.asarray(vals, dtype=np.float32))
        out_indptr.append(out_indptr[-1] + len(cols))
    return (
        np.asarray(out_indptr, dtype=np.int64),
        np.concatenate(out_indices) if out_indices else np.zeros(0, np.int64),
        np.concatenate(out_data) if out_data else np.zeros(0, np.float32),
    )


def row_sums_reference(indptr, data) -> np.ndarray:
    """Twin of :func:`kernels.refine.row_sums`, ``[n]`` float64."""
    indptr = np.asarray(indptr, dtype=np.int64)
    return np.bincount(
        _entry_rows(indptr), weights=np.asarray(data, dtype=np.float32).astype(np.float64),
        minlength=len(indptr) - 1,
    )


def _inv_sqrt(degree) -> np.ndarray:
    degree = np.asarray(degree, dtype=np.float64)
    out = np.zeros_like(degree)
    positive = degree > 0
    out[positive] = 1.0 / np.sqrt(degree[positive])
    return out


def sym_normalize_rows_reference(indptr, indices, data, degree, rows=None) -> np.ndarray:
    """Twin of :func:`kernels.refine.sym_normalize_rows`, per entry: ``data * d_i^-1/2 * d_j^-1/2``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    data = np.asarray(data, dtype=np.float32)
    n = len(indptr) - 1
    inv = _inv_sqrt(degree)
    entry_rows = _entry_rows(indptr)
    scaled = (data.astype(np.float64) * inv[entry_rows] * inv[indices]).astype(np.float32)
    chosen = np.ones(n, dtype=bool) if rows is None else np.isin(np.arange(n), rows)
    return np.where(chosen[entry_rows], scaled, data)


def sym_normalize_dense_reference(indptr, indices, data, degree, rows=None) -> np.ndarray:
    """Dense ``[n, n]`` float64: rows in ``rows`` of ``D^-1/2 S D^-1/2``, the other rows of ``S``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    dense = sp.csr_matrix(
        (np.asarray(data, dtype=np.float64), np.asarray(indices, dtype=np.int64), indptr), shape=(n, n)
    ).toarray()
    inv = _inv_sqrt(degree)
    normalised = np.diag(inv) @ dense @ np.diag(inv)
    chosen = np.ones(n, dtype=bool) if rows is None else np.isin(np.arange(n), rows)
    return np.where(chosen[:, None], normalised, dense)


def train_pairs_reference(indptr, indices) -> np.ndarray:
    """All train pairs as a ``[nnz, 2]`` int64 array ``(user, item)``, sorted lexicographically."""
    indptr = np.asarray(indptr, dtype=np.int64)
    pairs = np.stack([_entry_rows(indptr), np.asarray(indices, dtype=np.int64)], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def negatives_valid_reference(indptr, indices, users, neg, n_items) -> np.ndarray:
    """``[m]`` bool: ``neg[k]`` lies in ``[0, n_items)`` and is absent from the train row of ``users[k]``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    users = np.asarray(users, dtype=np.int64)
    neg = np.asarray(neg, dtype=np.int64)
    train = sp.csr_matrix(
        (np.ones(len(indices)), indices, indptr), shape=(len(indptr) - 1, n_items)
    )
    in_range = (neg >= 0) & (neg < n_items)
    hit = np.zeros(len(neg), dtype=bool)
    if np.any(in_range):
        hit[in_range] = np.asarray(train[users[in_range], neg[in_range]]).ravel() != 0
    return in_range & ~hit


def ivf_topk_reference(features, query_items, query_inv_norm, list_ptr, list_items, list_inv_norm, probes, k):
    """Twin of :func:`kernels.ivf.ivf_topk`: returns ``(items [r, k] int64, scores [r, k] float32)``.

    Query by query: the members of the probed lists are scored ``((x_q . x_j) * inv_q) * inv_j`` in
    float32, sorted by score descending then item ascending, and the first k kept; missing slots are
    ``(-1, -inf)``. Equal to the kernel bit for bit whenever the inner products are exact in float32
    (e.g. small integer features); otherwise up to the order of the float32 sums.
    """
    features = np.asarray(features, dtype=np.float32)
    query_items = np.asarray(query_items, dtype=np.int64)
    query_inv_norm = np.asarray(query_inv_norm, dtype=np.float32)
    list_ptr = np.asarray(list_ptr, dtype=np.int64)
    list_items = np.asarray(list_items, dtype=np.int64)
    list_inv_norm = np.asarray(list_inv_norm, dtype=np.float32)
    probes = np.asarray(probes, dtype=np.int64)
    items = np.full((query_items.size, k), -1, dtype=np.int64)
    scores = np.full((query_items.size, k), -np.inf, dtype=np.float32)
    for q, item in enumerate(query_items):
        members = np.concatenate([np.arange(list_ptr[lst], list_ptr[lst + 1]) for lst in probes[q]] +
                                 [np.zeros(0, np.int64)])
        dots = features[list_items[members]] @ features[item]
        cand = (dots * query_inv_norm[q]) * list_inv_norm[members]
        order = np.lexsort((list_items[members], -cand))[:k]
        items[q, :order.size] = list_items[members][order]
        scores[q, :order.size] = cand[order]
    return items, scores
