"""Eq. 16 refinement when the items are split over DistDGL partitions and no process holds all features.

The single-machine :func:`~.refine.refine_knn` indexes every source item of modality m (the items that have
it), queries the rows of the items that miss it and blends the new, normalised rows into the old ones. On
partitions each trainer holds the raw rows X_m of the items it owns, so the same computation is split:

1. every trainer indexes the rows of its own source items (FAISS through :func:`~.knn.query_rows`) and
   answers the queries of every trainer (its own missing items' rows, exchanged between the trainers) with
   its top-k (:func:`part_top_k`);
2. each trainer merges the per-part answers to its own queries into the top-k of their union
   (:func:`merge_top_k`): with an exact index that is the top-k over all source items, the single-machine
   query's result;
3. each trainer normalises its new rows as :func:`~.refine.refine_knn` does (a source's degree is its raw row
   sum re-derived from the current features along its current kNN row, :func:`row_cosine_sums`; a refined
   row's degree its new row sum) and blends them into its old rows with the same Numba kernels
   (:func:`refine_own_rows`: ``kernels.refine.sym_normalize_rows`` and ``refine_rows``), on a local
   numbering of the items the rows touch, so that no array has a row per item of the catalog.

The functions here are pure (arrays in, arrays out); the exchange between the trainers is
:meth:`dgmrec_dgl.dist_train._DGMRecParts.refine`'s. ``tests/test_dist_refine.py`` checks that two parts give
the single-machine refined rows.
"""

from __future__ import annotations

import numpy as np

from dgmrec_dgl.graphs.knn import query_rows
from kernels.refine import refine_rows, row_sums, sym_normalize_rows

__all__ = ["merge_top_k", "part_top_k", "refine_own_rows", "row_cosine_sums"]


