"""Full-ranking metrics equal a brute-force implementation of the reference definitions."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl import evaluate as evaluate_module
from dgmrec_dgl.evaluate import InnerProductRanker, evaluate, pairs_to_csr, ranking_metrics


def brute_force(ranked, truth_set, k):
    top = ranked[:k]
    hits = [1.0 if item in truth_set else 0.0 for item in top]
    recall = sum(hits) / len(truth_set)
    dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
    idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(truth_set), k)))
    return recall, dcg / idcg


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_items=st.integers(5, 80), n_users=st.integers(1, 12),
       k=st.sampled_from([1, 3, 5, 10]))
def test_ranking_metrics_match_brute_force(seed, n_items, n_users, k):
    rng = np.random.default_rng(seed)
    k = min(k, n_items)
    pairs = []
    for u in range(n_users):
        for i in rng.choice(n_items, size=rng.integers(1, n_items + 1), replace=False):
            pairs.append((u, i))
    truth = pairs_to_csr(np.array(pairs), n_users, n_items)
    top = np.stack([rng.permutation(n_items)[:k] for _ in range(n_users)])
    got = ranking_metrics(top, truth, np.arange(n_users), ks=[k])
    for u in range(n_users):
        t = set(truth[u].indices.tolist())
        r, n = brute_force(top[u].tolist(), t, k)
        assert math.isclose(got[f"recall@{k}"][u], r, rel_tol=1e-12)
        assert math.isclose(got[f"ndcg@{k}"][u], n, rel_tol=1e-12)


def make_dataset(rng, n_users=30, n_items=50):
    train, valid, test = [], [], []
    for u in range(n_users):
        items = rng.choice(n_items, size=8, replace=False)
        train += [(u, i) for i in items[:5]]
        valid += [(u, items[5])]
        test += [(u, i) for i in items[6:]]
    arr = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    return Dataset("t", "", n_users, n_items, arr(train), arr(valid), arr(test), n_file_rows=8 * n_users)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), budget=st.sampled_from([200, 4000, 1 << 20]), masks_valid=st.booleans())
def test_evaluate_masks_seen_items_and_is_chunk_invariant(seed, budget, masks_valid):
    rng = np.random.default_rng(seed)
    ds = make_dataset(rng)
    table = torch.from_numpy(rng.normal(size=(ds.n_users, ds.n_items)).astype(np.float32))
    score = lambda users: table[users].clone()  # noqa: E731
    got = evaluate(score, ds, "test", ks=(5, 10), budget_bytes=budget, masks_valid=masks_valid)
    # brute force: mask train (and valid with masks_valid), rank all remaining items
    seen = {}
    for u, i in np.concatenate([ds.train, ds.valid]) if masks_valid else ds.train:
        seen.setdefault(u, set()).add(i)
    truth = {}
    for u, i in ds.test:
        truth.setdefault(u, set()).add(i)
    for k in (5, 10):
        rec, ndcg = [], []
        for u, t in truth.items():
            order = [i for i in np.argsort(-table[u].numpy(), kind="stable") if i not in seen[u]]
            r, n = brute_force(order, t, k)
            rec.append(r)
            ndcg.append(n)
        assert math.isclose(got[f"recall@{k}"], np.mean(rec), rel_tol=1e-9)
        assert math.isclose(got[f"ndcg@{k}"], np.mean(ndcg), rel_tol=1e-9)


def test_oracle_scores_give_perfect_recall_and_group_breakdown():
    rng = np.random.default_rng(0)
    ds = make_dataset(rng)
    oracle = torch.zeros(ds.n_users, ds.n_items)
    oracle[ds.test[:, 0], ds.test[:, 1]] = 1.0
    got = evaluate(lambda u: oracle[u].clone(), ds, "test", ks=(10,), item_groups=np.arange(ds.n_items) % 2)
    assert got["recall@10"] == 1.0 and got["ndcg@10"] == 1.0
    assert got["recall@10/group=0"] == 1.0 and got["recall@10/group=1"] == 1.0
    worst = evaluate(lambda u: -oracle[u].clone(), ds, "valid", ks=(10,))
    assert worst["recall@10"] < 1.0


def _skewed_factors(rng, n_users, n_items, d=8):
    """Item rows whose norms fall off like popularity (a few long rows), as trained embeddings' do."""
    item = rng.normal(size=(n_items, d)) * (1.0 / (1.0 + np.arange(n_items)) ** 0.7)[rng.permutation(n_items), None]
    user = rng.normal(size=(n_users, d))
    return torch.from_numpy(user.astype(np.float32)), torch.from_numpy(item.astype(np.float32))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), k=st.sampled_from([1, 5, 20]), block=st.sampled_from([3, 16, 1000]),
       d=st.sampled_from([2, 8]))
