"""The new-items setting: the release's draw and shipped splits, its test set, negatives, DGMRec before validation."""

import numpy as np
import pytest
import torch

from conftest import shared_split, write_inter
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.new_items import (choose_new_items, infer_new_items, negative_candidates, new_items_setting,
                                       new_items_split, restrict_to_new_items, shipped_new_items)
from dgmrec_dgl.errors import DataError


# ---------------------------------------------------------------------- which items are new
@pytest.mark.parametrize("protocol", ["release", "test_new_only"])
def test_choice_is_stratified_over_cold_and_warm_items(protocol):
    counts = np.arange(1000)          # item i has i train interactions: cold = 0..699, warm = 700..999
    new = choose_new_items(counts, fraction=0.2, cold_share=0.7, seed=1111, protocol=protocol)
    assert len(new) == 200 and len(np.unique(new)) == 200
    assert (new < 700).sum() == 140 and (new >= 700).sum() == 60
    np.testing.assert_array_equal(new, choose_new_items(counts, seed=1111, protocol=protocol))
    assert not np.array_equal(new, choose_new_items(counts, seed=1, protocol=protocol))


def test_release_draw_is_the_preprocessing_scripts():
    """Distinct counts (so the order is unambiguous): cold = the first floor(0.7 · 1005) = 703 items (rounding
    would give 704), floor(0.2 · 703) = 140 of them drawn, then floor(0.2 · 302) = 60 warm ones, by one
    RandomState(1111), cold group first."""
    counts = np.arange(1005)[::-1].copy()             # item 1004 is the least interacted
    order = np.arange(1005)[::-1]
    draw = np.random.RandomState(1111)
    expected = np.sort(np.concatenate([draw.choice(order[:703], 140, replace=False),
                                       draw.choice(order[703:], 60, replace=False)]))
    np.testing.assert_array_equal(choose_new_items(counts), expected)
    assert len(choose_new_items(np.arange(1001), protocol="test_new_only")) == 200   # round(140.14) + round(60.2)


def _tiktok_counts():
    full = Dataset.load(shared_split("tiktok"), inter="tiktok.inter")
    shipped = Dataset.load(shared_split("tiktok"), inter="tiktok_del.inter")
    return full, shipped


def test_release_draw_reproduces_the_shipped_tiktok_split():
    """The release's draw (numpy's classic quicksort tie order, RandomState(1111)) gives the shipped split's new
    items exactly: 1,242 items with train rows (the draw's other 99 items have no train row in the full file,
    so the shipped file cannot show them). The draw before issue 19 (stable ties, rounded sizes, default_rng)
    shares 271 of them: 984 of its 1,255 items with train rows are not new in the shipped split."""
    full, shipped = _tiktok_counts()
    truth = shipped_new_items(full, shipped.train, "tiktok_del.inter")
    assert len(truth) == 1242
    counts = full.item_train_counts()
    drawn = choose_new_items(counts)
    assert len(drawn) == int(0.2 * 4697) + int(0.2 * 2013) == 1341
    np.testing.assert_array_equal(drawn[counts[drawn] > 0], truth)                  # 0 items differ
    before = choose_new_items(counts, protocol="test_new_only")
    before = before[counts[before] > 0]
    assert len(before) == 1255 and len(np.intersect1d(before, truth)) == 271


# ---------------------------------------------------------------------- the release's split, constructed
def _files(folder, *, del_train_extra=()):
    """Full file and shipped ``_del`` file of 4 users and 6 items; items 4 and 5 are new.

    Users: 0 trains on 0, 1, 4 (valid 2, test 3); 1 on 2, 5 (valid 4 — a new item's valid row —, test 0);
    2 trains on 4, 5 only (so no train row is left: valid 1 and test 2 are dropped); 3 on 1, 3 (test 5).
    """
    folder.mkdir(parents=True, exist_ok=True)
    train = [(0, 0), (0, 1), (0, 4), (1, 2), (1, 5), (2, 4), (2, 5), (3, 1), (3, 3)]
    rest = [(0, 2, 1), (0, 3, 2), (1, 4, 1), (1, 0, 2), (2, 1, 1), (2, 2, 2), (3, 5, 2)]
    write_inter(folder / "toy.inter", [(u, i, 0) for u, i in train] + rest)
    kept = [(u, i, 0) for u, i in train if i not in (4, 5)] + [(u, i, 0) for u, i in del_train_extra]
    write_inter(folder / "toy_del.inter", kept + rest)
    return folder


