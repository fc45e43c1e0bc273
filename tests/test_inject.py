"""Feature injection (mean, NeighMean nearest-neighbour) as a Dataset → Dataset transform."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from dgmrec_dgl.config import DataConfig
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.masks import MissingMask
from dgmrec_dgl.inject import apply_injection, inject_features, mean_injection, nn_injection, top_neighbours


def _train(pairs, n_users, n_items):
    pairs = np.asarray(pairs)
    return sp.csr_matrix((np.ones(len(pairs), np.float32), (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))


def _dense_reference(features, present, train, top_k):
    """Brute force on the dense co-interaction matrix, written independently of the module."""
    co = (train.T @ train).toarray()
    mean = features[present].mean(0)
    out = features.astype(np.float64).copy()
    for i in np.flatnonzero(~present):
        cand = [(-co[i, j], j) for j in range(len(present)) if j != i and present[j] and co[i, j] > 0]
        cand.sort()
        chosen = [j for _, j in (cand[:top_k] if top_k else cand)]
        out[i] = features[chosen].mean(0) if chosen else mean
    return out


def test_mean_injection_fills_only_missing_rows():
    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    present = np.array([True, False, True, False])
    out = mean_injection(feats, present)
    np.testing.assert_array_equal(out[[0, 2]], feats[[0, 2]])
    np.testing.assert_allclose(out[1], feats[[0, 2]].mean(0))
    np.testing.assert_allclose(out[3], feats[[0, 2]].mean(0))


def test_top_neighbours_by_count_ties_to_smaller_id_excluding_self_and_missing():
    # co-interactions of item 0: item 1 (3 users, but missing), item 2 (2), items 3 and 4 (1 each)
    pairs = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 4), (3, 0), (3, 3)]
    train = _train(pairs, 4, 5)
    allowed = np.array([False, False, True, True, True])
    nb = top_neighbours(train, np.array([0]), allowed, top_k=2)
    assert sorted(nb.indices.tolist()) == [2, 3]           # 2 (count 2), then 3 beats 4 on the tie
    assert sorted(top_neighbours(train, np.array([0]), allowed, 0).indices.tolist()) == [2, 3, 4]


def test_nn_injection_example_and_fallback_to_mean():
    pairs = [(0, 0), (0, 2), (1, 0), (1, 3), (2, 1)]        # item 1 shares no user with an item having m
    train = _train(pairs, 3, 4)
    feats = np.array([[9, 9], [9, 9], [2, 4], [4, 8]], dtype=np.float32)
    present = np.array([False, False, True, True])
    out = nn_injection(feats, present, train, top_k=20)
    np.testing.assert_allclose(out[0], [3, 6])               # mean of items 2 and 3
    np.testing.assert_allclose(out[1], [3, 6])               # no neighbour: global mean of 2 and 3
    np.testing.assert_array_equal(out[2:], feats[2:])


@pytest.mark.parametrize("top_k", [0, 1, 3, 20])
def test_nn_injection_matches_dense_brute_force(top_k):
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 25
    pairs = np.unique(np.stack([rng.integers(0, n_users, 120), rng.integers(0, n_items, 120)], 1), axis=0)
    train = _train(pairs, n_users, n_items)
    feats = rng.normal(size=(n_items, 5)).astype(np.float32)
    present = rng.random(n_items) > 0.4
    out = nn_injection(feats, present, train, top_k)
    np.testing.assert_allclose(out, _dense_reference(feats, present, train, top_k), rtol=1e-5, atol=1e-6)


def _masked(tiny_dir):
    ds = Dataset.load(tiny_dir)
    mask = MissingMask(ds.n_items, ds.modalities, {"t": np.array([1, 5]), "v": np.array([2]), "all": np.array([6])})
    return ds, ds.with_mask(mask)


def test_inject_features_transform(tiny_dir):
    raw, ds = _masked(tiny_dir)
    assert inject_features(ds, "none") is ds
    nn = inject_features(ds, "nn", top_k=3)
    assert nn.imputation == "nn-top3" and ds.imputation == "mean"
    for m in ds.modalities:
        present = ds.present[m]
        np.testing.assert_array_equal(nn.features[m][present], raw.features[m][present])   # observed untouched
        expected = nn_injection(raw.features[m], present, ds.train_matrix(), 3)
        np.testing.assert_allclose(nn.features[m], expected)
    mean = apply_injection(ds, DataConfig(inject="mean"))
    assert mean.imputation == "mean"
    text_present = ds.present["text"]
    np.testing.assert_allclose(mean.features["text"][~text_present],
                               np.broadcast_to(raw.features["text"][text_present].mean(0), (3, 4)), rtol=1e-6)
    assert apply_injection(ds, DataConfig()) is ds
    with pytest.raises(ValueError):
        inject_features(ds, "knn")


def test_all_neighbours_equals_dataset_nn_imputation(tiny_dir):
    raw, ds = _masked(tiny_dir)
    ref = raw.with_mask(ds.mask, imputation="nn")
    ours = inject_features(ds, "nn", top_k=0)
    for m in ds.modalities:
        np.testing.assert_allclose(ours.features[m], ref.features[m], rtol=1e-5, atol=1e-6)
