"""The new-items (cold-start items) setting of the reference study.

20% of the items are drawn as *new*: separately from the 70% least-interacted ("cold") items and from the
30% most-interacted ("warm") ones, so both groups keep their share. Their train interactions are removed,
and the test set is restricted to them. In the reference loader the removed train rows join the test set
(``test_gets_removed_train=True``); the study's shipped ``*_del.inter`` files simply drop them (``False``).
Valid rows are left as they are (new items still appear there). Users left without train data are
dropped from valid and test, as everywhere.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .dataset import Dataset


def choose_new_items(train_counts: np.ndarray, fraction: float = 0.2, cold_share: float = 0.7,
                     seed: int = 1111) -> np.ndarray:
    """Draw the new items, stratified over cold and warm items.

    Args:
        train_counts: int ``[n_items]`` train interactions per item.
        fraction: share of items that become new (0.2 in the reference).
        cold_share: share of items, the least interacted, that form the cold group (0.7).
        seed: random seed (1111 in the reference).

    Returns:
        sorted int64 ids of the new items.
    """
    if not 0.0 < fraction < 1.0 or not 0.0 < cold_share < 1.0:
        raise ValueError(f"fraction and cold_share must be in (0, 1), got {fraction}, {cold_share}")
    n_items = len(train_counts)
    order = np.argsort(train_counts, kind="stable")          # least interacted first
    n_cold = int(round(cold_share * n_items))
    cold, warm = order[:n_cold], order[n_cold:]
    rng = np.random.default_rng(seed)
    picked = [rng.choice(group, size=int(round(fraction * len(group))), replace=False)
              for group in (cold, warm) if len(group)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def new_items_split(dataset: Dataset, fraction: float = 0.2, cold_share: float = 0.7, seed: int = 1111,
                    *, test_gets_removed_train: bool = True) -> Dataset:
    """The new-items version of ``dataset`` (see the module docstring)."""
    new = choose_new_items(dataset.item_train_counts(), fraction, cold_share, seed)
    return restrict_to_new_items(dataset, new, test_gets_removed_train=test_gets_removed_train)


def restrict_to_new_items(dataset: Dataset, new_items: np.ndarray, *,
                          test_gets_removed_train: bool = True) -> Dataset:
    """Remove the train rows of ``new_items``, restrict test to them, drop users left without train data."""
    is_new = np.zeros(dataset.n_items, dtype=bool)
    is_new[new_items] = True
    removed = dataset.train[is_new[dataset.train[:, 1]]]
    train = dataset.train[~is_new[dataset.train[:, 1]]]
    test = dataset.test[is_new[dataset.test[:, 1]]]
    if test_gets_removed_train:
        test = np.concatenate([test, removed])
    has_train = np.zeros(dataset.n_users, dtype=bool)
    has_train[train[:, 0]] = True
    valid = dataset.valid[has_train[dataset.valid[:, 0]]]
    kept_test = test[has_train[test[:, 0]]]
    dropped = dataset.n_dropped_cold + (len(dataset.valid) - len(valid)) + (len(test) - len(kept_test))
    return replace(dataset, train=train, valid=valid, test=kept_test, new_items=np.sort(new_items),
                   n_dropped_cold=dropped)


def infer_new_items(dataset: Dataset) -> np.ndarray:
    """New items of a dataset read from a ``*_del.inter`` file: the items with no train row."""
    return np.flatnonzero(dataset.item_train_counts() == 0).astype(np.int64)
