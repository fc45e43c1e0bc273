"""Dataset loading: splits, cold-start users, features, masks and imputation."""

import numpy as np
import pytest

from conftest import shared_split, tiny_rows, write_inter
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.masks import MissingMask
from dgmrec_dgl.errors import DataError


def test_tiny_dataset_arrays(tiny_dir):
    ds = Dataset.load(tiny_dir)
    assert (ds.name, ds.n_users, ds.n_items) == ("tiny", 6, 8)
    assert ds.modalities == ("image", "text")
    assert ds.train.shape == (24, 2) and ds.valid.shape == (6, 2) and ds.test.shape == (6, 2)
    assert ds.train.dtype == np.int64
    assert ds.features["image"].dtype == np.float32 and ds.features["image"].shape == (8, 16)
    assert all(p.all() for p in ds.present.values()) and ds.mask is None
    mat = ds.train_matrix()
    assert mat.shape == (6, 8) and mat.nnz == 24 and mat.has_sorted_indices


def test_cold_start_users_are_dropped_from_valid_and_test(tiny_dir):
    rows = tiny_rows() + [(6, 0, 1), (6, 1, 2), (7, 2, 2)]  # users 6 and 7 have no train row
    write_inter(tiny_dir / "tiny.inter", rows)
    ds = Dataset.load(tiny_dir)
    assert ds.n_users == 8
    assert not np.isin([6, 7], ds.valid[:, 0]).any() and not np.isin([6, 7], ds.test[:, 0]).any()
    assert ds.n_dropped_cold == 3 and ds.n_file_rows == len(rows)


def test_explicit_feature_file_names(tiny_dir):
    (tiny_dir / "text_feat.npy").rename(tiny_dir / "sbert.npy")
    ds = Dataset.load(tiny_dir, feature_files={"text": "sbert.npy"})
    assert ds.modalities == ("text",)
    with pytest.raises(DataError, match="audio"):
        Dataset.load(tiny_dir, feature_files={"audio": "audio_feat.npy"})


def test_mean_imputation_and_present_masks(tiny_dir):
    mask = MissingMask(8, ("image", "text"), {"t": np.array([1]), "v": np.array([2, 5]), "all": np.array([7])})
    raw = Dataset.load(tiny_dir)
    ds = raw.with_mask(mask)
    assert ds.imputation == "mean"
    np.testing.assert_array_equal(ds.present["text"], ~np.isin(np.arange(8), [1, 7]))
    np.testing.assert_array_equal(ds.present["image"], ~np.isin(np.arange(8), [2, 5, 7]))
    image = raw.features["image"]
    expected = image[ds.present["image"]].mean(axis=0)
    for item in (2, 5, 7):
        np.testing.assert_allclose(ds.features["image"][item], expected, rtol=1e-6)
    # rows of items that have the modality are untouched, and the raw dataset is not modified
    np.testing.assert_array_equal(ds.features["image"][ds.present["image"]], image[ds.present["image"]])
    assert raw.present["image"].all()


def test_without_features_keeps_everything_but_the_matrices(tiny_dir):
    mask = MissingMask(8, ("image", "text"), {"t": np.array([1]), "v": np.array([2, 5]), "all": np.array([7])})
    ds = Dataset.load(tiny_dir).with_mask(mask)
    bare = ds.without_features()
    assert bare.features == {} and set(ds.features) == {"image", "text"}     # the original keeps its own
    assert bare.modalities == ds.modalities and bare.present is ds.present and bare.mask is ds.mask
    for split in ("train", "valid", "test"):
        assert getattr(bare, split) is getattr(ds, split)
    assert (bare.train_matrix() != ds.train_matrix()).nnz == 0


def test_zero_and_nn_imputation(tiny_dir):
    mask = MissingMask(8, ("image", "text"), {"t": np.array([3]), "v": np.array([]), "all": np.array([])})
    raw = Dataset.load(tiny_dir)
    zero = raw.with_mask(mask, imputation="zero")
    assert not zero.features["text"][3].any()
    nn = raw.with_mask(mask, imputation="nn")
    # brute force: items sharing a train user with item 3 and having text
    train = raw.train
    users = train[train[:, 1] == 3, 0]
    neighbours = np.setdiff1d(np.unique(train[np.isin(train[:, 0], users), 1]), [3])
    expected = raw.features["text"][neighbours].mean(axis=0) if len(neighbours) else \
        raw.features["text"][np.arange(8) != 3].mean(axis=0)
    np.testing.assert_allclose(nn.features["text"][3], expected, rtol=1e-5)
    assert nn.imputation == "nn"


def test_mask_missing_every_item_is_an_error(tiny_dir):
    mask = MissingMask(8, ("image", "text"), {"all": np.arange(8)})
    with pytest.raises(DataError, match="every item lacks"):
        Dataset.load(tiny_dir).with_mask(mask)


def test_real_tiktok_statistics():
    ds = Dataset.load(shared_split("tiktok"), inter="tiktok.inter")
    assert (ds.n_users, ds.n_items, ds.n_file_rows) == (9308, 6710, 68722)
    assert round(100 * ds.sparsity, 2) == 99.89
    assert len(ds.train) == 59541
