"""Inverted-file (IVF) scan: the cosine top-k of each query among the members of the lists it probes.

An IVF index partitions the source items into ``n_lists`` inverted lists, stored CSR-like:
``list_ptr [n_lists + 1]`` and ``list_items [s]`` (global item ids; list ``l`` holds
``list_items[list_ptr[l]:list_ptr[l + 1]]``). Each query probes a few lists (``probes [r, nprobe]``, the
lists of its nearest centroids) and its top-k is taken among the members of those lists only.

Scores are cosines computed from the raw feature rows and their inverse L2 norms, so no normalised copy
of the features is made:

.. math:: \\mathrm{score}(q, j) = \\big((x_q \\cdot x_j)\\, \\nu_q\\big)\\, \\nu_j \\qquad
          \\nu_i = 1 / \\lVert x_i \\rVert

evaluated in float32 in that order (the inner product's summation order is left to the compiler).

The queries are ordered by their nearest list (first probe), so that neighbouring queries probe
mostly the same lists, and cut into units of 512; the units are spread over the Numba threads
(``prange``, dynamic: a thread takes the next unit when it is done), one parallel region per call.
Within a unit the scan goes list by list, and through a long list block by block (at most 512 KB of
member rows, so the block stays in L2): the unit's queries probing the list are multiplied with the
block's members in register tiles of 4 queries x 4 members, 16 float32 inner products accumulated
together along d, so every loaded feature vector serves four products. Each query keeps its running
top-k as k slots sorted by (score descending, item id ascending), updated by insertion. That order is
total, so the result is the same for any scan order, unit size, blocking and number of threads.

Public function: :func:`ivf_topk`. Pure-numpy twin (tests only): :func:`kernels.reference.ivf_topk_reference`.
"""

from __future__ import annotations

import numba
import numpy as np

from kernels.refine import _as_index_array, _as_value_array, _check_columns, _check_indptr

__all__ = ["ivf_topk"]

# Queries and members per register tile of the inner-product micro-kernel (4 x 4 = 16 accumulators).
_TILE = 4
# A list is swept in blocks of members holding at most this many bytes of feature rows, so that a block
# stays in L2 (1 MB per core on the machine measured) while the queries probing the list pass over it.
# Measured at 50,000 items: 512 KB beat 256 KB, 768 KB, 1 MB and whole lists at d = 4096 (lists of up to
# 24 MB; whole lists 1.5x slower) and matched whole lists at d = 384.
_BLOCK_BYTES = 512 * 1024
# Queries per unit of parallel work. One parallel region with dynamically scheduled units, rather than a
# region per list with the list's queries split over the threads, keeps the threads busy when the machine
# is shared. Measured at 50,000 items (25,000 queries, load average ~5): per-list regions took 2x the
# wall time and 2x the CPU time (threads spinning at 166 barriers) at d = 384, 2.6x the wall time at
# d = 4096; on one thread they needed 12% less CPU time at d = 384 (list members are read once per list,
# not once per unit and list) and the same at d = 4096. 512 to 4,096 queries per unit cost the same.
_UNIT = 512


# --------------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------------


@numba.njit(fastmath={"reassoc", "contract"}, cache=True)
def _tile_dots(q0, q1, q2, q3, m0, m1, m2, m3):
    """The 16 inner products of four query rows with four member rows, all float32 ``[d]``.

    Returns a 16-tuple, query-major: entry ``4 * a + b`` is ``q_a . m_b``. The reassociation flag lets
    the compiler vectorise the sums along d (16 vector accumulators), so the summation order is not
    the sequential one.
    """
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for t in range(q0.shape[0]):
        a0 = q0[t]
        a1 = q1[t]
        a2 = q2[t]
        a3 = q3[t]
        b0 = m0[t]
        b1 = m1[t]
        b2 = m2[t]
        b3 = m3[t]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@numba.njit(cache=True)
def _offer(top_scores, top_items, q, score, item):
    """Insert ``(score, item)`` into the running top-k of query ``q`` if it belongs there.

    Row ``q`` of ``top_scores`` / ``top_items`` (``[r, k]``) is sorted by score descending, then item
    ascending; empty slots hold ``(-inf, -1)`` and sort last. The weakest slot is dropped.
    """
    last = top_scores.shape[1] - 1
    if score < top_scores[q, last] or (score == top_scores[q, last] and item > top_items[q, last]):
        return
    slot = last
    while slot > 0 and (top_scores[q, slot - 1] < score
                        or (top_scores[q, slot - 1] == score and top_items[q, slot - 1] > item)):
        top_scores[q, slot] = top_scores[q, slot - 1]
        top_items[q, slot] = top_items[q, slot - 1]
        slot -= 1
    top_scores[q, slot] = score
    top_items[q, slot] = item


