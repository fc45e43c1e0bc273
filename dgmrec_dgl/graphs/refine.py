"""Refining an item–item graph with generated features (DGMRec Eq. 16).

Every few epochs DGMRec decodes features X̂_m for the items that lack modality m, builds a kNN graph Ŝ^m
from them and blends it into the current (normalised) graph, only in the rows of those items:

.. math::

    S^m_{i\\cdot} \\leftarrow \\alpha\\, S^m_{i\\cdot} + (1 - \\alpha)\\, \\hat S^m_{i\\cdot}
    \\qquad i \\in \\mathcal{M}_m \\text{ (items missing m)}

Rows are aggregation targets (h_i <- sum_j S_ij h_j), so only edges *into* missing items change: directed
edges from source items to the missing item. Every other row is left bit-identical.

Mapping to the authors' configuration: their ``avg_lambda`` weights the *rebuilt* rows, so
``alpha = 1 - avg_lambda`` (e.g. Baby: avg_lambda 0.4 -> alpha 0.6; Clothing: avg_lambda 0.0 -> alpha 1,
no refinement).

Cost: one index over the source items plus |M_m| queries (see :func:`dgmrec_dgl.graphs.knn.query_rows`),
then O(n + nnz) for the blend (Numba ``refine_rows``); never n^2 (unless the exact index is chosen for a
large source set).
"""

from __future__ import annotations

import numpy as np

from dgmrec_dgl.graphs.knn import DEFAULT_CHUNK, KnnGraph, _check_features, _check_k, query_rows
from kernels.refine import refine_rows, sym_normalize_rows

__all__ = ["refine_knn", "source_degree"]


def source_degree(graph: KnnGraph, features: np.ndarray, items, *, chunk_size: int = 16_384) -> np.ndarray:
    """Raw degree of ``items`` re-derived from the current features along the graph's edges.

    For each item j: sum over the entries (j, l) of ``graph`` of cos(x_j, x_l), i.e. the row sum that the
    raw kNN graph would have for j if j kept its neighbour set. For a present item whose row was never
    refined this equals its raw row sum under the current features. O(len(items) * k * d).

    Args:
        graph: any :class:`KnnGraph` (normalised or not: only its sparsity pattern is used).
        features: float32 [n_items, d].
        items: int64 [m] item ids.

    Returns:
        float64 [m] degrees.
    """
    items = np.asarray(items, dtype=np.int64)
    starts, stops = graph.indptr[items], graph.indptr[items + 1]
    counts = stops - starts
    owner = np.repeat(np.arange(items.size), counts)
    entries = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
    out = np.zeros(items.size, dtype=np.float64)
    for lo in range(0, entries.size, chunk_size):
        e = entries[lo:lo + chunk_size]
        a = features[items[owner[lo:lo + chunk_size]]]
        b = features[graph.indices[e]]
        cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out += np.bincount(owner[lo:lo + chunk_size], weights=cos.astype(np.float64), minlength=items.size)
    return out


