"""The new-items setting of the study: the "Missing Modality + New Items" half of the paper's Table 2.

20% of the items are *new*: they have no train interaction, so a model meets them only through their
modality features. ``data.new_items_protocol`` picks how this is run:

``release`` (default): as the authors' release runs it.

* Which items are new: the shipped split's when the interactions given are a ``<name>_del.inter`` beside the
  full ``<name>.inter`` (new = items with train rows in the full file and none in ``_del``,
  :func:`shipped_new_items`); else the release's draw (its ``data/preprocess_new_items.py``,
  :func:`choose_new_items`), which reproduces the shipped TikTok split exactly. A ``_del`` file without its
  full file: the items without a train row, and the test set lacks the removed train rows (a warning).
* Train: the rows of the new items removed. Valid: as in the file (new items keep their valid rows; the
  paper says they are unseen in validation, the release's loader keeps them). Test: **every** test row plus
  the removed train rows of the new items. Valid/test rows of users left without train rows are dropped.
* What the trainer and the models do with them (:attr:`Dataset.new_items`): BPR negatives are drawn among
  the items with train rows only, never a new item (:func:`negative_candidates`); the imputation mean is
  taken over the old items; DGMRec masks the new items in its training kNN graphs, scores on separate
  inference graphs and generates the new items' missing features before each validation
  (:meth:`dgmrec_dgl.models.dgmrec.model.DGMRec.before_validation`).

``test_new_only``: this package's protocol before issue 19, kept to reproduce its runs. The draw rounds
the group sizes, orders ties by item id and samples with ``numpy.random.default_rng``; the test set is
restricted to the new items (their test rows plus the removed train rows); negatives may be any item;
DGMRec leaves new items out of its generation and does nothing else for them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

import numpy as np

from ..errors import DataError
from .dataset import Dataset, _find_inter
from .io import read_inter

PROTOCOLS = ("release", "test_new_only")
#: suffix of the study's new-items interaction files (``baby_del.inter``: the full file minus new items' train rows)
SHIPPED_SUFFIX = "_del.inter"


def choose_new_items(train_counts: np.ndarray, fraction: float = 0.2, cold_share: float = 0.7,
                     seed: int = 1111, *, protocol: str = "release") -> np.ndarray:
    """Draw the new items, stratified over cold (least interacted) and warm items.

    ``release``: the items sorted by train count in the order numpy's classic quicksort gives (ties
    included, :func:`kernels.introsort.introsort_argsort`, as the release's pandas sort did); the first
    ``floor(cold_share · n)`` are cold, the rest warm; ``floor(fraction · |group|)`` items are drawn without
    replacement from each group by one ``numpy.random.RandomState(seed)``, cold group first.
    ``test_new_only``: a stable sort (ties by item id), rounded group sizes, ``numpy.random.default_rng(seed)``.

    Args:
        train_counts: int ``[n_items]`` train interactions per item.
        fraction: share of each group that becomes new (0.2 in the study).
        cold_share: share of the items, the least interacted, in the cold group (0.7).
        seed: random seed (1111 in the study).
        protocol: ``release`` or ``test_new_only``.

    Returns:
        sorted int64 ids of the new items.
    """
    if not 0.0 < fraction < 1.0 or not 0.0 < cold_share < 1.0:
        raise ValueError(f"fraction and cold_share must be in (0, 1), got {fraction}, {cold_share}")
    n_items = len(train_counts)
    if protocol == "release":
        from kernels.introsort import introsort_argsort      # Numba: imported when a draw is made

        order = introsort_argsort(train_counts)
        n_cold = int(cold_share * n_items)
        draw = np.random.RandomState(seed)
        groups = (order[:n_cold], order[n_cold:])
        picked = [draw.choice(group, size=int(fraction * len(group)), replace=False) for group in groups]
    elif protocol == "test_new_only":
        order = np.argsort(train_counts, kind="stable")
        n_cold = int(round(cold_share * n_items))
        draw = np.random.default_rng(seed)
        picked = [draw.choice(group, size=int(round(fraction * len(group))), replace=False)
                  for group in (order[:n_cold], order[n_cold:]) if len(group)]
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return np.sort(np.concatenate(picked)).astype(np.int64)


def new_items_split(dataset: Dataset, fraction: float = 0.2, cold_share: float = 0.7, seed: int = 1111, *,
                    protocol: str = "release", test_gets_removed_train: bool = True) -> Dataset:
    """The new-items version of ``dataset`` with drawn new items (see the module docstring)."""
    new = choose_new_items(dataset.item_train_counts(), fraction, cold_share, seed, protocol=protocol)
    return restrict_to_new_items(dataset, new, protocol=protocol, test_gets_removed_train=test_gets_removed_train)


def restrict_to_new_items(dataset: Dataset, new_items: np.ndarray, *, protocol: str = "release",
                          test_gets_removed_train: bool = True) -> Dataset:
    """Remove the train rows of ``new_items``; build the protocol's test set; drop users left without train data.

    ``release``: test = every test row + the removed train rows. ``test_new_only``: test = the test rows of
    new items (+ the removed train rows with ``test_gets_removed_train``, the release loader's choice).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    is_new = np.zeros(dataset.n_items, dtype=bool)
    is_new[new_items] = True
    removed = dataset.train[is_new[dataset.train[:, 1]]]
    train = dataset.train[~is_new[dataset.train[:, 1]]]
    test = dataset.test if protocol == "release" else dataset.test[is_new[dataset.test[:, 1]]]
    if test_gets_removed_train:
        test = np.concatenate([test, removed])
    has_train = np.zeros(dataset.n_users, dtype=bool)
    has_train[train[:, 0]] = True
    valid = dataset.valid[has_train[dataset.valid[:, 0]]]
    kept_test = test[has_train[test[:, 0]]]
    dropped = dataset.n_dropped_cold + (len(dataset.valid) - len(valid)) + (len(test) - len(kept_test))
    return replace(dataset, train=train, valid=valid, test=kept_test, new_items=np.flatnonzero(is_new),
                   new_items_protocol=protocol, n_dropped_cold=dropped)


def infer_new_items(dataset: Dataset) -> np.ndarray:
    """New items of a dataset read from a ``*_del.inter`` file alone: the items with no train row."""
    return np.flatnonzero(dataset.item_train_counts() == 0).astype(np.int64)


def is_shipped_split(name: str) -> bool:
    """Whether the dataset (``.inter`` file) ``name`` is one of the study's new-items files, ``<name>_del``."""
    return os.path.basename(name).endswith(SHIPPED_SUFFIX[: -len(".inter")])


def full_inter_path(inter_path: str) -> str | None:
    """The full ``<name>.inter`` beside a shipped ``<name>_del.inter``; None for other files or when it is absent."""
    if not os.path.basename(inter_path).endswith(SHIPPED_SUFFIX):
        return None
    full = inter_path[: -len(SHIPPED_SUFFIX)] + ".inter"
    return full if os.path.exists(full) else None


def interaction_files(root: str, inter: str | None, *, new_items: bool, protocol: str) -> tuple[str | None, str | None]:
    """``(file to load, shipped split)`` for ``data.dir`` / ``data.inter``: in the release's new-items setting a
    shipped ``<name>_del.inter`` with its full ``<name>.inter`` beside it is read through the full file (the
    test set needs the new items' train rows), and the ``_del`` file is the shipped split whose new items
    :func:`new_items_setting` takes; otherwise ``(inter, None)``."""
    if not new_items or protocol != "release":
        return inter, None
    path = _find_inter(root, inter)
    full = full_inter_path(path)
    return (full, path) if full else (path, None)


def shipped_new_items(full: Dataset, shipped_train: np.ndarray, shipped_path: str) -> np.ndarray:
    """The new items of a shipped split: items with train rows in ``full`` and none in ``shipped_train``.

    Args:
        full: the dataset of the full ``<name>.inter``.
        shipped_train: int64 ``[n, 2]`` train pairs of ``<name>_del.inter``.
        shipped_path: that file (for messages).

    Raises:
        DataError: the ``_del`` train rows are not the full train rows minus those of the items it lacks.
    """
    in_full = full.item_train_counts() > 0
    if len(shipped_train) and shipped_train[:, 1].max() >= full.n_items:
        raise DataError(shipped_path, "itemID", f"item {int(shipped_train[:, 1].max())} is beyond the "
                        f"{full.n_items} items of the full file beside it", "use the _del file of that dataset")
    in_shipped = np.bincount(shipped_train[:, 1], minlength=full.n_items) > 0
    new = np.flatnonzero(in_full & ~in_shipped).astype(np.int64)
    kept = full.train[~np.isin(full.train[:, 1], new)]
    key = lambda pairs: np.unique(pairs[:, 0] * np.int64(full.n_items) + pairs[:, 1])  # noqa: E731
    if not np.array_equal(key(kept), key(shipped_train)):
        raise DataError(shipped_path, "train rows", "are not the train rows of the full file beside it minus "
                        "those of the new items", "pair each <name>_del.inter with the <name>.inter it was "
                        "made from, or train on one of them without --new-items")
    return new


def new_items_setting(dataset: Dataset, *, protocol: str = "release", seed: int = 1111,
                      shipped: str | None = None) -> Dataset:
    """The new-items version of ``dataset`` under ``protocol`` (``data.new_items_protocol``).

    Args:
        dataset: the full interactions (for a shipped split: the ``<name>.inter`` beside ``shipped``).
        protocol: ``release`` or ``test_new_only`` (module docstring).
        seed: seed of the draw (``data.new_items_seed``) when the new items are drawn.
        shipped: the shipped ``<name>_del.inter`` the new items are read from (``release`` only), or None.
    """
    if protocol == "test_new_only":
        return new_items_split(dataset, seed=seed, protocol=protocol)
    if shipped is not None:
        new = shipped_new_items(dataset, read_inter(shipped).split(0), shipped)
    elif is_shipped_split(dataset.name):
        warnings.warn(f"{dataset.root}: {dataset.name}.inter has no full "
                      f"{dataset.name[: -len('_del')]}.inter beside it: the new items are the items without a "
                      "train row and the test set lacks their removed train rows (the release's test set has them)")
        new = infer_new_items(dataset)
    else:
        new = choose_new_items(dataset.item_train_counts(), seed=seed, protocol=protocol)
    return restrict_to_new_items(dataset, new, protocol=protocol)


def negative_candidates(dataset: Dataset, negatives: str = "all") -> np.ndarray | None:
    """The items a BPR negative may be: the items with train rows under ``negatives="train_items"`` (the
    release's sampler) and always in the release's new-items setting (so never a new item); otherwise None
    (every item)."""
    release_new_items = dataset.new_items is not None and dataset.new_items_protocol == "release"
    if negatives != "train_items" and not release_new_items:
        return None
    return np.flatnonzero(dataset.item_train_counts() > 0).astype(np.int64)
