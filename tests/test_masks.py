"""Missing-modality masks: loading the study's files, generation protocol, nesting across ratios."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import shared_split
from dgmrec_dgl.data.masks import MissingMask, combinations, ratio_label
from dgmrec_dgl.errors import DataError

MODALITY_SETS = [("image", "text"), ("image", "text", "audio"), ("text",)]


def test_combination_keys_follow_the_reference():
    assert combinations(("image", "text")) == ["t", "v", "all"]
    assert combinations(("image", "text", "audio")) == ["t", "v", "a", "tv", "ta", "va", "all"]


def test_ratio_labels_match_the_study_file_names():
    assert ratio_label(2 / 3) == "0.666"
    assert ratio_label(0.6) == "0.6"
    assert ratio_label(0.75) == "0.75"


def test_tiktok_shipped_mask_counts():
    mask = MissingMask.load(shared_split("tiktok", "missing_items_0.6.npz"), 6710)
    assert mask.modalities == ("image", "text", "audio")
    assert mask.counts() == {"t": 445, "v": 447, "a": 448, "tv": 447, "ta": 446, "va": 448, "all": 1343}
    # text is missing for t ∪ tv ∪ ta ∪ all
    assert mask.missing("text").sum() == 445 + 447 + 446 + 1343


def test_npz_and_pickled_npy_twins_agree():
    npz = MissingMask.load(shared_split("baby", "missing_items_0.666.npz"), 7050)
    with pytest.warns(UserWarning, match="unpickling"):
        npy = MissingMask.load(shared_split("baby", "missing_items_0.666.npy"), 7050, allow_pickle=True)
    assert npz.counts() == npy.counts() == {"t": 1174, "v": 1176, "all": 2350}
    for key in npz.groups:
        np.testing.assert_array_equal(npz.groups[key], npy.groups[key])


def test_save_load_round_trip(tmp_path):
    mask = MissingMask.generate(500, ("image", "text", "audio"), 0.6, seed=3)
    mask.save(tmp_path / "m.npz")
    again = MissingMask.load(tmp_path / "m.npz", 500)
    assert again.counts() == mask.counts()
    assert list(tmp_path.iterdir()) == [tmp_path / "m.npz"]  # no temporary file left


def test_key_naming_every_modality_is_read_as_all(tmp_path):
    np.savez(tmp_path / "m.npz", t=np.array([0]), vt=np.array([1, 2]))
    mask = MissingMask.load(tmp_path / "m.npz", 5, ("image", "text"))
    assert mask.counts() == {"t": 1, "v": 0, "all": 2}


def test_mask_for_a_modality_the_dataset_lacks(tmp_path):
    np.savez(tmp_path / "m.npz", a=np.array([0]))
    with pytest.raises(DataError, match="audio"):
        MissingMask.load(tmp_path / "m.npz", 5, ("image", "text"))


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(10, 3000), mods=st.sampled_from(MODALITY_SETS),
       ratio=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_generated_counts_are_within_one_of_an_even_split(n_items, mods, ratio, seed):
    mask = MissingMask.generate(n_items, mods, ratio, seed)
    n_mod = len(mods)
    n_missing = round(ratio * n_items)
    assert mask.any_missing().sum() == n_missing
    counts = mask.counts()
    for key, count in counts.items():
        level = n_mod if key == "all" else len(key)
        n_combos = len([k for k in counts if (n_mod if k == "all" else len(k)) == level])
        assert abs(count - n_missing / n_mod / n_combos) <= 1.0, (key, count, counts)
    # keys are disjoint
    assert sum(counts.values()) == n_missing


@settings(max_examples=25, deadline=None)
@given(n_items=st.integers(10, 2000), mods=st.sampled_from(MODALITY_SETS), seed=st.integers(0, 2**31),
       ratios=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5))
def test_generated_masks_are_nested_across_ratios(n_items, mods, seed, ratios):
    ratios = sorted(ratios)
    masks = [MissingMask.generate(n_items, mods, r, seed) for r in ratios]
    for low, high in zip(masks, masks[1:]):
        for modality in mods:
            # an item missing a modality at a lower ratio still misses it at a higher one
            assert not (low.missing(modality) & ~high.missing(modality)).any()


def test_two_thirds_for_two_modalities_matches_the_reference_shares():
    mask = MissingMask.generate(7050, ("image", "text"), 2 / 3, seed=1)
    counts = mask.counts()
    assert counts == {"t": 1175, "v": 1175, "all": 2350}


def test_different_seeds_give_different_masks():
    a = MissingMask.generate(1000, ("image", "text"), 0.5, seed=1)
    b = MissingMask.generate(1000, ("image", "text"), 0.5, seed=2)
    assert not np.array_equal(a.groups["all"], b.groups["all"])


def test_generation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ratio"):
        MissingMask.generate(10, ("image",), 1.5, seed=0)
    with pytest.raises(ValueError, match="1 to 3"):
        MissingMask.generate(10, ("smell",), 0.5, seed=0)


# ---------------------------------------------------------------------- the configs name the shipped masks
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
SHIPPED = {"baby": "missing_items_0.666.npz", "sports": "missing_items_0.666.npz",
           "clothing": "missing_items_0.666.npz", "tiktok": "missing_items_0.6.npz"}


@pytest.mark.parametrize("model", ["dgmrec", "ci2mg", "lightgcn", "mfbpr"])
@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_dataset_configs_train_on_the_shipped_masks(model, dataset, monkeypatch):
    """``train --config configs/<model>/<dataset>.yaml`` reads the study's stratified mask from its data folder."""
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.data.dataset import Dataset
    from dgmrec_dgl.fingerprint import data_files, resolve_data_paths

    expected = shared_split(dataset, SHIPPED[dataset])
    monkeypatch.chdir(REPO)                 # the configs' data.dir is relative to the repository
    config = load_config(REPO / "configs" / model / f"{dataset}.yaml")
    assert config.data.missing_ratio is None
    resolve_data_paths(config)
    assert config.data.mask == str(expected)
    assert str(expected) in data_files(config)                      # fingerprinted with the run
    n_items = Dataset.load(config.data.dir, inter=config.data.inter).n_items
    mask = MissingMask.load(config.data.mask, n_items)              # the .npz loads without pickle
    assert mask.any_missing().mean() == pytest.approx(0.6 if dataset == "tiktok" else 2 / 3, abs=0.01)


