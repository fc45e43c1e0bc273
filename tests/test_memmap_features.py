"""Memory-bounded features: memory-mapped loading, chunked checks, dtypes, imputation maps, PCA reduction."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import tiny_rows, write_inter

from dgmrec_dgl.cli import main
from dgmrec_dgl.config import load_config
from dgmrec_dgl.data import synthetic
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.io import iter_row_blocks, load_features, take_rows
from dgmrec_dgl.data.masks import MissingMask
from dgmrec_dgl.data.reduce import fit_pca
from dgmrec_dgl.errors import DataError


def low_rank(n=2000, d=200, rank=6, noise=0.01, seed=0) -> np.ndarray:
    """float32 [n, d]: rank-``rank`` signal plus an offset (features are rarely centred) plus small noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) + 3.0 * rng.standard_normal(d)
    return (x + noise * rng.standard_normal((n, d))).astype(np.float32)


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_loading_returns_the_files_memory_map(tmp_path, dtype):
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(dtype)
    path = tmp_path / "image_feat.npy"
    np.save(path, x)
    out = load_features(path, field="image features", n_items=50, chunk_rows=8)
    assert isinstance(out, np.memmap) and out.mode == "r" and out.filename == str(path)
    assert isinstance(out.base, __import__("mmap").mmap)          # the file's map itself, not a copy
    assert out.dtype == dtype and not out.flags.writeable
    np.testing.assert_array_equal(out, x)


def test_dataset_keeps_maps(tiny_dir):
    np.save(tiny_dir / "text_feat.npy", np.ones((8, 4), np.float16))
    ds = Dataset.load(tiny_dir)
    assert all(isinstance(ds.features[m], np.memmap) for m in ds.modalities)
    assert ds.features["image"].dtype == np.float32 and ds.features["text"].dtype == np.float16


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_chunked_check_catches_the_last_chunk(tmp_path, dtype, value):
    x = np.ones((10, 3), dtype)
    x[9, 2] = value                                   # rows 9: the last, partial, chunk of 4 + 4 + 2
    np.save(tmp_path / "f.npy", x)
    with pytest.raises(DataError, match="row 9") as err:
        load_features(tmp_path / "f.npy", field="text features", n_items=10, chunk_rows=4)
    assert err.value.field == "text features" and err.value.path.endswith("f.npy")


def test_fortran_order_and_big_endian_are_read(tmp_path):
    x = np.asfortranarray(np.arange(30, dtype=np.float32).reshape(10, 3))
    np.save(tmp_path / "f.npy", x)
    np.testing.assert_array_equal(load_features(tmp_path / "f.npy", field="f", n_items=10), x)
    x[7, 1] = np.nan
    np.save(tmp_path / "f.npy", x)
    with pytest.raises(DataError, match="row 7"):
        load_features(tmp_path / "f.npy", field="f", n_items=10)
    np.save(tmp_path / "b.npy", np.arange(30, dtype=">f2").reshape(10, 3))
    np.testing.assert_array_equal(load_features(tmp_path / "b.npy", field="f", n_items=10, chunk_rows=3),
                                  np.arange(30).reshape(10, 3))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool, np.complex64])
def test_non_float_features_are_refused(tmp_path, dtype):
    np.save(tmp_path / "image_feat.npy", np.ones((8, 3), dtype))
    with pytest.raises(DataError) as err:
        load_features(tmp_path / "image_feat.npy", field="image features", n_items=8)
    assert err.value.path.endswith("image_feat.npy") and err.value.field == "image features"
    assert "float32 or float16" in err.value.problem and "astype" in err.value.fix


def test_float64_is_converted_with_a_warning(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 3))
    np.save(tmp_path / "image_feat.npy", x)
    with pytest.warns(UserWarning, match="image_feat.npy.*float64.*float32 or float16"):
        out = load_features(tmp_path / "image_feat.npy", field="image features", n_items=8, chunk_rows=3)
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))
    with pytest.warns(UserWarning):
        half = load_features(tmp_path / "image_feat.npy", field="image features", n_items=8, dtype="float16")
    assert half.dtype == np.float16
    x[5, 0] = 1e300                                   # finite in float64, not in float32
    np.save(tmp_path / "image_feat.npy", x)
    with pytest.raises(DataError, match="row 5.*too large"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_features(tmp_path / "image_feat.npy", field="image features", n_items=8)


def test_row_blocks_and_take_rows_read_the_file(tmp_path):
    x = low_rank(n=37, d=5).astype(np.float16)
    np.save(tmp_path / "f.npy", x)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    blocks = [(start, block.copy()) for start, block in iter_row_blocks(mapped, 10)]
    assert [s for s, _ in blocks] == [0, 10, 20, 30]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x)
    ids = np.array([0, 3, 36])
    np.testing.assert_array_equal(take_rows(mapped, ids), x[ids].astype(np.float32))
    np.testing.assert_array_equal(take_rows(x, ids), x[ids].astype(np.float32))


