"""Item–item kNN graphs of one modality (DGMRec Eq. 4), built with FAISS.

DGMRec builds, per modality m, a graph S^m over items from the raw features X_m [n_items, d_m]:

.. math::

    S^m_{ij} = \\cos(x_i, x_j) \\text{ if } j \\in \\mathrm{topk}_i, \\quad 0 \\text{ otherwise}
    \\qquad \\tilde S^m = D^{-1/2} S^m D^{-1/2},\\; D_{ii} = \\textstyle\\sum_j S^m_{ij}

Conventions used throughout ``dgmrec_dgl.graphs``:

* A graph is CSR. Row i is the aggregation **target** and its column indices are the **source** items j:
  propagation is h_i <- sum_j S_ij h_j.
* The top-k of a row includes the item itself (cosine 1) and keeps the similarity values.
* An item that lacks the modality (``present[i] == False``) gets a row holding one self-loop of weight 1.0
  and appears in no other row. The authors' code gets there by taking the top-k over all items and then
  zeroing the rows and columns of missing items; here only present items are indexed and queried
  (``candidates="present"``), so every present row keeps k present neighbours instead of losing the slots
  that mean-imputed missing items took. ``candidates="all"`` reproduces the reference exactly (top-k
  over all items, then the columns of missing items dropped, so rows may hold fewer than k entries).

Index choice (``index=``):

* ``"exact"``: FAISS ``IndexFlatIP`` over L2-normalised rows (BLAS); cost ~ n^2 d.
* ``"ivf"``: IVF-Flat. FAISS spherical k-means (seeded sample of the sources, 16 points per list,
  ~2 sqrt(n) lists of at least ~150 sources) and FAISS ``IndexFlatIP`` for the coarse assignment; the lists are then scanned
  *per list* rather than per query: the Numba kernel :func:`kernels.ivf.ivf_topk` multiplies the
  queries probing a list with its members in 4 x 4 register tiles (units of 512 queries with nearby
  centroids in parallel), reading the raw feature rows and scaling by the inverse norms (no normalised
  copies), and keeps a running top-k per query (:func:`_search_ivf`). Same candidates as FAISS's
  ``IndexIVFFlat`` with those centroids, 3-5x faster here, because FAISS's per-query scan is
  memory-bound on this machine. ``nprobe`` defaults to enough lists to scan ~2,560 sources per query
  (17 lists at 100,000 sources, 8 at 500,000, 18 at 25,000).
* ``"hnsw"``: FAISS ``IndexHNSWFlat`` (M 32, efConstruction 40, efSearch 128). Available, not chosen.
* ``"auto"`` (default): exact while at most ``exact_max_items`` (20,000) items are indexed, IVF above.

Measurements behind the choice (2 cores shared with other jobs, AVX2, faiss-cpu 1.15.1;
:func:`clustered_features` data, d = 384, k = 10; time = index build + all n queries; recall@10 against
exact on 2,000 sampled rows). Session 1 (load average ~1-3)::

    n = 100,000                                        time      recall@10
    exact IndexFlatIP                                  34.9 s    1.000
    FAISS IndexIVFFlat, nlist 1265, nprobe 16          46 s      0.921
    FAISS IndexIVFFlat, nlist 1265, nprobe 32          36 s      0.984
    FAISS IndexHNSWFlat, M 32, efSearch 64             32-34 s   0.938
    FAISS IndexHNSWFlat, M 32, efSearch 128            21-57 s   0.967
    IVF, per-list BLAS scan, nlist 1265, nprobe 16     5.7 s     0.952
    IVF, per-list BLAS scan, nlist 1265, nprobe 32     7.8 s     0.992

    exact vs that IVF (nprobe 32) by n:  5K 0.14 / 0.23 s,  10K 0.35 / 0.47 s,  20K 1.3 / 1.3 s (IVF
    recall 0.944),  50K 8.8 / 3.4 s (0.985),  100K 35 / 7.8 s (0.992).

Session 2 (load average ~4.5, so every time ~2.5x session 1), same run, alternating::

    IVF, nlist 1265, nprobe 32, 32 points per list     20.7-21.2 s   0.992
    IVF, defaults (nlist 632, nprobe 17, 16 per list)  12.2-12.7 s   0.998
    exact IndexFlatIP                                  92.7 s        1.000

Session 3 (load average 2.4-3): the scan above was a BLAS product per list plus a numpy top-k merge; the
Numba kernel that replaced it, on the refinement stage of ``bench/graph_refinement.py`` at 50,000 x 384
(25,000 queries over 25,000 sources, nlist 166, nprobe 17), took the search from 2.13 s to 0.96 s and the
whole refinement step from 2.23 s to 1.01 s (CPU 2.22 -> 1.00 s); one of the 25,000 rows changed, at a
near tie (cosines 2e-7 apart). At d = 4096 (load ~5) the step went from 17.1 s to 12.6 s.

At 100,000 items IVF beats HNSW at every recall level measured (HNSW's graph construction dominates on
two cores)
and, unlike HNSW's parallel insertion, is deterministic for a seed. Fewer, larger lists with a fixed
number of scanned candidates cut the k-means and assignment costs (which grow with nlist) at no loss of
recall, which is what brings 500,000 x 500,000 queries (the 1M-item benchmark) to about a minute
(1M: nlist 1414 / nprobe 8 -> 54 s, recall 0.996; nlist 707 / nprobe 4 -> 47 s, 0.974). Lists of fewer
than ~150 sources make the products inefficient: at 25,000 x 25,000, 166 lists take 2.2 s (recall 0.998)
where 316 lists took 3.7 s (exact: 6.5 s, same session).

The exact threshold is 20,000 indexed items, the measured crossover: at 20,000 x 20,000 exact 4.1 s vs
IVF 2.2 s (recall 0.9996), at 10,000 exact 1.1 s vs IVF 1.9 s (session 2 load). Baby (7,050) and
Sports (18,357) always get exact graphs; Clothing (23,033) with every item present gets IVF
(recall@10 ~0.999); above that exact grows as n^2 (an hour at 1M). End-to-end numbers (build, one
refinement step, peak RSS, up to 1M items) are in ``bench/results/graph_refinement.json``.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

from kernels.ivf import ivf_topk
from kernels.refine import row_sums, sym_normalize_rows

__all__ = [
    "EXACT_MAX_ITEMS",
    "KnnGraph",
    "KnnRows",
    "build_knn",
    "clustered_features",
    "modality_knn_graphs",
    "normalize_knn",
    "query_rows",
]

# Largest number of indexed items for which ``index="auto"`` searches exactly. Measured: see the
# docstring of :func:`build_knn`.
EXACT_MAX_ITEMS = 20_000

# Default IVF search breadth: probe enough lists to scan ~IVF_CANDIDATES sources per query (nprobe 32 at
# 100,000 sources, 15 at 500,000; see the module docstring), at least IVF_MIN_NPROBE lists.
DEFAULT_NPROBE = None
IVF_CANDIDATES = 2_560
IVF_MIN_NPROBE = 8
IVF_MIN_LIST = 150
DEFAULT_EF_SEARCH = 128
DEFAULT_HNSW_M = 32
DEFAULT_CHUNK = 16_384


# --------------------------------------------------------------------------------------------------
# containers


@dataclass(frozen=True)
class KnnGraph:
    """An item–item graph in CSR form (row = aggregation target, column = source item).

    Attributes:
        indptr: int64 [n_items + 1], row pointers (``indptr[0] == 0``, non-decreasing).
        indices: int64 [nnz], source item of each entry; strictly increasing within a row.
        weights: float32 [nnz], finite edge weights.

    Raises:
        ValueError: on wrong dtypes/shapes, out-of-range or unsorted columns, or non-finite weights.
    """

    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    def __post_init__(self):
        for name, dtype in (("indptr", np.int64), ("indices", np.int64), ("weights", np.float32)):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.ndim != 1:
                raise ValueError(f"KnnGraph.{name} must be a 1-D numpy array, got {type(arr).__name__} "
                                 f"with shape {getattr(arr, 'shape', None)}")
            if arr.dtype != dtype:
                raise ValueError(f"KnnGraph.{name} must have dtype {np.dtype(dtype)}, got {arr.dtype}")
        indptr, indices, weights = self.indptr, self.indices, self.weights
        if indptr.size < 1 or indptr[0] != 0:
            raise ValueError("KnnGraph.indptr must start with 0")
        if np.any(np.diff(indptr) < 0):
            raise ValueError("KnnGraph.indptr must be non-decreasing")
        nnz = int(indptr[-1])
        if indices.size != nnz or weights.size != nnz:
            raise ValueError(f"KnnGraph: indptr[-1] = {nnz} but len(indices) = {indices.size} and "
                             f"len(weights) = {weights.size}")
        n = indptr.size - 1
        if nnz:
            if indices.min() < 0 or indices.max() >= n:
                raise ValueError(f"KnnGraph.indices must lie in [0, {n}), got range "
                                 f"[{indices.min()}, {indices.max()}]")
            if not np.all(np.isfinite(weights)):
                raise ValueError("KnnGraph.weights contains NaN or inf")
            _check_sorted_rows(indptr, indices, "KnnGraph.indices")

    @property
    def n_items(self) -> int:
        """Number of items (rows = columns)."""
        return self.indptr.size - 1

    @property
    def nnz(self) -> int:
        """Number of stored entries (edges)."""
        return int(self.indptr[-1])

    def to_scipy(self) -> sp.csr_matrix:
        """The graph as a ``scipy.sparse.csr_matrix`` [n_items, n_items] (shares the arrays)."""
        n = self.n_items
        return sp.csr_matrix((self.weights, self.indices, self.indptr), shape=(n, n))

    def row_degree(self) -> np.ndarray:
        """Row sums, float64 [n_items] (the D of D^-1/2 S D^-1/2)."""
        return row_sums(self.indptr, self.weights)


@dataclass(frozen=True)
class KnnRows:
    """Top-k rows for a subset of target items (what :func:`query_rows` returns).

    Attributes:
        rows: int64 [r], the target items, sorted and unique.
        indptr: int64 [r + 1], row pointers into ``indices``/``weights`` (row t belongs to ``rows[t]``).
        indices: int64 [nnz], source items (global item ids), increasing within a row.
        weights: float32 [nnz], raw cosine similarities.
    """

    rows: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    weights: np.ndarray

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def row_sums(self) -> np.ndarray:
        """Sum of each row's weights, float64 [r]."""
        owner = np.repeat(np.arange(self.rows.size), np.diff(self.indptr))
        return np.bincount(owner, weights=self.weights.astype(np.float64), minlength=self.rows.size)


