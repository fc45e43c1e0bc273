"""Tests of kernels.sampling (BPR triples with uniform negatives over each user's non-train items)."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.reference import negatives_valid_reference, train_pairs_reference
from kernels.sampling import bpr_triples, sample_negatives

SETTINGS = settings(deadline=None, max_examples=60)


def _train_csr(rng, n_users, n_items, max_fill):
    """Random train CSR, sorted unique items per row, every row strictly below ``n_items`` items."""
    indptr = [0]
    rows = []
    for _ in range(n_users):
        k = int(rng.integers(0, int(max_fill * (n_items - 1)) + 1))
        rows.append(np.sort(rng.choice(n_items, size=k, replace=False)))
        indptr.append(indptr[-1] + k)
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return np.asarray(indptr, dtype=np.int64), indices


@st.composite
def train_sets(draw):
    n_users = draw(st.integers(1, 20))
    n_items = draw(st.integers(1, 30))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    max_fill = draw(st.sampled_from([0.1, 0.5, 1.0]))  # 1.0: users with a single free item
    indptr, indices = _train_csr(rng, n_users, n_items, max_fill)
    return indptr, indices, n_items


@SETTINGS
@given(train_sets(), st.integers(-(2**63), 2**64 - 1))
def test_bpr_triples_cover_train_once_with_valid_negatives(train, seed):
    indptr, indices, n_items = train
    users, pos, neg = bpr_triples(indptr, indices, n_items, seed)
    assert [a.dtype for a in (users, pos, neg)] == [np.int64] * 3
    assert len(users) == len(pos) == len(neg) == len(indices)
    pairs = np.stack([users, pos], axis=1)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    assert np.array_equal(pairs, train_pairs_reference(indptr, indices))
    assert np.all(negatives_valid_reference(indptr, indices, users, neg, n_items))
    assert np.array_equal(neg, sample_negatives(indptr, indices, users, n_items, seed))


@SETTINGS
@given(train_sets(), st.integers(0, 2**32), st.integers(0, 50))
def test_sample_negatives_valid_and_deterministic(train, seed, m):
    indptr, indices, n_items = train
    rng = np.random.default_rng(seed)
    users = rng.integers(0, len(indptr) - 1, size=m)
    neg = sample_negatives(indptr, indices, users, n_items, seed)
    assert neg.shape == (m,)
    assert np.all(negatives_valid_reference(indptr, indices, users, neg, n_items))
    assert np.array_equal(neg, sample_negatives(indptr, indices, users, n_items, seed))


def _medium_train():
    return _train_csr(np.random.default_rng(7), 200, 100, 0.3)


def test_same_seed_same_arrays_different_seed_different():
    indptr, indices = _medium_train()
    first = bpr_triples(indptr, indices, 100, 123)
    again = bpr_triples(indptr, indices, 100, 123)
    other = bpr_triples(indptr, indices, 100, 124)
    for a, b in zip(first, again):
        assert np.array_equal(a, b)
    assert not np.array_equal(first[0], other[0])  # a different order
    assert not np.array_equal(first[2], other[2])


def test_bpr_triples_independent_of_thread_count():
    indptr, indices = _medium_train()
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = bpr_triples(indptr, indices, 100, 5)
    finally:
        numba.set_num_threads(before)
    multi = bpr_triples(indptr, indices, 100, 5)
    for a, b in zip(single, multi):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("n_train", [3, 195, 199])
def test_negatives_uniform_over_free_items(n_train):
    # 3 train items: rejection path; 195 of 200: about half rejection, half rank fallback; 199: one choice.
    n_items, draws = 200, 20_000
    train_items = np.sort(np.random.default_rng(n_train).choice(n_items, size=n_train, replace=False))
    indptr = np.array([0, n_train])
    neg = sample_negatives(indptr, train_items, np.zeros(draws, np.int64), n_items, seed=11)
    free = np.setdiff1d(np.arange(n_items), train_items)
    counts = np.bincount(neg, minlength=n_items)
    assert counts[train_items].sum() == 0
    expected = draws / len(free)
    chi2 = float(((counts[free] - expected) ** 2 / expected).sum())
    dof = max(len(free) - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof), f"chi2 {chi2:.1f} for {dof} degrees of freedom"


def test_user_with_every_item_raises():
    indptr, indices = np.array([0, 1, 4]), np.array([2, 0, 1, 2])
    with pytest.raises(ValueError, match="interacted with all 3 items"):
        bpr_triples(indptr, indices, 3, 0)
    with pytest.raises(ValueError, match="first: \\[1\\]"):
        sample_negatives(indptr, indices, [0, 1], 3, 0)
    assert sample_negatives(indptr, indices, [0, 0], 3, 0).tolist() != [2, 2]


@pytest.mark.parametrize(
    "indptr, indices, n_items, message",
    [
        ([0, 2], [1, 0], 5, "sorted ascending and unique"),
        ([0, 2], [1, 1], 5, "sorted ascending and unique"),
        ([0, 1], [5], 5, r"must lie in \[0, 5\)"),
        ([0, 2], [1], 5, r"indptr\[-1\]"),
        ([0, 1], [0], 0, "n_items must be positive"),
    ],
)
def test_train_validation(indptr, indices, n_items, message):
    with pytest.raises(ValueError, match=message):
        bpr_triples(indptr, indices, n_items, 0)


def test_row_boundaries_need_not_increase_and_users_checked():
    indptr, indices = np.array([0, 2, 4]), np.array([3, 4, 0, 1])
    users, pos, neg = bpr_triples(indptr, indices, 6, 0)
    assert np.all(negatives_valid_reference(indptr, indices, users, neg, 6))
    with pytest.raises(ValueError, match=r"users must lie in \[0, 2\)"):
        sample_negatives(indptr, indices, [2], 6, 0)


def test_bpr_triples_at_200k_users():
    """Sanity at scale: 200,000 users with 10 train items each (no timing asserts)."""
    n_users, n_items, k = 200_000, 50_000, 10
    rng = np.random.default_rng(3)
    # sorted draws plus 0..k-1 are strictly increasing and stay below n_items
    indices = (np.sort(rng.integers(0, n_items - k + 1, size=(n_users, k)), axis=1) + np.arange(k)).ravel()
    indptr = np.arange(0, n_users * k + 1, k)
    lengths = np.full(n_users, k)
    users, pos, neg = bpr_triples(indptr, indices, n_items, 0)
    assert len(users) == len(indices)
    assert np.all(negatives_valid_reference(indptr, indices, users[:10_000], neg[:10_000], n_items))
    assert np.array_equal(np.bincount(users, minlength=n_users), lengths)


# ---------------------------------------------------------------------- candidates (the new-items setting)
@SETTINGS
@given(train_sets(), st.integers(0, 2**32), st.integers(0, 30))
def test_negatives_are_never_outside_the_candidates(train, seed, n_excluded):
    """The release's new-items setting: negatives among the candidates (items with train rows) only, on the
    rejection path and on the rank fallback (users holding most candidates); every other property holds."""
    indptr, indices, n_items = train
    rng = np.random.default_rng(seed)
    excluded = rng.choice(n_items, size=min(n_excluded, n_items), replace=False)   # the "new" items
    candidates = np.setdiff1d(np.arange(n_items), excluded)
    # drop the excluded items from the train rows (new items have none), keep only users with a free candidate
    rows = [np.setdiff1d(indices[indptr[u]:indptr[u + 1]], excluded) for u in range(len(indptr) - 1)]
    rows = [r for r in rows if len(r) < len(candidates)]
    if not rows:
        return
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    indices = np.concatenate(rows).astype(np.int64)
    users, pos, neg = bpr_triples(indptr, indices, n_items, seed, candidates)
    assert not np.isin(neg, excluded).any()
    assert np.all(negatives_valid_reference(indptr, indices, users, neg, n_items))
    assert np.array_equal(neg, sample_negatives(indptr, indices, users, n_items, seed, candidates))
    # the order and the positives do not depend on the candidates
    u0, p0, _ = bpr_triples(indptr, indices, n_items, seed)
    assert np.array_equal(users, u0) and np.array_equal(pos, p0)


def test_candidates_of_every_item_draw_what_no_candidates_draw():
    rng = np.random.default_rng(3)
    indptr, indices = _train_csr(rng, 50, 40, 0.9)
    for a, b in zip(bpr_triples(indptr, indices, 40, 9), bpr_triples(indptr, indices, 40, 9, np.arange(40))):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("n_train", [3, 95, 99])
def test_candidate_negatives_uniform_over_free_candidates(n_train):
    # 100 candidates among 200 items; 3 train items: rejection path; 95: mostly the rank fallback; 99: one choice
    n_items, draws = 200, 20_000
    candidates = np.sort(np.random.default_rng(0).choice(n_items, size=100, replace=False))
    train_items = np.sort(np.random.default_rng(n_train).choice(candidates, size=n_train, replace=False))
    neg = sample_negatives(np.array([0, n_train]), train_items, np.zeros(draws, np.int64), n_items, 11, candidates)
    free = np.setdiff1d(candidates, train_items)
    counts = np.bincount(neg, minlength=n_items)
    assert counts.sum() == counts[free].sum() == draws
    expected = draws / len(free)
    chi2 = float(((counts[free] - expected) ** 2 / expected).sum())
    dof = max(len(free) - 1, 1)
    assert chi2 < dof + 6 * np.sqrt(2 * dof), f"chi2 {chi2:.1f} for {dof} degrees of freedom"


def test_bad_candidates_are_refused():
    indptr, indices = np.array([0, 2]), np.array([1, 3])
    with pytest.raises(ValueError, match="train item 3 is not among the candidates"):
        bpr_triples(indptr, indices, 5, 0, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="sorted, unique"):
        bpr_triples(indptr, indices, 5, 0, np.array([3, 1, 0]))
    with pytest.raises(ValueError, match="interacted with all 2 items"):
        bpr_triples(indptr, indices, 5, 0, np.array([1, 3]))