def _pairs(a):
    return sorted(map(tuple, np.asarray(a).tolist()))


def test_release_split_of_a_shipped_pair_on_a_constructed_example(tmp_path):
    folder = _files(tmp_path / "toy")
    full = Dataset.load(folder, inter="toy.inter")
    ds = new_items_setting(full, shipped=str(folder / "toy_del.inter"))
    np.testing.assert_array_equal(ds.new_items, [4, 5])
    assert ds.new_items_protocol == "release"
    assert _pairs(ds.train) == [(0, 0), (0, 1), (1, 2), (3, 1), (3, 3)]
    assert _pairs(ds.valid) == [(0, 2), (1, 4)]                  # new items keep valid rows; user 2 dropped
    # every test row + the removed train rows, users without train rows (2) dropped
    assert _pairs(ds.test) == [(0, 3), (0, 4), (1, 0), (1, 5), (3, 5)]
    # the previous protocol tests on the new items' rows only
    before = restrict_to_new_items(full, np.array([4, 5]), protocol="test_new_only")
    assert _pairs(before.test) == [(0, 4), (1, 5), (3, 5)]


def test_a_shipped_file_that_does_not_match_its_full_file_is_refused(tmp_path):
    folder = _files(tmp_path / "toy", del_train_extra=[(3, 0)])   # a train row the full file lacks
    full = Dataset.load(folder, inter="toy.inter")
    with pytest.raises(DataError, match="toy_del.inter: train rows: are not the train rows of the full file"):
        new_items_setting(full, shipped=str(folder / "toy_del.inter"))


def test_a_shipped_file_alone_infers_the_new_items_with_a_warning(tmp_path):
    folder = _files(tmp_path / "toy")
    (folder / "toy.inter").unlink()
    alone = Dataset.load(folder, inter="toy_del.inter")
    with pytest.warns(UserWarning, match="lacks their removed train rows"):
        ds = new_items_setting(alone)
    np.testing.assert_array_equal(ds.new_items, [4, 5])
    np.testing.assert_array_equal(infer_new_items(alone), [4, 5])
    assert _pairs(ds.test) == [(0, 3), (1, 0), (3, 5)]


def test_shipped_tiktok_split_through_the_loader(tmp_path):
    """``data.inter: tiktok_del.inter`` + ``data.new_items`` reads the full file beside it: train = the shipped
    train rows, valid as shipped, test = every test row + the new items' removed train rows."""
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.fingerprint import data_files
    from dgmrec_dgl.train import load_dataset

    full, shipped = _tiktok_counts()
    folder = tmp_path / "tiktok"
    folder.mkdir()
    for name in ("tiktok.inter", "tiktok_del.inter"):
        (folder / name).write_bytes((shared_split("tiktok") / name).read_bytes())
    np.save(folder / "text_feat.npy", np.random.default_rng(0).normal(size=(full.n_items, 4)).astype(np.float32))
    config = load_config(None, {"data": {"dir": str(folder), "inter": "tiktok_del.inter", "new_items": True}})
    ds = load_dataset(config, prepare_features=False)
    assert str(folder / "tiktok.inter") in data_files(config)
    new = ds.new_items
    assert len(new) == 1242 and ds.item_train_counts()[new].sum() == 0
    assert _pairs(ds.train) == _pairs(shipped.train)
    has_train = np.isin(shipped.valid[:, 0], ds.train[:, 0])
    assert _pairs(ds.valid) == _pairs(shipped.valid[has_train])
    removed = full.train[np.isin(full.train[:, 1], new)]
    expected = np.concatenate([full.test, removed])
    assert _pairs(ds.test) == _pairs(expected[np.isin(expected[:, 0], ds.train[:, 0])])
    assert len(ds.test) > len(shipped.test)
    # the same file without --new-items trains as plain interactions, with a warning
    plain = load_config(None, {"data": {"dir": str(folder), "inter": "tiktok_del.inter"}})
    with pytest.warns(UserWarning, match="tiktok_del.inter is a new-items split"):
        assert load_dataset(plain, prepare_features=False).new_items is None