@numba.njit(cache=True)
def _group_by_list(probes, n_lists):
    """Counting sort of the (query, probed list) pairs by list.

    Returns ``(visit_ptr [n_lists + 1], visitors [r * nprobe])``: the queries probing list ``l`` are
    ``visitors[visit_ptr[l]:visit_ptr[l + 1]]``, in ascending order.
    """
    n_queries, n_probe = probes.shape
    visit_ptr = np.zeros(n_lists + 1, dtype=np.int64)
    for q in range(n_queries):
        for p in range(n_probe):
            visit_ptr[probes[q, p] + 1] += 1
    for lst in range(n_lists):
        visit_ptr[lst + 1] += visit_ptr[lst]
    fill = visit_ptr[:n_lists].copy()
    visitors = np.empty(n_queries * n_probe, dtype=np.int64)
    for q in range(n_queries):
        for p in range(n_probe):
            lst = probes[q, p]
            visitors[fill[lst]] = q
            fill[lst] += 1
    return visit_ptr, visitors


@numba.njit(cache=True)
def _sweep_block(features, query_items, query_inv_norm, tile, list_items, list_inv_norm, b_lo, b_hi,
                 top_scores, top_items):
    """Offer the members ``b_lo .. b_hi - 1`` of a list to the top-k of the 1 to 4 queries in ``tile``.

    The members are taken four at a time; a tile short of queries or members repeats its last one in the
    unused lanes of :func:`_tile_dots` and offers only the real products.
    """
    n_q = tile.shape[0]
    x0 = features[query_items[tile[0]]]
    x1 = features[query_items[tile[min(1, n_q - 1)]]]
    x2 = features[query_items[tile[min(2, n_q - 1)]]]
    x3 = features[query_items[tile[min(3, n_q - 1)]]]
    for e in range(b_lo, b_hi, _TILE):
        n_m = min(_TILE, b_hi - e)
        dots = _tile_dots(x0, x1, x2, x3,
                          features[list_items[e]],
                          features[list_items[e + min(1, n_m - 1)]],
                          features[list_items[e + min(2, n_m - 1)]],
                          features[list_items[e + min(3, n_m - 1)]])
        for a in range(n_q):
            q = tile[a]
            q_scale = query_inv_norm[q]
            for b in range(n_m):
                score = dots[_TILE * a + b] * q_scale * list_inv_norm[e + b]
                _offer(top_scores, top_items, q, score, list_items[e + b])


