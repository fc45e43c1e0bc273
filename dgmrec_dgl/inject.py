r"""Feature injection for items missing a modality: a ``Dataset → Dataset`` transform any model can take.

Models that assume complete modalities need *some* feature row for an item that lacks a modality. This
module fills those rows (``dataset.present[m] == False``) and leaves every observed row untouched:

``mean``
    the mean of the modality's feature rows over the items that have it (the reference's imputation
    option 1, also what :meth:`Dataset.with_mask` does by default).

``nn`` — nearest-neighbour mean of Malitesta et al., "Do We Really Need to Drop Items with Missing
Modalities in Multimodal Recommendation?", CIKM 2024 (*NeighMean*), which the DGMRec paper uses to inject
features for its baselines. What is implemented, exactly:

1. the item–item co-interaction graph of the **train** split, :math:`C = R^\top R` (:math:`C_{ij}` = number
   of train users who interacted with both i and j), never formed densely: rows are computed for the
   missing items only, in chunks;
2. for an item i lacking modality m, its candidate neighbours are the items j ≠ i with
   :math:`C_{ij} > 0` that **have** m;
3. keep the ``top_k`` (default 20, the paper's default) candidates with the largest :math:`C_{ij}`, ties
   broken by the smaller item id (deterministic);
4. the injected row is the unweighted mean of those neighbours' feature rows;
5. an item without any candidate (no train interaction, e.g. a new item in the new-items setting, or only
   co-interacted with items that also lack m) gets the ``mean`` injection.

Differences from the authors' script, on purpose: their top-k runs over a dense :math:`R^\top R` row
including the item itself and items lacking m (whose rows are zeros there, pulling the mean towards 0),
and fills rows with fewer than k co-interacted items with arbitrary zero-count items. Here only
co-interacted items that have the modality count. ``top_k=0`` uses every candidate (the same as
``Dataset.with_mask(..., imputation="nn")``).

Which injection a dataset received is recorded in ``dataset.imputation`` (``mean`` or ``nn-top<k>``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from .data.dataset import Dataset

INJECTIONS = ("none", "mean", "nn")
NN_TOP_K = 20
_CHUNK_ROWS = 2048


def inject_features(dataset: Dataset, method: str, *, top_k: int = NN_TOP_K) -> Dataset:
    """A copy of ``dataset`` whose rows of items lacking a modality are re-filled by ``method``.

    Args:
        dataset: a dataset (with or without a mask).
        method: ``none`` (returned unchanged), ``mean`` or ``nn``.
        top_k: neighbours per item for ``nn`` (0 = all co-interacted items having the modality).

    Returns:
        the new dataset; ``features`` arrays are new float32 ``[n_items, d_m]`` arrays.
    """
    if method not in INJECTIONS:
        raise ValueError(f"inject must be one of {INJECTIONS}, got {method!r}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if method == "none" or not dataset.modalities:
        return dataset
    train = dataset.train_matrix() if method == "nn" else None
    features = {}
    for m in dataset.modalities:
        present = np.asarray(dataset.present[m], dtype=bool)
        if present.all():
            features[m] = dataset.features[m]
            continue
        if not present.any():
            raise ValueError(f"every item lacks {m}, so nothing can be injected")
        if method == "mean":
            features[m] = mean_injection(dataset.features[m], present)
        else:
            features[m] = nn_injection(dataset.features[m], present, train, top_k)
    label = "mean" if method == "mean" else f"nn-top{top_k}" if top_k else "nn-all"
    return replace(dataset, features=features, imputation=label)


def apply_injection(dataset: Dataset, data_config) -> Dataset:
    """The trainer's hook: ``inject_features(dataset, data_config.inject)`` (``none`` is a no-op)."""
    return inject_features(dataset, getattr(data_config, "inject", "none") or "none")


def mean_injection(features: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``[n_items, d]`` copy of ``features`` with rows where ``present`` is False set to the observed mean."""
    out = np.array(features, dtype=np.float32, copy=True)
    out[~present] = features[present].mean(axis=0, dtype=np.float64).astype(np.float32)
    return out


def top_neighbours(train: sp.csr_matrix, rows: np.ndarray, allowed: np.ndarray,
                   top_k: int) -> sp.csr_matrix:
    """Co-interaction neighbours of ``rows`` among ``allowed`` items, as a binary CSR ``[len(rows), n_items]``.

    Args:
        train: binary CSR ``[n_users, n_items]`` train matrix.
        rows: int item ids whose neighbours are wanted.
        allowed: bool ``[n_items]``, the items that may be neighbours (the item itself never is).
        top_k: keep this many per row by co-interaction count, ties to the smaller id (0 = keep all).
    """
    n_items = train.shape[1]
    item_user = train.T.tocsr()
    keep = sp.diags(allowed.astype(np.float32))
    co = (item_user[rows] @ train @ keep).tocsr()               # [len(rows), n_items] counts
    co.eliminate_zeros()
    r = np.repeat(np.arange(len(rows)), np.diff(co.indptr))
    cols, counts = co.indices, co.data
    not_self = cols != np.asarray(rows)[r]
    r, cols, counts = r[not_self], cols[not_self], counts[not_self]
    order = np.lexsort((cols, -counts, r))                        # by row, count desc, id asc
    r, cols = r[order], cols[order]
    if top_k:
        starts = np.searchsorted(r, np.arange(len(rows)))
        rank = np.arange(len(r)) - starts[r]
        r, cols = r[rank < top_k], cols[rank < top_k]
    data = np.ones(len(r), dtype=np.float32)
    return sp.csr_matrix((data, (r, cols)), shape=(len(rows), n_items))


def nn_injection(features: np.ndarray, present: np.ndarray, train: sp.csr_matrix,
                 top_k: int = NN_TOP_K) -> np.ndarray:
    """NeighMean: rows of items lacking the modality ← mean of their top-k co-interaction neighbours'.

    Args:
        features: ``[n_items, d]`` feature rows (rows of missing items are ignored).
        present: bool ``[n_items]``.
        train: binary CSR ``[n_users, n_items]`` train matrix.
        top_k: neighbours per item (0 = all).

    Returns:
        float32 ``[n_items, d]``; observed rows are copied unchanged.
    """
    out = np.array(features, dtype=np.float32, copy=True)
    mean = features[present].mean(axis=0, dtype=np.float64).astype(np.float32)
    lacks = np.flatnonzero(~present)
    for start in range(0, len(lacks), _CHUNK_ROWS):
        rows = lacks[start:start + _CHUNK_ROWS]
        nb = top_neighbours(train, rows, present, top_k)
        counts = np.diff(nb.indptr)
        summed = np.asarray(nb @ features, dtype=np.float64)
        filled = np.where(counts[:, None] > 0, summed / np.maximum(counts, 1)[:, None], mean)
        out[rows] = filled.astype(np.float32)
    return out
