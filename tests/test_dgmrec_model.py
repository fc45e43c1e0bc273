"""DGMRec end to end on a tiny synthetic dataset: shapes, gradients, generation, refinement, resume."""

import json

import numpy as np
import pytest
import torch

from dgmrec_dgl.config import load_config
from dgmrec_dgl.data import synthetic
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.models import build_model
from dgmrec_dgl.train import load_dataset, train


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "toy"
    synthetic.generate(out, synthetic.preset("toy", n_users=300, n_items=200, seed=3), progress=False)
    return out


def toy_config(toy_dir, **train):
    overrides = {"data": {"dir": str(toy_dir), "missing_ratio": 2 / 3},
                 "train": {"epochs": 6, "eval_every": 2, "batch_size": 512, "lr": 0.01, **train},
                 "model": {"refresh_every": 2, "n_mm_layers": 2}}
    return load_config("configs/dgmrec/base.yaml", overrides)


def test_forward_shapes_finite_and_every_trained_parameter_gets_gradient(toy_dir):
    config = toy_config(toy_dir)
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    reps = model(g)
    user, item = model.fused(reps)
    assert user.shape == (ds.n_users, 64) and item.shape == (ds.n_items, 64)
    for view in reps.modalities.values():
        assert view.item_general.shape == (ds.n_items, 64) and view.user_specific.shape == (ds.n_users, 64)
    users, pos = torch.from_numpy(ds.train[:256, 0]), torch.from_numpy(ds.train[:256, 1])
    neg = torch.randint(0, ds.n_items, (256,), generator=torch.Generator().manual_seed(0))
    loss, parts = model.loss(reps, users, pos, neg, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and set(parts) >= {"bpr", "reg", "ui_align", "bm_align", "inter_modal",
                                                    "club", "recon", "gen"}
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("club."):
            continue   # the CLUB estimators are trained by their own optimiser
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    trained = {id(p) for p in model.main_parameters()}
    assert not any(id(p) in trained for p in model.club.parameters())


@pytest.mark.parametrize("modalities", [1, 2, 3])
def test_fusion_is_eq_17_and_leaves_its_inputs_alone(modalities):
    """Eq. 17-18: ``E + (mean_m ḡ_m + Σ_m s̄_m) / (M + 1)``, written as the paper has it; :func:`fuse` folds the
    sums in place, which must not reach the modalities' rows."""
    from dgmrec_dgl.models.dgmrec.model import fuse

    gen = torch.Generator().manual_seed(modalities)
    id_rows, *rows = (torch.randn(7, 4, generator=gen, dtype=torch.float64) for _ in range(1 + 2 * modalities))
    general, specific = rows[:modalities], rows[modalities:]
    before = [r.clone() for r in rows]
    want = id_rows + (torch.stack(general).mean(0) + torch.stack(specific).sum(0)) / (modalities + 1)
    torch.testing.assert_close(fuse(id_rows, general, specific), want, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(rows, before))


@pytest.mark.parametrize("modalities", [2, 3])
def test_ranking_embeddings_are_the_fused_forward_bit_for_bit(tmp_path, monkeypatch, modalities):
    """``embeddings`` (what evaluation and ``recommend`` score with) folds each modality into Eq. 17-18's sums
    as it comes instead of keeping forward's views (a few columns at a time) and folds the sums before the ID
    branch runs; the values must not change, on 2 or 3 modalities; with the items encoded in slices (1M-item
    catalogs), up to rounding."""
    import dgmrec_dgl.models.dgmrec.model as dgmrec_model

    out = tmp_path / "data"
    dims = {"image": 24, "text": 16, "audio": 8}
    synthetic.generate(out, synthetic.preset("toy", n_users=120, n_items=90, seed=5,
                                             dims=dict(list(dims.items())[:modalities])), progress=False)
    config = toy_config(out)
    ds = load_dataset(config)
    assert len(ds.modalities) == modalities
    model = build_model(config, ds).eval()
    g = model.scoring_graph(model.make_graph(ds))
    with torch.no_grad():
        want = model.fused(model(g))
        got = model.embeddings(g)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        monkeypatch.setattr(dgmrec_model, "EMBEDDING_COLUMNS", 3)    # a few columns at a time
        assert all(torch.equal(a, b) for a, b in zip(model.embeddings(g), want))
        monkeypatch.setattr(dgmrec_model, "REFRESH_CHUNK", 16)
        sliced = model.embeddings(g)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(sliced, want))


