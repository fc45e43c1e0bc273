"""BPR triple sampling over a CSR user×item train matrix (the ``(u, i+, i-)`` batches of DGMRec's BPR loss).

The train matrix is CSR ``(indptr [n_users+1] int64, indices [nnz] int64)`` with the items of each user
sorted ascending and unique (values are not needed).

Randomness never comes from a global RNG: every draw is a counter-based hash (splitmix64) of the seed,
the output position and the attempt number, so results depend on ``seed`` only, never on the number of
Numba threads or on how ``prange`` splits the work.

Public functions:

- :func:`sample_negatives` — one uniform non-interacted item per requested user.
- :func:`bpr_triples` — every train interaction once, in a seeded random order, each with a negative.

Both take an optional ``candidates`` array, the items a negative may be (the release's new-items setting
draws negatives only among the items that appear in training, never a new item). The kernels then run on
the train matrix with every item replaced by its position among the candidates (the candidates must hold
every train item), and the drawn positions are mapped back: uniform over the user's non-interacted
candidates, with the same streams as without ``candidates`` when they are all the items.
"""

from __future__ import annotations

import operator

import numba
import numpy as np

from kernels.refine import _as_index_array, _coerce_csr

__all__ = ["bpr_triples", "sample_negatives"]

# Rejection attempts before falling back to drawing the rank of a free item directly. Either way the
# negative is uniform over the user's free items; the fallback only bounds the cost for dense users.
_MAX_ATTEMPTS = 32

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_STREAM_PERMUTATION = np.uint64(0x243F6A8885A308D3)
_STREAM_NEGATIVES = np.uint64(0x13198A2E03707344)
_U64_MASK = (1 << 64) - 1


@numba.njit(cache=True)
def _splitmix64(z):
    """The splitmix64 finaliser of ``z + golden``: a bijection on uint64 with good avalanche."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True)
def _draw(key, index, attempt):
    """A uint64 hash of ``(key, index, attempt)``; ``key`` is a uint64 stream key."""
    return _splitmix64(_splitmix64(key ^ np.uint64(index)) ^ np.uint64(attempt))


@numba.njit(cache=True)
def _below(h, n):
    """Map a uint64 hash to an integer in ``[0, n)`` using its top 53 bits (bias below n / 2**53)."""
    k = np.int64(np.float64(h >> np.uint64(11)) * 1.1102230246251565e-16 * n)
    if k >= n:
        k = n - 1
    return k


def _stream_key(seed, stream) -> np.uint64:
    """The uint64 key of one random stream (permutation or negatives) of a seed."""
    return np.uint64(_splitmix64(np.uint64(operator.index(seed) & _U64_MASK) ^ stream))


@numba.njit(cache=True)
def _in_row(indices, lo, hi, item):
    """Binary search for ``item`` in the sorted slice ``indices[lo:hi]``."""
    while lo < hi:
        mid = (lo + hi) >> 1
        v = indices[mid]
        if v == item:
            return True
        if v < item:
            lo = mid + 1
        else:
            hi = mid
    return False


@numba.njit(cache=True)
def _kth_free(indices, lo, hi, rank):
    """The ``rank``-th (0-based) item missing from the sorted unique slice ``indices[lo:hi]``.

    ``indices[lo + k] - k`` is non-decreasing; the answer is ``rank`` plus the number of train items
    whose value minus their position is at most ``rank``.
    """
    a = 0
    b = hi - lo
    while a < b:
        mid = (a + b) >> 1
        if indices[lo + mid] - mid <= rank:
            a = mid + 1
        else:
            b = mid
    return rank + a


@numba.njit(parallel=True, cache=True)
def _negatives(indptr, indices, users, n_items, key):
    m = users.shape[0]
    neg = np.empty(m, dtype=np.int64)
    for k in numba.prange(m):
        u = users[k]
        lo = indptr[u]
        hi = indptr[u + 1]
        found = -1
        for attempt in range(_MAX_ATTEMPTS):
            item = _below(_draw(key, k, attempt), n_items)
            if not _in_row(indices, lo, hi, item):
                found = item
                break
        if found < 0:
            n_free = n_items - (hi - lo)
            found = _kth_free(indices, lo, hi, _below(_draw(key, k, _MAX_ATTEMPTS), n_free))
        neg[k] = found
    return neg


@numba.njit(cache=True)
def _permutation(m, key):
    """Fisher–Yates shuffle of ``arange(m)`` driven by the hash stream ``key``."""
    perm = np.arange(m)
    for i in range(m - 1, 0, -1):
        j = _below(_draw(key, i, 0), i + 1)
        t = perm[i]
        perm[i] = perm[j]
        perm[j] = t
    return perm


@numba.njit(parallel=True, cache=True)
def _gather_pairs(indptr, indices, perm):
    n_users = indptr.shape[0] - 1
    nnz = indices.shape[0]
    owner = np.empty(nnz, dtype=np.int64)
    for u in numba.prange(n_users):
        for e in range(indptr[u], indptr[u + 1]):
            owner[e] = u
    users = np.empty(nnz, dtype=np.int64)
    pos = np.empty(nnz, dtype=np.int64)
    for k in numba.prange(nnz):
        e = perm[k]
        users[k] = owner[e]
        pos[k] = indices[e]
    return users, pos


# --------------------------------------------------------------------------------------------------
# public wrappers
# --------------------------------------------------------------------------------------------------


def _coerce_train(indptr, indices, n_items):
    """Validate the train CSR: shape invariants, items in ``[0, n_items)``, sorted and unique per row."""
    n_items = operator.index(n_items)
    if n_items < 1:
        raise ValueError(f"n_items must be positive, got {n_items}")
    indptr, indices, _ = _coerce_csr(indptr, indices, None, n_items, "train")
    if indices.size > 1:
        increasing = indices[1:] > indices[:-1]
        # positions where a new row starts do not need to increase
        starts = indptr[1:-1]
        starts = starts[(starts > 0) & (starts < indices.size)]
        increasing[starts - 1] = True
        if not np.all(increasing):
            e = int(np.flatnonzero(~increasing)[0]) + 1
            user = int(np.searchsorted(indptr, e, side="right")) - 1
            raise ValueError(
                f"train indices must be sorted ascending and unique within each row; user {user} has "
                f"{indices[e - 1]} then {indices[e]} (call sort_indices() / sum_duplicates() first)"
            )
    return indptr, indices, n_items


def _check_not_full(lengths: np.ndarray, users: np.ndarray, n_items: int) -> None:
    full = lengths >= n_items
    if np.any(full):
        bad = np.unique(users[full])
        raise ValueError(
            f"{bad.size} user(s) interacted with all {n_items} items, so no negative exists "
            f"(first: {bad[:5].tolist()}); drop them from the training users"
        )


def _candidate_positions(indices, n_items, candidates):
    """``(candidates, positions of indices among them)``: the train items in the candidates' numbering."""
    candidates = _as_index_array(candidates, "candidates")
    if candidates.size == 0:
        raise ValueError("candidates is empty, so no negative can be drawn")
    if candidates[0] < 0 or candidates[-1] >= n_items or (candidates.size > 1 and np.any(np.diff(candidates) <= 0)):
        raise ValueError(f"candidates must be sorted, unique item ids in [0, {n_items})")
    positions = np.searchsorted(candidates, indices)
    known = positions < candidates.size
    known[known] = candidates[positions[known]] == indices[known]
    if not known.all():
        raise ValueError(f"train item {int(indices[~known][0])} is not among the candidates; every train item "
                         "must be one (negatives are drawn among the items outside the user's row)")
    return candidates, positions.astype(np.int64)