def test_previous_protocol_on_real_baby_interactions():
    full = Dataset.load(shared_split("baby"), inter="baby.inter")
    ds = new_items_split(full, protocol="test_new_only")
    new = ds.new_items
    assert abs(len(new) - 0.2 * full.n_items) <= 1
    assert not np.isin(ds.train[:, 1], new).any()                # no train row of a new item
    assert np.isin(ds.test[:, 1], new).all()                     # test restricted to new items
    removed = full.train[np.isin(full.train[:, 1], new)]
    test_pairs = {tuple(p) for p in ds.test}
    has_train = np.isin(removed[:, 0], ds.train[:, 0])
    assert all(tuple(p) in test_pairs for p in removed[has_train])  # reference loader adds them to test
    assert negative_candidates(ds) is None
    release = new_items_split(full)
    kept = full.test[np.isin(full.test[:, 0], release.train[:, 0])]
    assert len(release.test) > len(ds.test) and set(map(tuple, kept.tolist())) <= set(map(tuple, release.test.tolist()))


def test_release_imputation_mean_leaves_the_new_items_out():
    from dgmrec_dgl.data.masks import MissingMask

    x = np.array([[1.0], [3.0], [100.0], [7.0]], dtype=np.float32)       # item 2 is new, item 3 misses it
    arr = lambda p: np.array(p, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    ds = Dataset("t", "", 2, 4, arr([(0, 0), (1, 1), (0, 2)]), arr([]), arr([(1, 3)]), modalities=("text",),
                 features={"text": x}, present={"text": np.ones(4, bool)})
    mask = MissingMask(4, ("text",), {"all": [3]})
    assert ds.with_mask(mask).features["text"][3, 0] == pytest.approx(104 / 3)
    for protocol, mean in (("release", 2.0), ("test_new_only", 104 / 3)):
        split = restrict_to_new_items(ds, np.array([2]), protocol=protocol)
        assert split.with_mask(mask).features["text"][3, 0] == pytest.approx(mean), protocol


# ---------------------------------------------------------------------- negatives, in every execution mode
def _config(data_dir, model, **model_keys):
    from dgmrec_dgl.config import load_config

    return load_config(f"configs/{model}/base.yaml", {
        "data": {"dir": str(data_dir), "missing_ratio": 2 / 3, "new_items": True},
        "train": {"epochs": 1, "eval_every": 5, "batch_size": 512, "seed": 7, "threads": 1},
        "model": {**({"knn_k": 5} if model == "dgmrec" else {}), **model_keys}})


@pytest.mark.parametrize("model,execution", [("mfbpr", "full"), ("mfbpr", "sampled"), ("lightgcn", "full"),
                                             ("lightgcn", "sampled"), ("dgmrec", "full"), ("dgmrec", "blocks"),
                                             ("dgmrec", "sampled"), ("ci2mg", "full")])
def test_no_negative_is_ever_a_new_item(sparse_dir, tmp_path, monkeypatch, model, execution):
    """Every batch the trainer steps on, in every execution mode, draws its negatives among the old items."""
    import dgmrec_dgl.train as trainer
    from dgmrec_dgl.train import load_dataset

    config = _config(sparse_dir, model, execution=execution)
    new = load_dataset(config, prepare_features=False).new_items
    seen, step = [], trainer.training_step

    def spy(model_, g, batch, *args, **kwargs):
        seen.append(batch.neg.clone())
        return step(model_, g, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "training_step", spy)
    trainer.train(config, str(tmp_path / "run"), progress=False)
    negatives = torch.cat(seen).numpy()
    assert len(negatives) == len(load_dataset(config, prepare_features=False).train)
    assert not np.isin(negatives, new).any()
    # without the release protocol the same draw does hit new items (the check above can fail)
    config.data.new_items_protocol = "test_new_only"
    ds = load_dataset(config, prepare_features=False)
    assert np.isin(trainer.epoch_triples(ds, 7, 0)[2].numpy(), ds.new_items).any()


# ---------------------------------------------------------------------- DGMRec: graphs and generation before validation
@pytest.fixture(scope="module")
def new_items_model(sparse_dir):
    from dgmrec_dgl.models import build_model
    from dgmrec_dgl.train import load_dataset

    config = _config(sparse_dir, "dgmrec")
    ds = load_dataset(config)
    model = build_model(config, ds)
    return config, ds, model, model.make_graph(ds)


def test_training_graphs_mask_the_new_items_and_scores_use_the_inference_graphs(new_items_model):
    from dgmrec_dgl.graphs.hetero import knn_etype

    config, ds, model, g = new_items_model
    is_new = np.zeros(ds.n_items, bool)
    is_new[ds.new_items] = True
    for m in ds.modalities:
        train, infer = model.knn[m], model.inference_knn[m]
        degree = np.diff(train.indptr)
        rows = np.repeat(np.arange(ds.n_items), degree)
        assert (degree[is_new] == 1).all() and (train.indices[np.repeat(is_new, degree)] == ds.new_items.repeat(1)).all()
        assert not is_new[train.indices[~is_new[rows]]].any()                 # no old row reaches a new item
        missing_old = ~ds.present[m] & ~is_new
        assert (degree[missing_old] > 1).all()           # as the release: missing items unmasked in training
        infer_degree = np.diff(infer.indptr)
        assert (infer_degree[~ds.present[m]] == 1).all() and (infer_degree[ds.present[m]] > 1).all()
        scoring = model.scoring_graph(g)
        assert scoring.num_edges(knn_etype(m)) == infer.nnz and g.num_edges(knn_etype(m)) == train.nnz
    assert all(len(t) for t in model.new_item_targets.values())
    assert all(not is_new[r].any() for r in model.refine_rows.values())
    assert all(is_new[r].all() and len(r) for r in model.inference_refine_rows.values())


def test_new_items_get_generated_features_before_validation(new_items_model):
    config, ds, model, g = new_items_model
    model = __import__("copy").deepcopy(model)
    before = {m: model.raw[m].detach().clone() for m in model.modalities}
    targets = model.new_item_targets
    gen = torch.Generator().manual_seed(3)
    expected = model.generated_features(model.scoring_graph(g), targets, torch.Generator().manual_seed(3))
    graphs = dict(model.inference_knn)
    log = model.before_validation(0, g, gen)              # epoch 1 of refresh_every 5: no refresh
    assert log["generated_new_rows"] == {m: len(t) for m, t in targets.items()}
    for m in model.modalities:
        changed = (model.raw[m].detach() != before[m]).any(1).numpy()
        np.testing.assert_array_equal(np.flatnonzero(changed), np.sort(targets[m].numpy()))
        torch.testing.assert_close(model.raw[m].detach()[targets[m]], expected[m])
        assert model.inference_knn[m] is graphs[m]
    # after epoch index 4 (the release's counter 5): the new items' rows of the inference graphs are refined
    log = model.before_validation(4, g, gen)
    for m in model.modalities:
        old, new = graphs[m].to_scipy(), model.inference_knn[m].to_scipy()
        differs = np.flatnonzero(abs(old - new).sum(axis=1).A1 > 0)
        assert len(differs) and np.isin(differs, model.inference_refine_rows[m]).all()
    assert log["refined_new_rows"] == {m: len(r) for m, r in model.inference_refine_rows.items()}
    # the inference graphs travel with the checkpoint
    twin = __import__("copy").deepcopy(new_items_model[2])
    twin.load_graph_state(model.graph_state(), g)
    for m in model.modalities:
        assert abs(twin.inference_knn[m].to_scipy() - model.inference_knn[m].to_scipy()).sum() == 0


def test_previous_protocol_has_no_inference_graphs(sparse_dir):
    from dgmrec_dgl.models import build_model
    from dgmrec_dgl.train import load_dataset

    config = _config(sparse_dir, "dgmrec")
    config.data.new_items_protocol = "test_new_only"
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    before = {m: model.raw[m].detach().clone() for m in model.modalities}
    assert model.inference_knn == {} and model.before_validation(4, g, torch.Generator()) == {}
    assert all(torch.equal(model.raw[m], before[m]) for m in model.modalities)
    assert model.scoring_graph(g) is g


def test_the_trainer_generates_before_each_validation(sparse_dir, tmp_path):
    import json

    from dgmrec_dgl.train import train

    config = _config(sparse_dir, "dgmrec")
    config.train.epochs, config.train.eval_every = 2, 1
    train(config, str(tmp_path / "run"), progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(sum(r["before_validation"]["generated_new_rows"].values()) > 0 and "valid" in r for r in log)


def test_cli_runs_the_release_protocol_on_a_shipped_split(tmp_path, capsys):
    """``train --config configs/dgmrec/tiktok.yaml --data DIR --inter tiktok_del.inter --new-items`` (the
    issue's acceptance command) on a small TikTok-shaped folder: the full and ``_del`` files, three modalities,
    the config's ``missing_items_0.6.npz``."""
    import json

    from conftest import CONFIGS, run_cli
    from dgmrec_dgl.data import synthetic
    from dgmrec_dgl.data.masks import MissingMask

    data = tmp_path / "tiktok"
    shape = synthetic.preset("toy", n_users=300, n_items=300, core=3, dims={"image": 16, "text": 24, "audio": 8},
                             seed=5)
    synthetic.generate(data, __import__("dataclasses").replace(shape, name="tiktok"), progress=False)
    full = Dataset.load(data, inter="tiktok.inter")
    new = choose_new_items(full.item_train_counts(), seed=4)
    lines = (data / "tiktok.inter").read_text().splitlines()
    kept = [line for line in lines[1:] if not (line.endswith("\t0") and int(line.split("\t")[1]) in set(new))]
    (data / "tiktok_del.inter").write_text("\n".join(lines[:1] + kept) + "\n")
    MissingMask.generate(full.n_items, ("image", "text", "audio"), 0.6, 2024).save(data / "missing_items_0.6.npz")
    run = tmp_path / "run"
    code, err = run_cli(capsys, ["train", "--config", CONFIGS / "dgmrec" / "tiktok.yaml", "--data", data,
                                 "--inter", "tiktok_del.inter", "--new-items", "--epochs", 3, "--out", run, "--quiet"])
    assert code == 0, err
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum(log[-1]["before_validation"]["generated_new_rows"].values()) > 0
    metrics = json.loads((run / "metrics.json").read_text())
    ds = new_items_setting(full, shipped=str(data / "tiktok_del.inter"))
    np.testing.assert_array_equal(ds.new_items, new[full.item_train_counts()[new] > 0])
    assert metrics["test"]["n_users"] == len(np.unique(ds.test[:, 0]))


def test_a_resumed_new_items_run_equals_the_uninterrupted_one(sparse_dir, tmp_path):
    """The inference graphs (refined before the validation of epoch 1, refresh_every 2) and the generated rows
    travel with ``last.pt``: killed after one epoch and resumed, the run ends where the uninterrupted one does."""
    import json

    from dgmrec_dgl.train import train

    config = _config(sparse_dir, "dgmrec", refresh_every=2)
    config.train.epochs, config.train.eval_every = 3, 1
    whole = train(config, str(tmp_path / "whole"), progress=False)
    train(config, str(tmp_path / "part"), progress=False, max_epochs=2)
    part = train(config, str(tmp_path / "part"), progress=False, resume=True)
    assert part["valid"] == whole["valid"] and part["test"] == whole["test"]
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert "refined_new_rows" in log[1]["before_validation"]


def test_negatives_switch_draws_among_train_items_in_every_setting():
    """train.negatives: train_items (the release's sampler) never draws an item without train rows; the
    default draws among every item and does hit them on the full TikTok file (465 items have none)."""
    import dgmrec_dgl.train as trainer
    from dgmrec_dgl.config import load_config

    ds = Dataset.load(shared_split("tiktok"), inter="tiktok.inter")
    untrained = np.flatnonzero(ds.item_train_counts() == 0)
    assert len(untrained) == 465
    assert negative_candidates(ds) is None
    np.testing.assert_array_equal(negative_candidates(ds, "train_items"), np.flatnonzero(ds.item_train_counts() > 0))
    assert np.isin(trainer.epoch_triples(ds, 7, 0)[2].numpy(), untrained).any()
    assert not np.isin(trainer.epoch_triples(ds, 7, 0, "train_items")[2].numpy(), untrained).any()
    # the switch follows model.fidelity unless given
    assert trainer.train_switch(load_config(None, {"model": {"fidelity": "release"}}), "negatives") == "train_items"
    assert trainer.train_switch(load_config(None, {}), "negatives") == "all"
    assert trainer.train_switch(load_config(None, {"model": {"fidelity": "release"}, "train": {"negatives": "all"}}),
                                "negatives") == "all"