def test_a_bare_mask_name_follows_the_data_folder(tiny_dir, tmp_path, monkeypatch, capsys):
    """``data.mask: <file name>`` is read inside ``data.dir`` (so ``--data DIR`` takes DIR's mask); the CLI's
    ``--missing-ratio`` replaces it with a generated mask; a name missing from the folder is one error line."""
    from conftest import CONFIGS, assert_rejected, run_cli
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.train import load_dataset

    shipped = MissingMask(8, ("image", "text"), {"t": [1], "v": [2], "all": [3, 4]})
    shipped.save(tiny_dir / "missing_items_0.5.npz")
    monkeypatch.chdir(tmp_path)                                      # not the data folder
    config = load_config(None, {"data": {"dir": str(tiny_dir), "mask": "missing_items_0.5.npz"}})
    ds = load_dataset(config)
    assert {k: v.tolist() for k, v in ds.mask.groups.items()} == {"t": [1], "v": [2], "all": [3, 4]}

    yaml = tmp_path / "lightgcn.yaml"
    yaml.write_text(f"extends: {CONFIGS / 'lightgcn' / 'base.yaml'}\ndata: {{mask: missing_items_0.5.npz}}\n"
                    "train: {eval_every: 1}\n")
    train = ["train", "--config", yaml, "--data", tiny_dir, "--quiet", "--epochs", 1]
    assert run_cli(capsys, train + ["--out", tmp_path / "a"])[0] == 0
    recorded = load_config(tmp_path / "a" / "config.yaml").data
    assert recorded.mask == str(tiny_dir / "missing_items_0.5.npz") and recorded.missing_ratio is None
    assert run_cli(capsys, train + ["--out", tmp_path / "b", "--missing-ratio", "0.25"])[0] == 0
    recorded = load_config(tmp_path / "b" / "config.yaml").data
    assert recorded.mask is None and recorded.missing_ratio == 0.25

    (tiny_dir / "missing_items_0.5.npz").unlink()
    code, lines = run_cli(capsys, train + ["--out", tmp_path / "c"])
    assert_rejected(code, lines, "missing_items_0.5.npz", "data.mask", "--missing-ratio")