def sample_negatives(indptr, indices, users, n_items, seed, candidates=None):
    """Draw one negative item per entry of ``users``, uniform over the items not in that user's row.

    Parameters
    ----------
    1. indptr, indices : train CSR, ``[n_users+1]`` and ``[nnz]`` int64, items sorted and unique per row.
    2. users : ``[m]`` int64 user ids (repeats allowed).
    3. n_items : int, number of items (columns).
    4. seed : int (taken modulo 2**64); ``neg[k]`` depends only on seed, k and the train row of
       ``users[k]``, not on the Numba thread count.
    5. candidates : optional ``[c]`` sorted unique int64 item ids holding every train item; negatives are
       drawn among them only (default: every item).

    Returns
    -------
    ``neg`` : ``[m]`` int64, ``neg[k]`` not in the train row of ``users[k]``.

    Raises ``ValueError`` if a requested user has interacted with every item.
    """
    indptr, indices, n_items = _coerce_train(indptr, indices, n_items)
    users = _as_index_array(users, "users")
    n_users = indptr.size - 1
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"users must lie in [0, {n_users}), got values in [{users.min()}, {users.max()}]")
    key = _stream_key(seed, _STREAM_NEGATIVES)
    if candidates is None:
        _check_not_full(indptr[users + 1] - indptr[users], users, n_items)
        return _negatives(indptr, indices, users, n_items, key)
    candidates, positions = _candidate_positions(indices, n_items, candidates)
    _check_not_full(indptr[users + 1] - indptr[users], users, candidates.size)
    return candidates[_negatives(indptr, positions, users, candidates.size, key)]


def bpr_triples(indptr, indices, n_items, seed, candidates=None):
    """All train interactions as BPR triples ``(u, i+, i-)`` in a random order drawn from ``seed``.

    Parameters
    ----------
    1. indptr, indices : train CSR, ``[n_users+1]`` and ``[nnz]`` int64, items sorted and unique per row.
    2. n_items : int, number of items.
    3. seed : int (taken modulo 2**64); the result does not depend on the Numba thread count.
    4. candidates : optional sorted unique item ids holding every train item: the negatives are drawn
       among them only (default: every item).

    Returns
    -------
    ``(users, pos, neg)`` : three ``[nnz]`` int64 arrays. ``(users[k], pos[k])`` runs over every train
    pair exactly once; ``neg`` equals ``sample_negatives(indptr, indices, users, n_items, seed, candidates)``.

    Raises ``ValueError`` if a user with train interactions has interacted with every item.
    """
    indptr, indices, n_items = _coerce_train(indptr, indices, n_items)
    lengths = np.diff(indptr)
    perm = _permutation(indices.size, _stream_key(seed, _STREAM_PERMUTATION))
    users, pos = _gather_pairs(indptr, indices, perm)
    key = _stream_key(seed, _STREAM_NEGATIVES)
    if candidates is None:
        _check_not_full(lengths, np.arange(lengths.size), n_items)
        return users, pos, _negatives(indptr, indices, users, n_items, key)
    candidates, positions = _candidate_positions(indices, n_items, candidates)
    _check_not_full(lengths, np.arange(lengths.size), candidates.size)
    return users, pos, candidates[_negatives(indptr, positions, users, candidates.size, key)]
