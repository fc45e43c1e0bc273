"""Tests of the synthetic dataset generator (dgmrec_dgl.data.synthetic)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgmrec_dgl.data import synthetic
from dgmrec_dgl.data.synthetic import PRESETS, SynthConfig, generate, k_core, preset

# Three modalities, a few hundred interactions: fast enough to generate in every test.
TINY = dict(name="tiny", n_users=150, n_items=90, dims={"image": 24, "text": 10, "audio": 6},
            mean_interactions=12.0)


def read_inter(path):
    """``(header, users, items, labels)`` of an ``.inter`` file, rows in file order."""
    with open(path) as handle:
        header = handle.readline().rstrip("\n")
    table = np.loadtxt(path, dtype=np.int64, delimiter="\t", skiprows=1, ndmin=2)
    return header, table[:, 0], table[:, 1], table[:, 2]


def dataset_files(root):
    return sorted(os.listdir(root))


def file_bytes(root):
    out = {}
    for name in dataset_files(root):
        with open(os.path.join(root, name), "rb") as handle:
            out[name] = handle.read()
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "toy"
    summary = generate(root, preset("toy"), progress=False)
    header, users, items, labels = read_inter(summary["paths"]["inter"])
    return {"root": root, "summary": summary, "header": header, "users": users, "items": items,
            "labels": labels, "latents": dict(np.load(summary["paths"]["latents"])),
            "features": {m: np.load(p) for m, p in summary["paths"]["features"].items()}}


# ----------------------------------------------------------------------------------------------------
# Layout and invariants


def test_files_and_summary(toy):
    s = toy["summary"]
    assert dataset_files(toy["root"]) == ["image_feat.npy", "latents.npz", "synthetic.json", "text_feat.npy",
                                          "toy.inter"]
    assert toy["header"] == "userID\titemID\tx_label"
    assert s["n_interactions"] == toy["users"].size == s["n_train"] + s["n_valid"] + s["n_test"]
    assert s["n_users"] == toy["users"].max() + 1 and s["n_items"] == toy["items"].max() + 1
    # Roughly the preset's size (~600 users, ~400 items before filtering).
    assert 500 <= s["n_users"] <= 600 and 300 <= s["n_items"] <= 400
    assert s["seconds"] < 5


def test_ids_contiguous_and_pairs_unique(toy):
    users, items = toy["users"], toy["items"]
    assert users.min() == 0 and items.min() == 0
    assert np.all(np.bincount(users) > 0) and np.all(np.bincount(items) > 0)
    pairs = users * (items.max() + 1) + items
    assert np.unique(pairs).size == pairs.size
    assert np.all(np.diff(users) >= 0)  # rows grouped by user


def test_five_core_holds(toy):
    assert np.bincount(toy["users"]).min() >= 5
    assert np.bincount(toy["items"]).min() >= 5


def test_split_per_user(toy):
    users, labels = toy["users"], toy["labels"]
    assert set(np.unique(labels)) == {0, 1, 2}
    fractions = np.bincount(labels) / labels.size
    assert 0.72 <= fractions[0] <= 0.85 and 0.07 <= fractions[1] <= 0.14 and 0.07 <= fractions[2] <= 0.14
    assert np.all(np.bincount(users[labels == 0], minlength=users.max() + 1) >= 1)  # a train row each
    # Draw order within a user: train rows, then valid, then test; valid and test are round(0.1 n).
    same_user = users[1:] == users[:-1]
    assert np.all(np.diff(labels)[same_user] >= 0)
    count = np.bincount(users)
    expected_eval = np.floor(0.1 * count + 0.5)
    assert np.array_equal(np.bincount(users[labels == 1], minlength=count.size), expected_eval)
    assert np.array_equal(np.bincount(users[labels == 2], minlength=count.size), expected_eval)


def test_features_complete_float32(toy):
    n_items = toy["summary"]["n_items"]
    for modality, dim in PRESETS["toy"].dims.items():
        x = toy["features"][modality]
        assert x.dtype == np.float32 and x.shape == (n_items, dim)
        assert np.isfinite(x).all()
        assert 0.5 < x.std() < 2.0  # unit-variance signal plus noise


def test_latents_consistent(toy):
    cfg, s, lat = PRESETS["toy"], toy["summary"], toy["latents"]
    assert sorted(lat) == ["item_shared", "item_specific_image", "item_specific_text", "user"]
    assert lat["user"].shape == (s["n_users"], cfg.rank_user)
    assert cfg.rank_user == cfg.rank_shared + 2 * cfg.rank_specific
    assert lat["item_shared"].shape == (s["n_items"], cfg.rank_shared)
    for m in cfg.dims:
        assert lat[f"item_specific_{m}"].shape == (s["n_items"], cfg.rank_specific)
    assert all(a.dtype == np.float32 for a in lat.values())


def test_json_documents_the_dataset(toy):
    with open(toy["summary"]["paths"]["config"]) as handle:
        doc = json.load(handle)
    assert SynthConfig(**doc["config"]) == PRESETS["toy"]
    kept = doc["counts"]["kept"]
    for key in ("n_users", "n_items", "n_interactions", "n_train", "n_valid", "n_test"):
        assert kept[key] == toy["summary"][key]
    assert doc["counts"]["drawn"]["n_interactions"] >= kept["n_interactions"]
    assert doc["files"]["features"] == {"image": "image_feat.npy", "text": "text_feat.npy"}


# ----------------------------------------------------------------------------------------------------
# The model: informative, complementary modalities; long-tailed popularity


def heldout_r2(inputs, targets, ridge=1e-3, seed=0):
    """R^2 on a held-out 30% of rows of a ridge regression (with intercept) of targets on inputs."""
    n = len(inputs)
    order = np.random.default_rng(seed).permutation(n)
    train, test = order[: int(0.7 * n)], order[int(0.7 * n):]
    a = np.c_[inputs.astype(np.float64), np.ones(n)]
    y = targets.astype(np.float64)
    gram = a[train].T @ a[train] + ridge * len(train) * np.eye(a.shape[1])
    weights = np.linalg.solve(gram, a[train].T @ y[train])
    residual = y[test] - a[test] @ weights
    return 1.0 - (residual**2).sum() / ((y[test] - y[test].mean(0)) ** 2).sum()


def test_shared_latent_predicts_every_modality(toy):
    shared = toy["latents"]["item_shared"]
    fake = np.random.default_rng(1).standard_normal(shared.shape)
    for modality, x in toy["features"].items():
        r2, baseline = heldout_r2(shared, x), heldout_r2(fake, x)
        assert r2 > 0.2 and r2 > baseline + 0.2, (modality, r2, baseline)


def test_specific_latent_recoverable_from_its_own_modality_only(toy):
    features, latents = toy["features"], toy["latents"]
    for modality in features:
        target = latents[f"item_specific_{modality}"]
        own = heldout_r2(features[modality], target, ridge=0.1)
        for other in set(features) - {modality}:
            cross = heldout_r2(features[other], target, ridge=0.1)
            assert own > 0.5 and own > cross + 0.5, (modality, other, own, cross)


def test_popularity_long_tailed(tmp_path):
    # with few candidates per pick, popularity decides most choices: a long tail
    summary = generate(tmp_path / "pop", preset("toy", candidates_per_pick=4, affinity_scale=2.0), progress=False)
    _, users, items, _ = read_inter(summary["paths"]["inter"])
    degree = np.sort(np.bincount(items))[::-1]
    assert degree[: degree.size // 10].sum() > 0.25 * degree.sum()
    activity = np.bincount(users)
    assert activity.max() > 4 * np.median(activity)  # users' counts long-tailed too


def test_affinity_drives_choices(toy):
    # Users prefer items whose latents align with theirs: chosen pairs score higher than random pairs.
    lat = toy["latents"]
    items_full = np.concatenate([lat["item_shared"], lat["item_specific_image"], lat["item_specific_text"]],
                                axis=1)
    chosen = np.einsum("ij,ij->i", lat["user"][toy["users"]], items_full[toy["items"]]).mean()
    rng = np.random.default_rng(0)
    random_pairs = np.einsum("ij,ij->i", lat["user"][rng.integers(0, len(lat["user"]), 5000)],
                             items_full[rng.integers(0, len(items_full), 5000)]).mean()
    assert chosen > random_pairs + 1.0


# ----------------------------------------------------------------------------------------------------
# Determinism and chunking


def test_same_seed_byte_identical(tmp_path):
    a = generate(tmp_path / "a", SynthConfig(**TINY), progress=False)
    b = generate(tmp_path / "b", SynthConfig(**TINY), progress=False)
    assert a["n_interactions"] == b["n_interactions"]
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_different_seed_differs(tmp_path):
    generate(tmp_path / "a", SynthConfig(**TINY), progress=False)
    generate(tmp_path / "b", SynthConfig(**TINY, seed=1), progress=False)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    for name in ("tiny.inter", "image_feat.npy", "text_feat.npy", "audio_feat.npy", "latents.npz"):
        assert a[name] != b[name], name


def test_chunked_features_identical(tmp_path):
    # Chunks of 7 items (not aligned to the noise blocks) vs one chunk with everything.
    cfg = SynthConfig(**{**TINY, "n_items": 1500, "n_users": 1500, "mean_interactions": 20.0,
                         "pop_exponent": 0.5})
    generate(tmp_path / "small", cfg, progress=False, chunk_items=7)
    generate(tmp_path / "one", cfg, progress=False, chunk_items=10**6)
    assert np.load(tmp_path / "one" / "image_feat.npy").shape[0] > synthetic.NOISE_BLOCK
    assert file_bytes(tmp_path / "small") == file_bytes(tmp_path / "one")


def test_json_config_regenerates_the_dataset(tmp_path):
    first = generate(tmp_path / "a", SynthConfig(**TINY), progress=False)
    with open(first["paths"]["config"]) as handle:
        config = SynthConfig(**json.load(handle)["config"])
    assert config == SynthConfig(**TINY)
    generate(tmp_path / "b", config, progress=False)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_order_of_dims_does_not_matter(tmp_path):
    reordered = {**TINY, "dims": dict(reversed(list(TINY["dims"].items())))}
    generate(tmp_path / "a", SynthConfig(**TINY), progress=False)
    generate(tmp_path / "b", SynthConfig(**reordered), progress=False)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[name] == b[name] for name in a if name != "synthetic.json")


def test_adding_a_modality_keeps_the_others(tmp_path):
    # Streams are keyed by modality name: the same latents give the same image features.
    two = {**TINY, "dims": {"image": 24, "text": 10}}
    a = generate(tmp_path / "a", SynthConfig(**two), progress=False, chunk_items=32)
    lat = np.load(a["paths"]["latents"])
    fmap = synthetic._FeatureMap(SynthConfig(**TINY), "image")
    rebuilt = fmap.rows(lat["item_shared"], lat["item_specific_image"], 0)
    assert np.array_equal(rebuilt, np.load(a["paths"]["features"]["image"]))


def test_three_modalities(tmp_path):
    s = generate(tmp_path / "t", SynthConfig(**TINY), progress=False)
    lat = np.load(s["paths"]["latents"])
    assert lat["user"].shape[1] == 16 + 3 * 8
    for m, dim in TINY["dims"].items():
        assert np.load(s["paths"]["features"][m]).shape == (s["n_items"], dim)
        assert lat[f"item_specific_{m}"].shape == (s["n_items"], 8)


# ----------------------------------------------------------------------------------------------------
# Writing into place


def test_crash_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_write_features", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "out", SynthConfig(**TINY), progress=False)
    assert os.listdir(tmp_path) == []


def test_replaces_a_synthetic_dataset_but_not_other_folders(tmp_path):
    out = tmp_path / "out"
    generate(out, SynthConfig(**TINY), progress=False)
    s = generate(out, SynthConfig(**{**TINY, "name": "again", "dims": {"text": 5}}), progress=False)
    assert dataset_files(out) == ["again.inter", "latents.npz", "synthetic.json", "text_feat.npy"]
    assert os.listdir(tmp_path) == ["out"]
    assert s["paths"]["inter"] == str(out / "again.inter")

    (tmp_path / "empty").mkdir()
    generate(tmp_path / "empty", SynthConfig(**TINY), progress=False)

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        generate(other, SynthConfig(**TINY), progress=False)
    assert dataset_files(other) == ["notes.txt"]


def test_progress_bars_run(tmp_path):
    summary = generate(tmp_path / "p", SynthConfig(**TINY), progress=True)
    assert os.path.isfile(summary["paths"]["inter"])


# ----------------------------------------------------------------------------------------------------
# Configuration


def test_preset_lookup_and_overrides():
    cfg = preset("baby", seed=3, n_users=100)
    assert cfg.seed == 3 and cfg.n_users == 100 and cfg.dims == {"image": 4096, "text": 384}
    assert PRESETS["baby"].seed == 0
    cfg.dims["audio"] = 1
    assert "audio" not in PRESETS["baby"].dims  # presets are copied, never shared
    assert PRESETS["tiktok"].dims == {"image": 128, "text": 768, "audio": 128}
    assert PRESETS["large"].n_items == 1_000_000 and PRESETS["large"].dims == {"image": 384, "text": 384}
    with pytest.raises(ValueError, match="known presets: toy, demo, baby, sports, clothing, tiktok, large"):
        preset("movielens")
    with pytest.raises(ValueError, match="unknown SynthConfig field"):
        preset("toy", users=3)


@pytest.mark.parametrize("bad", [
    {"n_users": 0}, {"dims": {}}, {"dims": {"Image": 3}}, {"dims": {"text": 0}}, {"noise": -1.0},
    {"name": "../x"}, {"mean_interactions": 2.0}, {"seed": -1}, {"pop_exponent": float("nan")},
])
def test_invalid_config(bad):
    with pytest.raises(ValueError, match="SynthConfig"):
        SynthConfig(**{**TINY, **bad})


def test_filtering_everything_is_an_error(tmp_path):
    cfg = SynthConfig(name="void", n_users=3, n_items=1000, dims={"text": 2}, mean_interactions=5.0)
    with pytest.raises(ValueError, match="removed every interaction"):
        generate(tmp_path / "void", cfg, progress=False)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------
# Helpers


def naive_k_core(users, items, core):
    alive = set(range(len(users)))
    while True:
        deg_u, deg_i = {}, {}
        for r in alive:
            deg_u[users[r]] = deg_u.get(users[r], 0) + 1
            deg_i[items[r]] = deg_i.get(items[r], 0) + 1
        drop = {r for r in alive if deg_u[users[r]] < core or deg_i[items[r]] < core}
        if not drop:
            return alive
        alive -= drop


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=150), st.integers(1, 4))
def test_k_core_matches_naive(pairs, core):
    users = np.array([p[0] for p in pairs], dtype=np.int64)
    items = np.array([p[1] for p in pairs], dtype=np.int64)
    keep = k_core(users, items, core)
    assert keep.dtype == bool and keep.shape == users.shape
    assert set(np.flatnonzero(keep).tolist()) == naive_k_core(users.tolist(), items.tolist(), core)


def test_tsv_lines_formats_like_python():
    rng = np.random.default_rng(0)
    a = np.r_[0, 9, 10, 99, 100, 999_999, 1_000_000, rng.integers(0, 10**9, 500)]
    b = rng.integers(0, 3, a.size).astype(np.int8)
    expected = "".join(f"{x}\t{y}\n" for x, y in zip(a.tolist(), b.tolist())).encode()
    assert synthetic._tsv_lines([a, b]) == expected


def test_popularity_ranks_follow_zipf():
    u = np.random.default_rng(0).random(400_000)
    ranks = synthetic._draw_ranks(u, 1000, 1.0)
    assert ranks.min() == 0 and ranks.max() == 999
    counts = np.bincount(ranks, minlength=1000)
    # P(rank j) ~ 1/(j+1.5): rank 9 about 10x rarer than rank 0, rank 99 about 10x rarer than rank 9.
    assert 6 < counts[0] / counts[9] < 9 and 8 < counts[9] / counts[99] < 11
    flat = np.bincount(synthetic._draw_ranks(u, 1000, 0.0), minlength=1000)
    assert flat.min() > 300 and flat.max() < 500


# ----------------------------------------------------------------------------------------------------
# Scale


@pytest.mark.slow
def test_one_million_items_streams_under_memory_budget(tmp_path):
    """1,000,000 items x 384-dim text features, 10,000 users (~20M interactions), peak RSS < 2.5 GB."""
    script = textwrap.dedent(f"""
        import json, resource, sys
        from dgmrec_dgl.data.synthetic import generate, preset
        cfg = preset("large", dims={{"text": 384}}, n_users=10_000, mean_interactions=2000)
        summary = generate({str(tmp_path / "large")!r}, cfg, progress=False)
        summary["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(summary))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"1M items x 384: {summary['seconds']:.1f} s, peak RSS {summary['peak_rss_gb']:.2f} GB, "
          f"{summary['n_users']} users, {summary['n_items']} items, {summary['n_interactions']} interactions")
    assert summary["peak_rss_gb"] < 2.5
    assert summary["n_items"] > 900_000
    text = np.load(summary["paths"]["features"]["text"], mmap_mode="r")
    assert text.shape == (summary["n_items"], 384) and text.dtype == np.float32
    assert np.isfinite(text[-1000:]).all() and np.isfinite(text[:1000]).all()
    users = np.loadtxt(summary["paths"]["inter"], dtype=np.int64, delimiter="\t", skiprows=1,
                       max_rows=100_000, usecols=0)
    assert users.min() == 0