def _check_sorted_rows(indptr: np.ndarray, indices: np.ndarray, what: str) -> None:
    """Raise unless column indices strictly increase inside every row (O(nnz))."""
    if indices.size < 2:
        return
    step_ok = np.diff(indices) > 0
    starts = indptr[1:-1]
    starts = starts[(starts > 0) & (starts < indices.size)]
    step_ok[starts - 1] = True  # a new row may start lower
    if not np.all(step_ok):
        bad = int(np.flatnonzero(~step_ok)[0]) + 1
        row = int(np.searchsorted(indptr, bad, side="right") - 1)
        raise ValueError(f"{what}: columns of row {row} are not strictly increasing (duplicate or unsorted)")


# --------------------------------------------------------------------------------------------------
# input checks


def _check_features(features) -> np.ndarray:
    if not isinstance(features, np.ndarray):
        raise ValueError(f"features must be a numpy array [n_items, d], got {type(features).__name__}")
    if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] < 1:
        raise ValueError(f"features must have shape [n_items, d] with n_items, d >= 1, got {features.shape}")
    if features.dtype != np.float32:
        if not np.issubdtype(features.dtype, np.floating):
            raise ValueError(f"features must be float32 (or another float dtype), got {features.dtype}")
        features = features.astype(np.float32)
    return features


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer, got {k!r}")
    if k < 1 or k > n:
        raise ValueError(f"k must lie in [1, n_items = {n}], got {k}")
    return int(k)