# ---------------------------------------------------------------------- imputation
def test_with_mask_writes_only_a_copy_on_write_map(tiny_dir):
    np.save(tiny_dir / "text_feat.npy", np.arange(32, dtype=np.float16).reshape(8, 4))
    raw = Dataset.load(tiny_dir)
    mask = MissingMask(8, ("image", "text"), {"t": np.array([1, 5])})
    ds = raw.with_mask(mask)
    assert ds.features["image"] is raw.features["image"]               # nothing imputed: the same map
    text = ds.features["text"]
    assert isinstance(text, np.memmap) and text.mode == "c" and text.dtype == np.float16
    keep = np.array([0, 2, 3, 4, 6, 7])
    expected = np.arange(32, dtype=np.float64).reshape(8, 4)[keep].mean(axis=0)
    np.testing.assert_array_equal(text[[1, 5]], np.broadcast_to(expected.astype(np.float16), (2, 4)))
    np.testing.assert_array_equal(text[keep], raw.features["text"][keep])
    np.testing.assert_array_equal(np.load(tiny_dir / "text_feat.npy")[1], [4, 5, 6, 7])   # file untouched


def test_with_mask_after_the_file_was_replaced_copies_the_loaded_data(tiny_dir):
    raw = Dataset.load(tiny_dir)
    before = np.array(raw.features["image"])
    replacement = tiny_dir / "new.npy"
    np.save(replacement, np.zeros((8, 16), np.float32))
    replacement.replace(tiny_dir / "image_feat.npy")                   # e.g. a dataset regenerated in place
    ds = raw.with_mask(MissingMask(8, ("image", "text"), {"v": np.array([2])}))
    assert type(ds.features["image"]) is np.ndarray                    # not a map of the new file
    keep = np.arange(8) != 2
    np.testing.assert_array_equal(ds.features["image"][keep], before[keep])


# ---------------------------------------------------------------------- PCA
def test_pca_recovers_low_rank_structure_deterministically():
    x = low_rank()
    pca = fit_pca(x, 8, sample=1500, seed=3)            # rank 6 + the mean direction fit in 8
    assert pca.components.shape == (200, 8) and pca.d_out == 8 and pca.fit_rows == 1500
    assert pca.explained_variance >= 0.99
    np.testing.assert_allclose(pca.components.T.astype(np.float64) @ pca.components, np.eye(8), atol=1e-5)
    again = fit_pca(x, 8, sample=1500, seed=3)
    np.testing.assert_array_equal(again.components, pca.components)
    assert again.explained_variance == pca.explained_variance
    # The map keeps the rows' geometry: x ≈ (x W) Wᵀ, offset included.
    z = pca.transform(x)
    assert z.shape == (2000, 8) and z.dtype == np.float32
    err = np.linalg.norm(z @ pca.components.T - x) / np.linalg.norm(x)
    assert err < 0.01


def test_pca_fits_only_rows_that_have_the_modality():
    x = low_rank(n=1000)
    present = np.ones(1000, dtype=bool)
    present[::3] = False
    x[~present] = np.random.default_rng(9).normal(scale=100.0, size=(int((~present).sum()), 200))
    pca = fit_pca(x, 8, present=present, sample=10_000, seed=0)
    assert pca.fit_rows == int(present.sum()) and pca.explained_variance >= 0.99
    with pytest.raises(ValueError, match="d_out"):
        fit_pca(x, 200, seed=0)


def test_chunked_reduction_equals_unchunked(tmp_path):
    x = low_rank(n=301, d=64)
    pca = fit_pca(x, 5, seed=0)
    exact = x.astype(np.float64) @ pca.components.astype(np.float64)
    whole = exact.astype(np.float32)
    for rows in (1, 7, 300, 1000):
        np.testing.assert_array_equal(pca.transform(x, chunk_rows=rows), whole)
    np.save(tmp_path / "x.npy", x)                     # a memory map read by blocks gives the same
    np.testing.assert_array_equal(pca.transform(np.load(tmp_path / "x.npy", mmap_mode="r"), chunk_rows=13),
                                  whole)
    half = pca.transform(x, dtype=np.float16)
    np.testing.assert_array_equal(half, exact.astype(np.float16))          # rounded once, from float64


