"""The new-items setting: stratified choice, train rows removed, test restricted to new items."""

import numpy as np

from conftest import shared_split
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.new_items import choose_new_items, infer_new_items, new_items_split


def test_choice_is_stratified_over_cold_and_warm_items():
    counts = np.arange(1000)          # item i has i train interactions: cold = 0..699, warm = 700..999
    new = choose_new_items(counts, fraction=0.2, cold_share=0.7, seed=1111)
    assert len(new) == 200 and len(np.unique(new)) == 200
    assert (new < 700).sum() == 140 and (new >= 700).sum() == 60
    np.testing.assert_array_equal(new, choose_new_items(counts, seed=1111))
    assert not np.array_equal(new, choose_new_items(counts, seed=1))


def test_split_on_real_baby_interactions():
    full = Dataset.load(shared_split("baby"), inter="baby.inter")
    ds = new_items_split(full)
    new = ds.new_items
    assert abs(len(new) - 0.2 * full.n_items) <= 1
    assert not np.isin(ds.train[:, 1], new).any()                # no train row of a new item
    assert np.isin(ds.test[:, 1], new).all()                     # test restricted to new items
    removed = full.train[np.isin(full.train[:, 1], new)]
    test_pairs = {tuple(p) for p in ds.test}
    has_train = np.isin(removed[:, 0], ds.train[:, 0])
    assert all(tuple(p) in test_pairs for p in removed[has_train])  # reference loader adds them to test
    assert len(ds.valid) <= len(full.valid)
    without = new_items_split(full, test_gets_removed_train=False)
    assert len(without.test) < len(ds.test)


def test_infer_new_items_of_a_shipped_del_file():
    ds = Dataset.load(shared_split("tiktok"), inter="tiktok_del.inter")
    new = infer_new_items(ds)
    assert len(new) > 0 and (ds.item_train_counts()[new] == 0).all()