def test_generation_writes_only_rows_of_items_missing_exactly_that_modality(toy_dir):
    config = toy_config(toy_dir)
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    before = {m: model.raw[m].detach().clone() for m in ds.modalities}
    written = model.generate_features(g, model.targets, torch.Generator().manual_seed(0))
    for m in ds.modalities:
        changed = (model.raw[m].detach() != before[m]).any(dim=1).numpy()
        expected = np.zeros(ds.n_items, bool)
        expected[ds.mask.missing_exactly(m)] = True
        np.testing.assert_array_equal(changed, expected)
        assert written[m] == expected.sum() > 0


def test_refinement_changes_only_rows_of_missing_items_and_keeps_user_item_part(toy_dir):
    config = toy_config(toy_dir)
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    old = {m: model.knn[m] for m in ds.modalities}
    model.generate_features(g, model.targets)
    g2 = model.refine_graphs(g)
    for m in ds.modalities:
        new = model.knn[m]
        lacking = ~ds.present[m]
        changed = np.array([not (np.array_equal(old[m].indices[old[m].indptr[i]:old[m].indptr[i + 1]],
                                                new.indices[new.indptr[i]:new.indptr[i + 1]])
                                 and np.array_equal(old[m].weights[old[m].indptr[i]:old[m].indptr[i + 1]],
                                                    new.weights[new.indptr[i]:new.indptr[i + 1]]))
                            for i in range(ds.n_items)])
        assert changed.any() and not changed[~lacking].any()
    assert torch.equal(g2.edges["interacts"].data["w"], g.edges["interacts"].data["w"])


def test_refine_tolerance_bounds_the_refined_graphs_and_is_checked(toy_dir):
    edges = {}
    for tolerance in (0.0, 0.3):
        config = toy_config(toy_dir)
        config.model.refine_tolerance = tolerance
        ds = load_dataset(config)
        torch.manual_seed(0)
        model = build_model(config, ds)
        g = model.make_graph(ds)
        for epoch in (2, 4, 6):
            g, log = model.before_epoch(epoch, g, torch.Generator().manual_seed(epoch))
        edges[tolerance] = log["knn_edges"]
        assert log["knn_edges"] == {m: g.num_edges(f"knn_{m}") for m in ds.modalities}
    assert all(edges[0.3][m] < edges[0.0][m] for m in edges[0.0])
    with pytest.raises(DataError, match="model.refine_tolerance"):
        load_config("configs/dgmrec/base.yaml", {"model": {"refine_tolerance": 1.0}})


def test_training_learns_and_resume_gives_the_same_result(toy_dir, tmp_path):
    config = toy_config(toy_dir)
    full = train(config, str(tmp_path / "full"), progress=False)
    assert full["best_epoch"] >= 1 and full["test"]["recall@20"] > 0
    lines = [json.loads(l) for l in open(tmp_path / "full" / "log.jsonl")]
    assert len(lines) == 6 and "valid" in lines[1] and lines[-1]["loss"]["bpr"] < lines[0]["loss"]["bpr"]

    part = tmp_path / "part"
    train(config, str(part), progress=False, max_epochs=3)          # "killed" after 3 epochs
    resumed = train(config, str(part), resume=True, progress=False)
    assert resumed["best_epoch"] == full["best_epoch"]
    assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
    assert len(open(part / "log.jsonl").readlines()) == 6


def test_without_generation_switch_leaves_features_and_graphs_alone(toy_dir):
    config = toy_config(toy_dir)
    config.model.generate = False
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    before = {m: model.raw[m].detach().clone() for m in ds.modalities}
    knn = dict(model.knn)
    for epoch in range(3):
        g, log = model.before_epoch(epoch * config.model.refresh_every, g, torch.Generator().manual_seed(0))
    for m in ds.modalities:
        assert torch.equal(model.raw[m].detach(), before[m]) and model.knn[m] is knn[m]


def test_test_metrics_are_broken_down_by_missing_level(toy_dir, tmp_path):
    config = toy_config(toy_dir, epochs=2, eval_every=2)
    result = train(config, str(tmp_path / "run"), progress=False)
    levels = {key.split("group=")[1] for key in result["test"] if "group=" in key}
    assert levels <= {"0", "1", "2"} and "0" in levels and len(levels) >= 2