@numba.njit(parallel=True, cache=True)
def _scan(features, query_items, query_inv_norm, list_ptr, list_items, list_inv_norm, probes, by_nearest_list,
          top_scores, top_items):
    """Fill ``top_scores`` / ``top_items`` ``[r, k]`` (initially empty) for every query.

    ``by_nearest_list`` ``[r]`` is the query order (by first probe) that is cut into units. A unit's
    queries are grouped by probed list (:func:`_group_by_list`); each list is swept in blocks of at most
    ``_BLOCK_BYTES`` of member rows, and each block by all of the unit's queries probing the list, 4 at a
    time. Every query belongs to one unit, so each top-k row is written by one thread only.
    """
    n_queries = probes.shape[0]
    n_lists = list_ptr.shape[0] - 1
    block = max(_TILE, _BLOCK_BYTES // (4 * features.shape[1]))  # members per block
    n_units = (n_queries + _UNIT - 1) // _UNIT
    for u in numba.prange(n_units):
        unit = by_nearest_list[u * _UNIT:min(n_queries, (u + 1) * _UNIT)]
        visit_ptr, unit_rows = _group_by_list(probes[unit], n_lists)
        visitors = unit[unit_rows]  # query positions, grouped by probed list
        for lst in range(n_lists):
            v_lo, v_hi = visit_ptr[lst], visit_ptr[lst + 1]
            for b_lo in range(list_ptr[lst], list_ptr[lst + 1], block):
                b_hi = min(list_ptr[lst + 1], b_lo + block)
                for first in range(v_lo, v_hi, _TILE):
                    _sweep_block(features, query_items, query_inv_norm, visitors[first:min(first + _TILE, v_hi)],
                                 list_items, list_inv_norm, b_lo, b_hi, top_scores, top_items)


# --------------------------------------------------------------------------------------------------
# public wrapper
# --------------------------------------------------------------------------------------------------


def ivf_topk(features, query_items, query_inv_norm, list_ptr, list_items, list_inv_norm, probes, k):
    r"""Cosine top-k of each query among the members of its probed inverted lists.

    For query ``q`` (item ``query_items[q]``) the candidates are the items of the lists ``probes[q]``;
    each gets the score ``((x_q . x_j) * query_inv_norm[q]) * list_inv_norm[e]`` (float32; ``e`` is the
    member's position in ``list_items``), the cosine when the inverse norms are ``1 / ||x||``.

    Parameters
    ----------
    1. features : ``[n_items, d]`` float32 raw feature rows (converted if another dtype or layout),
       finite (not checked: the caller validates the rows it passes).
    2. query_items : ``[r]`` int64 item of each query, in ``[0, n_items)`` (repeats allowed).
    3. query_inv_norm : ``[r]`` float32, finite and positive, ``1 / ||features[query_items[q]]||``.
    4. list_ptr, list_items : the inverted lists, ``[n_lists + 1]`` int64 pointers and ``[s]`` int64
       member items in ``[0, n_items)``; an item should appear in at most one list (a repeated member
       would be offered twice).
    5. list_inv_norm : ``[s]`` float32, finite and positive, aligned with ``list_items``.
    6. probes : ``[r, nprobe]`` int64 lists probed by each query, in ``[0, n_lists)``, distinct per row.
    7. k : int >= 1, neighbours kept per query.

    Returns
    -------
    ``(items [r, k] int64, scores [r, k] float32)``: row ``q`` in order of score descending, ties by
    item id ascending; when fewer than k candidates exist the remaining slots hold ``(-1, -inf)``.

    Notes
    -----
    Cost: (sum over queries of their probed members) x d multiply-adds in 4 x 4 register tiles, in
    parallel over units of 512 queries, plus O(k) per candidate that enters a top-k. Memory: the outputs,
    an int64 per query and, per thread, an int64 per (query, probe) pair of its unit. The result does not
    depend on the thread count.

    Example
    -------
    >>> import numpy as np
    >>> x = np.array([[1, 0], [1, 1], [0, 1], [-1, 0]], np.float32)
    >>> inv = (1 / np.linalg.norm(x, axis=1)).astype(np.float32)
    >>> items, scores = ivf_topk(x, [0], inv[:1], [0, 2, 4], [0, 1, 2, 3], inv, [[0]], k=3)
    >>> items.tolist(), np.round(scores.astype(float), 4).tolist()
    ([[0, 1, -1]], [[1.0, 0.7071, -inf]])
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [n_items, d], got shape {features.shape}")
    if features.dtype.kind not in "fiu":
        raise ValueError(f"features must hold real numbers, got dtype {features.dtype}")
    features = np.ascontiguousarray(features, dtype=np.float32)
    n_items = features.shape[0]
    query_items = _as_index_array(query_items, "query_items")
    _check_columns(query_items, n_items, "query_items")
    query_inv_norm = _check_inv_norm(query_inv_norm, query_items.size, "query_inv_norm")
    list_ptr = _as_index_array(list_ptr, "list_ptr")
    list_items = _as_index_array(list_items, "list_items")
    _check_indptr(list_ptr, list_items.size, "list_ptr")
    _check_columns(list_items, n_items, "list_items")
    list_inv_norm = _check_inv_norm(list_inv_norm, list_items.size, "list_inv_norm")
    probes = _check_probes(probes, query_items.size, list_ptr.size - 1)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")

    top_items = np.full((query_items.size, int(k)), -1, dtype=np.int64)
    top_scores = np.full((query_items.size, int(k)), -np.inf, dtype=np.float32)
    if query_items.size and probes.shape[1]:
        by_nearest_list = np.argsort(probes[:, 0], kind="stable")
        previous_chunksize = numba.set_parallel_chunksize(1)  # units go to whichever thread is free
        try:
            _scan(features, query_items, query_inv_norm, list_ptr, list_items, list_inv_norm, probes,
                  by_nearest_list, top_scores, top_items)
        finally:
            numba.set_parallel_chunksize(previous_chunksize)
    return top_items, top_scores


def _check_inv_norm(values, size: int, name: str) -> np.ndarray:
    values = _as_value_array(values, name)
    if values.size != size:
        raise ValueError(f"{name} must have {size} entries (one per item), got {values.size}")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{name} must be finite and positive (inverse L2 norms of non-zero rows)")
    return values


def _check_probes(probes, n_queries: int, n_lists: int) -> np.ndarray:
    probes = np.asarray(probes)
    if probes.ndim != 2 or probes.shape[0] != n_queries:
        raise ValueError(f"probes must have shape [{n_queries}, nprobe] (a row per query), got {probes.shape}")
    if probes.size and probes.dtype.kind not in "iu":
        raise ValueError(f"probes must hold integers, got dtype {probes.dtype}")
    probes = np.ascontiguousarray(probes, dtype=np.int64)
    if probes.size:
        if probes.min() < 0 or probes.max() >= n_lists:
            raise ValueError(f"probes must lie in [0, {n_lists}), got values in [{probes.min()}, {probes.max()}]")
        ordered = np.sort(probes, axis=1)
        if np.any(ordered[:, 1:] == ordered[:, :-1]):
            raise ValueError("probes must not repeat a list within a row (a query probes a list once)")
    return probes