def part_top_k(sources: np.ndarray, source_rows: np.ndarray, queries: np.ndarray, k: int, *,
               index: str = "auto", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One part's answer: the cosine top-k of each query row among this part's source items.

    Args:
        sources: int64 [s] sorted global ids of the part's source items (e.g. its items that have m).
        source_rows: float32 [s, d] their raw rows X_m.
        queries: float32 [q, d] the query rows (every trainer's items to refine).
        k: neighbours per query.
        index, seed: as :func:`~.knn.query_rows` (``auto``: exact up to 20,000 sources).

    Returns:
        ``(ids [q, min(k, s)] int64, cosines [q, min(k, s)] float32)``; id -1 and cosine -inf where the index
        found fewer (an approximate one).
    """
    q, s = len(queries), len(sources)
    if q == 0 or s == 0:
        return np.zeros((q, 0), np.int64), np.zeros((q, 0), np.float32)
    rows = np.ascontiguousarray(np.concatenate([source_rows, queries]), dtype=np.float32)
    found = query_rows(rows, np.arange(s, s + q, dtype=np.int64), np.arange(s, dtype=np.int64), min(k, s),
                       index=index, include_self=False, seed=seed, progress=False)
    width = min(k, s)
    ids = np.full((q, width), -1, np.int64)
    cos = np.full((q, width), -np.inf, np.float32)
    counts = np.diff(found.indptr)
    owner = np.repeat(np.arange(q), counts)
    slot = np.arange(found.nnz) - np.repeat(found.indptr[:-1], counts)
    ids[owner, slot] = sources[found.indices]
    cos[owner, slot] = found.weights
    return ids, cos


def merge_top_k(answers: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The top-k of the union of the parts' answers to the same q queries, as CSR rows.

    Args:
        answers: per part ``(ids [q, k_p], cosines [q, k_p])`` from :func:`part_top_k`.
        k: neighbours per row.

    Returns:
        ``(indptr [q + 1], indices, cosines)``: row t holds query t's k most similar sources over all parts
        (ties: the smaller id), columns ascending, as :func:`~.knn.query_rows` returns them.
    """
    ids = np.concatenate([a for a, _ in answers], axis=1)
    cos = np.concatenate([c for _, c in answers], axis=1)
    q = ids.shape[0]
    if ids.shape[1] == 0:
        return np.zeros(q + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    big = np.iinfo(np.int64).max
    key_ids = np.where(ids < 0, big, ids)
    order = np.lexsort((key_ids, -cos.astype(np.float64)), axis=1)[:, :k]     # cosine descending, then id
    top_ids = np.take_along_axis(key_ids, order, axis=1)
    top_cos = np.take_along_axis(cos, order, axis=1)
    by_id = np.argsort(top_ids, axis=1, kind="stable")
    top_ids, top_cos = np.take_along_axis(top_ids, by_id, axis=1), np.take_along_axis(top_cos, by_id, axis=1)
    valid = top_ids != big
    indptr = np.zeros(q + 1, np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    return indptr, top_ids[valid], top_cos[valid].astype(np.float32)


def row_cosine_sums(x: np.ndarray, neighbours: np.ndarray, neighbour_rows: np.ndarray) -> np.ndarray:
    """Raw degrees of source items: per item, the sum over its current kNN row of cos(x_j, x_l).

    The computation of :func:`~.refine.source_degree` (float32 cosines, summed in float64 in the row's
    column order), on rows given as arrays instead of a whole-catalog graph and feature table.

    Args:
        x: float32 [u, d] the items' raw rows.
        neighbours: int64 [u, w] their kNN rows' columns, ascending, -1 = padding.
        neighbour_rows: float32 [u, w, d] the raw rows of those columns (anything where padded).

    Returns:
        float64 [u].
    """
    filled = neighbours >= 0
    owner = np.repeat(np.arange(len(x)), filled.sum(axis=1))
    a = x[owner]
    b = neighbour_rows[filled]
    cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.bincount(owner, weights=cos.astype(np.float64), minlength=len(x))


def refine_own_rows(rows: np.ndarray, old_ids: np.ndarray, old_weights: np.ndarray,
                    new: tuple[np.ndarray, np.ndarray, np.ndarray], sources: np.ndarray, source_degree: np.ndarray,
                    alpha: float, tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 16 on some rows: ``S_i <- alpha S_i + (1 - alpha) Ŝ_i`` with Ŝ_i normalised as in a rebuilt graph.

    Args:
        rows: int64 [r] sorted global ids of the refined items.
        old_ids, old_weights: [r, w] their current normalised rows (-1 = padding; columns ascending).
        new: ``(indptr [r + 1], indices, cosines)`` the new raw rows (:func:`merge_top_k`).
        sources: int64 [u] sorted distinct global ids of the new rows' columns; ``source_degree`` float64 [u]
            their raw degrees (:func:`row_cosine_sums`).
        alpha: weight of the old row (``1 - avg_lambda``); tolerance: as :func:`~.refine.refine_knn`.

    Returns:
        ``(indptr [r + 1], indices, weights)``: the refined rows (columns ascending, global ids), what
        :func:`~.refine.refine_knn` gives these rows.

    Raises:
        ValueError: degrees that are not finite (a diverged model).
    """
    indptr, indices, cosines = new
    filled = old_ids >= 0
    local = np.unique(np.concatenate([rows, old_ids[filled], indices, sources]))     # ascending: order kept
    n = len(local)
    at_rows = np.searchsorted(local, rows)
    degree = np.zeros(n, np.float64)
    degree[np.searchsorted(local, sources)] = source_degree
    degree[at_rows] = row_sums(indptr, cosines)
    if not np.isfinite(degree).all():
        raise ValueError("the refinement degrees are not finite: the features hold NaN or inf (a diverged "
                         "model; lower the learning rate)")
    np.maximum(degree, 0.0, out=degree)          # a degree <= 0 gives weight 0, as refine_knn
    counts = np.zeros(n, np.int64)
    counts[at_rows] = np.diff(indptr)
    full = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=full[1:])
    new_local = np.searchsorted(local, indices)
    normalised = sym_normalize_rows(full, new_local, cosines, degree, at_rows)
    counts[:] = 0
    counts[at_rows] = filled.sum(axis=1)
    old = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=old[1:])
    out_ptr, out_idx, out_w = refine_rows(old, np.searchsorted(local, old_ids[filled]), old_weights[filled],
                                          at_rows, indptr, new_local, normalised, alpha, tolerance)
    starts, stops = out_ptr[at_rows], out_ptr[at_rows + 1]
    lengths = stops - starts
    take = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) if len(rows) else np.zeros(0, np.int64)
    result = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=result[1:])
    return result, local[out_idx[take]], out_w[take]