def test_inner_product_ranker_gives_the_brute_force_lists_and_skips_items(seed, k, block, d):
    """In 2 dimensions many items point the users' way, so the norm bound is nearly tight there: a bound
    taken one item too low (e.g. the block's last norm instead of its first) changes the lists."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 40, 300
    user, item = _skewed_factors(rng, n_users, n_items, d)
    seen = pairs_to_csr(np.array([(u, i) for u in range(n_users)
                                  for i in rng.choice(n_items, size=rng.integers(0, 30), replace=False)],
                                 dtype=np.int64).reshape(-1, 2), n_users, n_items)
    ranker = InnerProductRanker(item, block=block)
    got = ranker.top_k(user, k, seen).numpy()
    scores = (user @ item.T).numpy()
    scores[np.repeat(np.arange(n_users), np.diff(seen.indptr)), seen.indices] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got, want)
    if block < n_items // 4 and d > 2:   # the long rows come first: most users stop well before the end
        assert ranker.scored < (0.5 if k <= 5 else 0.85) * n_users * n_items, (k, ranker.scored)


def test_evaluate_with_factors_ranks_as_scoring_every_item(monkeypatch):
    rng = np.random.default_rng(3)
    ds = make_dataset(rng, n_users=60, n_items=400)
    user, item = _skewed_factors(rng, ds.n_users, ds.n_items)
    plain = evaluate(lambda users: user[users] @ item.T, ds, "test", ks=(5, 10))
    assert evaluate(None, ds, "test", ks=(5, 10), factors=(user, item)) == plain   # below PRUNE_MIN_ITEMS
    monkeypatch.setattr(evaluate_module, "PRUNE_MIN_ITEMS", 0)
    monkeypatch.setattr(evaluate_module, "PRUNE_BLOCK", 16)
    pruned = evaluate(None, ds, "test", ks=(5, 10), factors=(user, item), budget_bytes=4 * 16 * 7)
    assert 0 < pruned.pop("scored_share") < 1
    assert pruned == plain


def test_test_masks_valid_changes_recall_both_ways():
    """One user: train item 0, valid item 1, test item 2; the model ranks 0 > 1 > 2 > 3 > 4.

    Masking train only (the release, MMRec; ``eval.test_masks_valid: false``) leaves the valid item 1 on top,
    so at K = 1 the test item is missed (recall 0); masking train and valid puts the test item first (1).
    """
    arr = lambda x: np.array(x, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    ds = Dataset("t", "", 1, 5, arr([(0, 0)]), arr([(0, 1)]), arr([(0, 2)]), n_file_rows=3)
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    release = evaluate(lambda u: scores[u].clone(), ds, "test", ks=(1, 2))
    assert release["recall@1"] == 0.0 and release["recall@2"] == 1.0
    assert math.isclose(release["ndcg@2"], 1.0 / math.log2(3))
    stricter = evaluate(lambda u: scores[u].clone(), ds, "test", ks=(1, 2), masks_valid=True)
    assert stricter["recall@1"] == 1.0 and stricter["ndcg@2"] == 1.0
    # validation masks the train items only, whatever the switch says
    for masks_valid in (False, True):
        valid = evaluate(lambda u: scores[u].clone(), ds, "valid", ks=(1,), masks_valid=masks_valid)
        assert valid["recall@1"] == 1.0


def test_test_masks_valid_reaches_the_trainer(tmp_path):
    """``eval.test_masks_valid`` from the YAML reaches the test of the best model (train.evaluate_model)."""
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.models.base import Recommender
    from dgmrec_dgl.train import evaluate_model

    class Scores(Recommender):              # the constructed example's scores as a model
        def forward(self, g):
            return None

        def fused(self, reps):
            return torch.tensor([[1.0, 0.0]]), torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])

    arr = lambda x: np.array(x, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    ds = Dataset("t", "", 1, 4, arr([(0, 0)]), arr([(0, 1)]), arr([(0, 2)]), n_file_rows=3)
    for flag, recall in (("false", 0.0), ("true", 1.0)):
        path = tmp_path / f"{flag}.yaml"
        path.write_text(f"eval: {{ks: [1], select_metric: recall@1, test_masks_valid: {flag}}}\n")
        got = evaluate_model(Scores(), None, ds, "test", load_config(path))
        assert got["recall@1"] == recall, flag