def refine_knn(graph_norm: KnnGraph, features: np.ndarray, missing_rows, alpha: float, k: int, *,
               sources: str = "present", present=None, degree=None, tolerance: float = 0.0,
               index: str = "auto", chunk_size: int = DEFAULT_CHUNK, seed: int = 0, progress: bool = True,
               **search) -> KnnGraph:
    """One refinement step of a normalised modality graph (Eq. 16) on the rows of missing items.

    1. Query the cosine top-k of every missing row i from the current (generated) features against an
       index of the source items: ``sources="present"`` (the paper: only items that have the modality, so
       no edge leaves a missing item) or ``"all"`` (the authors' release rebuilds over all items, the row's
       own item included).
    2. Normalise the new rows like the rebuilt graph would be: Ŝ_ij / sqrt(deg_i deg_j) where deg_i is
       the new row's own sum and deg_j, for a source j, is the raw row sum of j: taken from ``degree``
       when given (pass ``raw.row_degree()`` of the graph from ``build_knn``), otherwise re-derived from
       the current features along j's current edges (:func:`source_degree`). A source that is itself a
       refined row (``sources="all"``) uses its new row sum, as in a rebuilt graph.
    3. Blend with the Numba kernel ``refine_rows``: row i <- alpha * old_i + (1 - alpha) * new_i (union
       of entries); other rows are copied bit-identically. The union grows row i by up to k entries per
       call; ``tolerance > 0`` drops blended entries below that fraction of the row's largest.

    Args:
        graph_norm: current normalised graph [n_items, n_items].
        features: float32 [n_items, d], the current raw features with generated rows for missing items.
        missing_rows: int64 [r] items whose rows are refined (sorted/unique enforced here).
        alpha: the paper's alpha in [0, 1], weight of the OLD graph (``1 - avg_lambda`` of the reference
            configs). alpha = 1 returns ``graph_norm`` unchanged without querying.
        k: neighbours per new row.
        sources: "present" | "all".
        present: bool [n_items], who has the modality (default: every item not in ``missing_rows``);
            with ``sources="present"`` only these items are indexed.
        degree: float64 [n_items] raw row sums of the source items, or None (see step 2).
        tolerance: in [0, 1); 0 keeps every blended entry (the paper's maths).
        index, chunk_size, seed, progress, **search: passed to :func:`query_rows` (e.g. ``nprobe``).

    Returns:
        the refined :class:`KnnGraph` (new arrays; ``graph_norm`` is not modified).

    Raises:
        ValueError: shapes that do not match the graph, alpha outside [0, 1], unknown ``sources``, a
            missing row marked present, non-finite features.
    """
    n = graph_norm.n_items
    features = _check_features(features)
    if features.shape[0] != n:
        raise ValueError(f"features has {features.shape[0]} rows but the graph has {n} items")
    k = _check_k(k, n)
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1] (weight of the old graph), got {alpha}")
    if sources not in ("present", "all"):
        raise ValueError(f"sources must be 'present' or 'all', got {sources!r}")
    rows = np.asarray(missing_rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError(f"missing_rows must be a 1-D integer array, got dtype {rows.dtype}, shape {rows.shape}")
    rows = np.unique(rows.astype(np.int64))
    if rows.size and (rows[0] < 0 or rows[-1] >= n):
        raise ValueError(f"missing_rows must lie in [0, {n}), got range [{rows[0]}, {rows[-1]}]")
    if present is None:
        present = np.ones(n, dtype=bool)
        present[rows] = False
    else:
        present = np.asarray(present)
        if present.dtype != np.bool_ or present.shape != (n,):
            raise ValueError(f"present must be a bool array of shape ({n},), got {present.dtype} {present.shape}")
        if present[rows].any():
            bad = rows[present[rows]][0]
            raise ValueError(f"missing_rows contains item {bad}, which present marks as having the modality")
    if degree is not None:
        degree = np.asarray(degree, dtype=np.float64)
        if degree.shape != (n,):
            raise ValueError(f"degree must have shape ({n},), got {degree.shape}")
    if alpha == 1.0 or rows.size == 0:
        return graph_norm

    source_ids = np.flatnonzero(present) if sources == "present" else np.arange(n, dtype=np.int64)
    new = query_rows(features, rows, source_ids, k, index=index, include_self=True, chunk_size=chunk_size,
                     seed=seed, progress=progress, **search)

    # degrees: sources from `degree` (or re-derived), refined rows from their new row sums
    deg = np.zeros(n, dtype=np.float64)
    used = np.unique(new.indices)
    if degree is not None:
        deg[used] = degree[used]
    else:
        deg[used] = source_degree(graph_norm, features, used)
    deg[rows] = new.row_sums()
    if not np.isfinite(deg).all():
        raise ValueError("the refinement degrees are not finite: the features hold NaN or inf (a diverged "
                         "model; lower the learning rate)")
    # Cosine top-k rows of zero-mean features can sum to <= 0. Such a degree counts as 0, so its entries
    # get weight 0: the reference's rule for a zero degree (its D^-1/2 would be NaN for a negative sum).
    np.maximum(deg, 0.0, out=deg)

    # the new rows as an n-row CSR (other rows empty) so the kernel indexes degrees by global item id
    counts = np.zeros(n, dtype=np.int64)
    counts[rows] = np.diff(new.indptr)
    full_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=full_indptr[1:])
    new_norm = sym_normalize_rows(full_indptr, new.indices, new.weights, deg, rows)

    indptr, indices, weights = refine_rows(graph_norm.indptr, graph_norm.indices, graph_norm.weights, rows,
                                           new.indptr, new.indices, new_norm, alpha, tolerance)
    return KnnGraph(indptr, indices, weights)