def _check_present(present, n: int) -> np.ndarray:
    if present is None:
        return np.ones(n, dtype=bool)
    present = np.asarray(present)
    if present.dtype != np.bool_:
        raise ValueError(f"present must be a boolean mask, got dtype {present.dtype}")
    if present.shape != (n,):
        raise ValueError(f"present must have shape ({n},) (one flag per item), got {present.shape}")
    return present


def _check_ids(ids, n: int, what: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(f"{what} must be a 1-D integer array of item ids, got dtype {ids.dtype} "
                         f"and shape {ids.shape}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size and (ids.min() < 0 or ids.max() >= n):
        raise ValueError(f"{what} must lie in [0, {n}), got range [{ids.min()}, {ids.max()}]")
    if ids.size > 1 and np.any(np.diff(ids) <= 0):
        raise ValueError(f"{what} must be sorted and unique")
    return ids


@contextmanager
def _faiss_threads(n_threads: int | None):
    """Run FAISS with ``n_threads`` OpenMP threads (default: the CPUs this process may use)."""
    if n_threads is None:
        n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(n_threads)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


# --------------------------------------------------------------------------------------------------
# search back-ends


@dataclass(frozen=True)
class _Search:
    """Index settings shared by :func:`query_rows` and :func:`build_knn` (see their docstrings)."""

    kind: str
    chunk_size: int
    nlist: int | None
    nprobe: int | None
    train_per_list: int
    kmeans_iters: int
    hnsw_m: int
    ef_search: int
    ef_construction: int
    seed: int
    progress: bool


def _inverse_norms(features: np.ndarray, ids: np.ndarray, what: str, chunk_size: int) -> np.ndarray:
    """float32 [len(ids)] of 1 / ||x_i||; raises on NaN/inf or all-zero rows (chunked, no copy kept)."""
    out = np.empty(ids.size, dtype=np.float32)
    for start in range(0, ids.size, chunk_size):
        sel = ids[start:start + chunk_size]
        x = features[sel]
        if not np.all(np.isfinite(x)):
            bad = sel[np.flatnonzero(~np.isfinite(x).all(axis=1))[0]]
            raise ValueError(f"features of item {bad} ({what}) contain NaN or inf")
        norms = np.linalg.norm(x, axis=1)
        if np.any(norms == 0):
            bad = sel[np.flatnonzero(norms == 0)[0]]
            raise ValueError(f"features of item {bad} ({what}) are all zero: cosine similarity is "
                             f"undefined; mark the item as missing the modality or impute its features")
        out[start:start + sel.size] = 1.0 / norms
    return out


def _unit_rows(features, ids, inv_norm) -> np.ndarray:
    """L2-normalised float32 copy of ``features[ids]`` given the rows' inverse norms."""
    x = np.ascontiguousarray(features[ids], dtype=np.float32)
    x *= inv_norm[:, None]
    return x


def _default_nlist(n_sources: int) -> int:
    """IVF list count: about 2 sqrt(n), but lists of at least ~IVF_MIN_LIST sources (efficient products)."""
    return int(max(1, min(round(2 * math.sqrt(n_sources)), n_sources // IVF_MIN_LIST)))


def _default_nprobe(n_sources: int, nlist: int) -> int:
    """Lists to probe so that ~IVF_CANDIDATES sources are scanned per query (at least IVF_MIN_NPROBE)."""
    return max(IVF_MIN_NPROBE, math.ceil(IVF_CANDIDATES * nlist / n_sources))


def _search_faiss(features, rows, inv_q, sources, inv_s, k, opt: _Search):
    """Exact (IndexFlatIP) or HNSW search: index ``sources``, query ``rows`` chunk by chunk."""
    d = features.shape[1]
    if opt.kind == "exact":
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexHNSWFlat(d, opt.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = opt.ef_construction
        index.hnsw.efSearch = max(opt.ef_search, k)
    for start in range(0, sources.size, opt.chunk_size):
        index.add(_unit_rows(features, sources[start:start + opt.chunk_size], inv_s[start:start + opt.chunk_size]))
    cols = np.empty((rows.size, k), dtype=np.int64)
    vals = np.empty((rows.size, k), dtype=np.float32)
    bar = tqdm(total=rows.size, desc=f"knn query ({opt.kind})", unit="row", disable=not opt.progress,
               leave=False)
    for start in range(0, rows.size, opt.chunk_size):
        stop = min(rows.size, start + opt.chunk_size)
        dist, lab = index.search(_unit_rows(features, rows[start:stop], inv_q[start:stop]), k)
        found = lab >= 0
        cols[start:stop] = np.where(found, sources[np.where(found, lab, 0)], -1)
        vals[start:stop] = np.where(found, dist, -np.inf)
        bar.update(stop - start)
    bar.close()
    return cols, vals


def _search_ivf(features, rows, inv_q, sources, inv_s, k, opt: _Search):
    """IVF-Flat search; the lists are scanned by the Numba kernel :func:`kernels.ivf.ivf_topk`.

    A spherical k-means (FAISS, seeded sample of the sources) gives ``nlist`` centroids; every source is
    stored in the list of its nearest centroid and every query probes its ``nprobe`` nearest lists.
    Instead of scanning lists query by query (FAISS's ``IndexIVFFlat``, memory-bound), the kernel takes
    units of queries with nearby centroids (in parallel) and, list by list, multiplies the unit's queries
    probing a list with its members in register tiles, straight from the raw feature rows scaled by their
    inverse norms, keeping each query's running top-k (ties: smaller item id first). Same candidates and
    results as IVF-Flat with the same centroids (up to float32 rounding).
    """
    d = features.shape[1]
    n_src = sources.size
    nlist = _default_nlist(n_src) if opt.nlist is None else int(opt.nlist)
    if not 1 <= nlist <= n_src:
        raise ValueError(f"nlist must lie in [1, number of source items = {n_src}], got {nlist}")
    nprobe = _default_nprobe(n_src, nlist) if opt.nprobe is None else int(opt.nprobe)
    nprobe = max(1, min(nprobe, nlist))
    # 1. coarse quantizer: spherical k-means on a seeded sample of the sources
    rng = np.random.default_rng(opt.seed)
    n_train = min(n_src, nlist * opt.train_per_list)
    train_pos = np.sort(rng.choice(n_src, size=n_train, replace=False)) if n_train < n_src else np.arange(n_src)
    kmeans = faiss.Kmeans(d, nlist, niter=opt.kmeans_iters, spherical=True, seed=int(opt.seed) & 0x7FFFFFFF,
                          max_points_per_centroid=opt.train_per_list, min_points_per_centroid=1)
    kmeans.train(_unit_rows(features, sources[train_pos], inv_s[train_pos]))
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)

    # 2. assignments: list of each source (nearest centroid) and probed lists of each query
    same = rows.size == n_src and np.array_equal(rows, sources)

    def nearest(ids, inv, n_best):
        out = np.empty((ids.size, n_best), dtype=np.int64)
        for start in range(0, ids.size, opt.chunk_size):
            stop = min(ids.size, start + opt.chunk_size)
            out[start:stop] = quantizer.search(_unit_rows(features, ids[start:stop], inv[start:stop]), n_best)[1]
        return out

    probes = nearest(rows, inv_q, nprobe)  # [r, nprobe]
    store = probes[:, 0] if same else nearest(sources, inv_s, 1)[:, 0]  # [s]
    members = np.argsort(store, kind="stable")  # source positions grouped by list, [s]
    list_ptr = np.searchsorted(store[members], np.arange(nlist + 1))  # [nlist + 1]
    list_items, list_inv = sources[members], inv_s[members]

    # 3. scan: the Numba kernel, a chunk of queries per call (for the progress bar)
    features = np.ascontiguousarray(features)  # read in place by the kernel (a copy only if strided)
    cols = np.empty((rows.size, k), dtype=np.int64)
    vals = np.empty((rows.size, k), dtype=np.float32)
    bar = tqdm(total=rows.size, desc="knn query (ivf)", unit="row", disable=not opt.progress, leave=False)
    for start in range(0, rows.size, opt.chunk_size):
        stop = min(rows.size, start + opt.chunk_size)
        cols[start:stop], vals[start:stop] = ivf_topk(features, rows[start:stop], inv_q[start:stop], list_ptr,
                                                      list_items, list_inv, probes[start:stop], k)
        bar.update(stop - start)
    bar.close()
    return cols, vals


def _resolve_kind(index: str, n_sources: int, exact_max_items: int) -> str:
    if index not in ("auto", "exact", "ivf", "hnsw"):
        raise ValueError(f"index must be one of 'auto', 'exact', 'ivf', 'hnsw', got {index!r}")
    if index == "auto":
        return "exact" if n_sources <= exact_max_items else "ivf"
    return index


# --------------------------------------------------------------------------------------------------
# public API


def query_rows(features: np.ndarray, rows, sources, k: int, *, index: str = "auto",
               exact_max_items: int = EXACT_MAX_ITEMS, include_self: bool = True,
               chunk_size: int = DEFAULT_CHUNK, nlist: int | None = None, nprobe: int | None = DEFAULT_NPROBE,
               train_per_list: int = 16, kmeans_iters: int = 10, hnsw_m: int = DEFAULT_HNSW_M,
               ef_search: int = DEFAULT_EF_SEARCH, ef_construction: int = 40, seed: int = 0,
               n_threads: int | None = None, progress: bool = True) -> KnnRows:
    """Cosine top-k rows of the target items ``rows`` among the source items ``sources``.

    Only ``features[sources]`` is indexed and only ``features[rows]`` is queried, chunk by chunk (no
    normalised copy of the features is kept), so the cost is one index over the sources plus |rows|
    queries, never n^2 unless the exact index is chosen.

    Args:
        features: float32 [n_items, d] raw features (cosine = inner product of L2-normalised rows).
        rows: int64 [r] sorted unique target items.
        sources: int64 [s] sorted unique source items (the only possible columns).
        k: neighbours per row, 1 <= k <= n_items; a row gets min(k, s) entries (fewer if an approximate
            index finds fewer candidates).
        index: "auto" | "exact" | "ivf" | "hnsw" (see :func:`build_knn`).
        exact_max_items: ``"auto"`` searches exactly when s <= exact_max_items.
        include_self: when a target is also a source, make sure it is in its own row (cosine ~1); an
            approximate index could otherwise miss it (the weakest entry is replaced).
        chunk_size: rows per FAISS call / IVF scan call (bounds the working memory to chunk_size x d).
        nlist, nprobe, train_per_list, kmeans_iters: IVF lists (default ~2 sqrt(s)), lists probed per
            query (default None: enough lists for ~2,560 candidates, at least 8), k-means training
            points per list (seeded sample) and k-means iterations.
        hnsw_m, ef_search, ef_construction: HNSW parameters.
        seed: seeds the IVF training sample and k-means.
        n_threads: FAISS OpenMP threads (default: CPUs available to the process); restored afterwards.
            The IVF list scan runs on Numba's threads (``numba.set_num_threads``).
        progress: show tqdm progress bars (stderr).

    Returns:
        :class:`KnnRows` with global item ids as columns (sorted per row) and raw cosine values.

    Raises:
        ValueError: bad shapes, dtypes, ids, NaN/inf or all-zero feature rows, k out of range.
    """
    features = _check_features(features)
    n = features.shape[0]
    k = _check_k(k, n)
    rows = _check_ids(rows, n, "rows")
    sources = _check_ids(sources, n, "sources")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if nprobe is not None and (isinstance(nprobe, bool) or int(nprobe) != nprobe or nprobe < 1):
        raise ValueError(f"nprobe must be a positive integer or None (automatic), got {nprobe!r}")
    kind = _resolve_kind(index, sources.size, exact_max_items)
    if rows.size == 0 or sources.size == 0:
        return KnnRows(rows, np.zeros(rows.size + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    opt = _Search(kind, int(chunk_size), nlist, nprobe, int(train_per_list), int(kmeans_iters), int(hnsw_m),
                  int(ef_search), int(ef_construction), int(seed), bool(progress))
    inv_q = _inverse_norms(features, rows, "target", opt.chunk_size)
    inv_s = _inverse_norms(features, sources, "source", opt.chunk_size)
    k_eff = min(k, sources.size)
    with _faiss_threads(n_threads):
        search = _search_ivf if kind == "ivf" else _search_faiss
        cols, vals = search(features, rows, inv_q, sources, inv_s, k_eff, opt)
    if include_self:
        _force_self(features, rows, inv_q, cols, vals, sources)
    return _rows_to_csr(rows, cols, vals, n)


def _force_self(features, rows, inv_q, cols, vals, sources):
    """Put each target that is also a source into its own row if the search missed it.

    The weakest slot (an empty one if any, else the smallest similarity) is replaced.
    """
    has_self = (cols == rows[:, None]).any(axis=1)
    fix = np.flatnonzero(~has_self & np.isin(rows, sources, assume_unique=True))
    if fix.size == 0:
        return
    x = _unit_rows(features, rows[fix], inv_q[fix])
    weakest = np.where(cols[fix] < 0, -np.inf, vals[fix]).argmin(axis=1)
    cols[fix, weakest] = rows[fix]
    vals[fix, weakest] = np.einsum("ij,ij->i", x, x)


def _rows_to_csr(rows, cols, vals, n) -> KnnRows:
    """Padded [r, k] neighbour lists (-1 = none) -> CSR rows with columns sorted."""
    key = np.where(cols < 0, n, cols)
    order = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    valid = key < n
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(valid.sum(axis=1), out=indptr[1:])
    return KnnRows(rows, indptr, key[valid].astype(np.int64, copy=False),
                   vals[valid].astype(np.float32, copy=False))


def build_knn(features: np.ndarray, k: int, present=None, *, candidates: str = "present",
              index: str = "auto", exact_max_items: int = EXACT_MAX_ITEMS, chunk_size: int = DEFAULT_CHUNK,
              nlist: int | None = None, nprobe: int | None = DEFAULT_NPROBE, train_per_list: int = 16,
              kmeans_iters: int = 10, hnsw_m: int = DEFAULT_HNSW_M, ef_search: int = DEFAULT_EF_SEARCH,
              ef_construction: int = 40, seed: int = 0, n_threads: int | None = None,
              progress: bool = True) -> KnnGraph:
    """Raw (un-normalised) cosine top-k graph of one modality, with the missing-item self-loop rule.

    Row i of a present item holds its k most cosine-similar present items, itself included, with their
    similarities; the row of a missing item holds a single self-loop of weight 1.0, and missing items
    appear in no other row. Normalise with :func:`normalize_knn`.

    Index choice (``index="auto"``): exact ``IndexFlatIP`` when at most ``exact_max_items`` (20,000)
    items are indexed, IVF-Flat with the per-list scan above (defaults: recall@10 0.998 at
    100,000 x 384 in ~1/7 of the exact time; FAISS HNSW needed as long as exact for 0.967; the
    measurements are in the module docstring).

    Args:
        features: float32 [n_items, d] raw modality features (other float dtypes are converted).
        k: neighbours per row including the item itself, 1 <= k <= n_items (a present row gets
            min(k, number of candidates) entries).
        present: bool [n_items], True where the item has the modality; None = all present.
        candidates: "present" (index only present items; the default) or "all" (index every item, then
            drop the columns of missing items: the authors' exact rule, rows may keep fewer than k).
        index: "auto" | "exact" | "ivf" | "hnsw".
        exact_max_items: largest indexed-item count searched exactly by ``"auto"``.
        chunk_size: queries per FAISS call / IVF scan call (memory: chunk_size x d floats + the index).
        nlist, nprobe, train_per_list, kmeans_iters, hnsw_m, ef_search, ef_construction: index
            parameters (see :func:`query_rows`).
        seed: seeds the IVF training sample and k-means; results are deterministic for a seed and a
            thread count (exact and IVF; HNSW's parallel construction is not deterministic).
        n_threads: FAISS threads (default: all CPUs available; the previous setting is restored); the
            IVF list scan runs on Numba's threads.
        progress: tqdm progress bars on stderr.

    Returns:
        :class:`KnnGraph` with raw cosine weights (float32), columns sorted per row.

    Raises:
        ValueError: NaN/inf or all-zero features of a queried item, k out of range, ``present`` of the
            wrong shape/dtype, unknown ``index``/``candidates``.
    """
    features = _check_features(features)
    n = features.shape[0]
    k = _check_k(k, n)
    present = _check_present(present, n)
    if candidates not in ("present", "all"):
        raise ValueError(f"candidates must be 'present' or 'all', got {candidates!r}")
    present_ids = np.flatnonzero(present).astype(np.int64)
    sources = present_ids if candidates == "present" else np.arange(n, dtype=np.int64)
    got = query_rows(features, present_ids, sources, k, index=index, exact_max_items=exact_max_items,
                     include_self=True, chunk_size=chunk_size, nlist=nlist, nprobe=nprobe,
                     train_per_list=train_per_list, kmeans_iters=kmeans_iters, hnsw_m=hnsw_m,
                     ef_search=ef_search, ef_construction=ef_construction, seed=seed, n_threads=n_threads,
                     progress=progress)
    indices, weights, counts = got.indices, got.weights, np.diff(got.indptr)
    if candidates == "all" and not present.all():
        keep = present[indices]
        row_of = np.repeat(np.arange(present_ids.size), counts)
        counts = np.bincount(row_of[keep], minlength=present_ids.size)
        indices, weights = indices[keep], weights[keep]
    return _assemble(n, present_ids, counts, indices, weights)


def _assemble(n, rows, counts, indices, weights) -> KnnGraph:
    """Full CSR: ``rows`` get the given entries, every other row a self-loop of weight 1.0."""
    row_nnz = np.ones(n, dtype=np.int64)
    row_nnz[rows] = counts
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(row_nnz, out=indptr[1:])
    out_idx = np.empty(indptr[-1], dtype=np.int64)
    out_w = np.empty(indptr[-1], dtype=np.float32)
    # entries of the queried rows, in row order, go to the positions of those rows
    starts = indptr[rows]
    pos = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts) + np.arange(counts.sum())
    out_idx[pos] = indices
    out_w[pos] = weights
    others = np.ones(n, dtype=bool)
    others[rows] = False
    other_ids = np.flatnonzero(others)
    out_idx[indptr[other_ids]] = other_ids
    out_w[indptr[other_ids]] = 1.0
    return KnnGraph(indptr, out_idx, out_w)


def normalize_knn(g: KnnGraph) -> KnnGraph:
    """Symmetric normalisation D^-1/2 S D^-1/2 with D = row sums of S (the reference's rule).

    Entry (i, j) becomes S_ij / sqrt(D_i D_j). Computed by the Numba kernels ``row_sums`` and
    ``sym_normalize_rows`` in O(nnz).

    Args:
        g: raw graph from :func:`build_knn`.

    Returns:
        a new :class:`KnnGraph` with the same sparsity pattern (``indptr``/``indices`` shared).
    """
    degree = row_sums(g.indptr, g.weights)
    data = sym_normalize_rows(g.indptr, g.indices, g.weights, degree)
    return KnnGraph(g.indptr, g.indices, np.asarray(data, dtype=np.float32))


def modality_knn_graphs(features: dict[str, np.ndarray], present: dict[str, np.ndarray], k: int, *,
                        candidates: str = "present", index: str = "auto", seed: int = 0,
                        progress: bool = False) -> dict[str, KnnGraph]:
    """The normalised kNN graph (Eq. 4) of every modality: :func:`build_knn`, then :func:`normalize_knn`.

    The one place DGMRec's initial graphs are built (the model and the partitioner both call it).

    Args:
        features: modality -> raw features [n_items, d_m].
        present: modality -> bool [n_items] (True where the item has the modality).
        k, candidates, index, seed, progress: as in :func:`build_knn`.

    Returns:
        modality -> :class:`KnnGraph` [n_items, n_items], in the order of ``features``.
    """
    return {m: normalize_knn(build_knn(x, k, present[m], candidates=candidates, index=index, seed=seed,
                                       progress=progress))
            for m, x in features.items()}


# --------------------------------------------------------------------------------------------------
# synthetic data for tests and benchmarks


def clustered_features(n: int, d: int, *, n_clusters: int | None = None, noise: float = 1.0,
                       seed: int = 0, block: int = 65_536) -> np.ndarray:
    """Synthetic clustered float32 features [n, d] for tests and benchmarks (not pure noise).

    Items belong to ``n_clusters`` (default n // 1000, at least 1) clusters with unit-norm random centres
    and log-normal popularities (cluster sizes vary by ~10x); an item is its centre plus isotropic
    Gaussian noise of total norm ~``noise``, plus a shared offset so that cosines are mostly positive,
    as with real embedding features. With the defaults the top-10 cosines are ~0.6 and a cluster spans
    several IVF lists, so an approximate index has real work to do (IVF nprobe 4 reaches ~0.75
    recall@10 at 100K x 384). Generated block by block (``block`` rows, each seeded from
    (seed, block index)), so memory stays at the output array.
    """
    if n < 1 or d < 1:
        raise ValueError(f"n and d must be >= 1, got n={n}, d={d}")
    n_clusters = max(1, n // 1000) if n_clusters is None else int(n_clusters)
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    popularity = rng.lognormal(0.0, 1.0, size=n_clusters)
    cdf = np.cumsum(popularity / popularity.sum())
    offset = rng.standard_normal(d, dtype=np.float32)
    offset *= 0.5 / np.linalg.norm(offset)
    out = np.empty((n, d), dtype=np.float32)
    scale = np.float32(noise / math.sqrt(d))
    for b, start in enumerate(range(0, n, block)):
        stop = min(n, start + block)
        brng = np.random.default_rng([seed, 1, b])
        assign = np.minimum(np.searchsorted(cdf, brng.random(stop - start)), n_clusters - 1)
        chunk = out[start:stop]
        brng.standard_normal(out=chunk, dtype=np.float32)
        chunk *= scale
        chunk += centres[assign]
        chunk += offset
    return out