@pytest.fixture
def wide_dir(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    write_inter(folder / "wide.inter", tiny_rows(n_users=30, n_items=40, seed=2))
    np.save(folder / "image_feat.npy", low_rank(n=40, d=24, rank=3))
    np.save(folder / "text_feat.npy", low_rank(n=40, d=4, rank=2, seed=1))
    return folder


@pytest.mark.parametrize("imputation", ["mean", "zero", "nn"])
def test_reducing_commutes_with_imputation(wide_dir, imputation):
    mask = MissingMask.generate(40, ("image", "text"), 0.5, seed=1)
    raw = Dataset.load(wide_dir)
    after = raw.with_mask(mask, imputation=imputation).reduced(6, sample=1000, seed=4)
    before = Dataset.load(wide_dir, mask=mask, imputation=imputation, reduce_dims=6, reduce_seed=4)
    assert set(after.reduction) == set(before.reduction) == {"image"}          # text (4-d) is not wider
    info = before.reduction["image"]
    assert info["d_in"] == 24 and info["d_out"] == 6 and info["explained_variance"] >= 0.99
    assert info["fit_rows"] == int(before.present["image"].sum()) and info["seed"] == 4
    assert before.features["image"].shape == (40, 6) and before.features["image"].dtype == np.float32
    # Linear map: imputing then projecting = projecting then imputing (up to float32 rounding).
    np.testing.assert_allclose(before.features["image"], after.features["image"], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(before.features["text"], after.features["text"])    # imputed, not reduced
    per_modality = raw.reduced({"image": 5}, dtype="float16")
    assert per_modality.features["image"].shape == (40, 5) and per_modality.features["image"].dtype == np.float16
    assert per_modality.features["text"] is raw.features["text"]
    with pytest.raises(ValueError, match="audio"):
        raw.reduced({"audio": 2})


# ---------------------------------------------------------------------- config and synthetic data
def test_data_config_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  feature_dtype: float16\n  reduce_dims: 256\n  reduce_sample: 1000\n")
    cfg = load_config(path).data
    assert (cfg.feature_dtype, cfg.reduce_dims, cfg.reduce_sample, cfg.reduce_seed) == ("float16", 256, 1000, 0)
    assert load_config().data.reduce_dims is None and load_config().data.feature_dtype == "float32"
    path.write_text("data:\n  reduce_dims: many\n")
    with pytest.raises(DataError, match="reduce_dims"):
        load_config(path)
    path.write_text("data:\n  reduce_dims: {image: 0}\n")
    with pytest.raises(DataError, match="reduce_dims"):
        load_config(path)


def test_reduce_dims_as_a_mapping_reduces_the_named_modalities_only(wide_dir):
    from dgmrec_dgl.train import load_dataset

    def loaded(dims):
        return load_dataset(load_config(None, {"data": {"dir": str(wide_dir), "missing_ratio": 0.5,
                                                        "reduce_dims": dims}}))

    one = loaded({"image": 5})
    assert one.features["image"].shape == (40, 5) and one.features["text"].shape == (40, 4)
    assert set(one.reduction) == {"image"}
    every = loaded(3)
    assert every.features["image"].shape == (40, 3) and every.features["text"].shape == (40, 3)
    with pytest.raises(DataError, match=r"data\.reduce_dims: names audio, which .* does not have"):
        loaded({"audio": 2})


def test_synth_writes_float16_features(tmp_path, capsys):
    args = ["data", "synth", "--preset", "toy", "--users", "120", "--items", "80", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "f32")]) == 0
    assert main(args + ["--out", str(tmp_path / "f16"), "--feature-dtype", "float16"]) == 0
    assert "float16 features" in capsys.readouterr().out
    for m in ("image", "text"):
        full = np.load(tmp_path / "f32" / f"{m}_feat.npy")
        half = np.load(tmp_path / "f16" / f"{m}_feat.npy")
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, full.astype(np.float16))
    ds = Dataset.load(tmp_path / "f16")
    assert ds.features["image"].dtype == np.float16
    with pytest.raises(ValueError, match="feature_dtype"):
        synthetic.preset("toy", feature_dtype="float64")
