"""DGMRec's blocks execution mode against the full-graph forward on the same batch.

The batch is small next to the catalog (32 triples, 32 users, 228 of 672 items), so the item set T and
the kNN inputs I_m are strict subsets and a missing neighbour would show. Tolerances are tight rather than
zero: the blocks gather a subset of rows before the same matrix products and sparse sums, and a BLAS may
block a product differently for a different row count, which can move the last bit of a float32 result
(measured here: bitwise equal).
"""

import json

import pytest
import torch

from dgmrec_dgl.config import DGMRecConfig, LightGCNConfig, MFBPRConfig, load_config, resolve_execution
from dgmrec_dgl.data import synthetic
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.graphs import dst_ids, item_user_block, knn_blocks, src_ids
from dgmrec_dgl.models import build_model
from dgmrec_dgl.models.dgmrec.generators import perturb
from dgmrec_dgl.train import load_dataset, train

ATOL = 1e-6
LOSS_PARTS = ("bpr", "reg", "ui_align", "bm_align", "inter_modal", "club", "gen")


def make(data_dir, **model):
    config = load_config("configs/dgmrec/base.yaml", {"data": {"dir": str(data_dir), "missing_ratio": 2 / 3},
                                                      "model": model})
    ds = load_dataset(config)
    torch.manual_seed(0)
    net = build_model(config, ds)
    return ds, net, net.make_graph(ds)


def batch(ds, size=32):
    rows = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(1))[:size]
    users, pos = torch.from_numpy(ds.train[rows.numpy(), 0]), torch.from_numpy(ds.train[rows.numpy(), 1])
    neg = torch.randint(0, ds.n_items, (size,), generator=torch.Generator().manual_seed(2))
    return users, pos, neg


def both_modes(model, g, users, pos, neg):
    """(full reps, blocks reps, local users, local pos, local neg) on the same parameters."""
    model.config.execution = "full"
    full = model.batch_forward(g, model.sample_batch(g, users, pos, neg))[0]
    model.config.execution = "blocks"
    return (full, *model.batch_forward(g, model.sample_batch(g, users, pos, neg)))


def close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=ATOL)


@pytest.mark.parametrize("n_mm_layers", [1, 2])
def test_block_representations_equal_full_graph_ones_at_the_batch_rows(sparse_dir, n_mm_layers):
    ds, model, g = make(sparse_dir, n_mm_layers=n_mm_layers)
    users, pos, neg = batch(ds)
    with torch.no_grad():
        full, reps, u, i, j = both_modes(model, g, users, pos, neg)
    items, batch_users = reps.item_ids, reps.user_ids
    # the test means something only if the blocks leave out part of the graph
    assert len(items) < ds.n_items / 2 and not ds.present["image"].all()
    for m in ds.modalities:
        blocks = knn_blocks(g, m, items, n_mm_layers)
        assert len(blocks) == n_mm_layers and torch.equal(dst_ids(blocks[-1], "item"), items)
        for a, b in zip(blocks, blocks[1:]):
            assert torch.equal(dst_ids(a, "item"), src_ids(b, "item"))
        inputs = src_ids(blocks[0], "item")
        assert len(items) < len(inputs) < ds.n_items and torch.equal(inputs[:len(items)], items)
    assert torch.equal(batch_users[u], users) and torch.equal(items[i], pos) and torch.equal(items[j], neg)
    their_items = src_ids(item_user_block(g, batch_users), "item")
    assert torch.isin(their_items, items).all()   # T holds every train item of the batch users
    for m, v in reps.modalities.items():
        f = full.modalities[m]
        for name in ("general", "specific", "preference", "item_general", "item_specific"):
            assert close(getattr(v, name), getattr(f, name)[items]), (m, name)
        for name in ("user_general", "user_specific"):
            assert close(getattr(v, name), getattr(f, name)[batch_users]), (m, name)
    (fu, fi), (bu, bi) = full.fused(), reps.fused()
    for a, b in ((pos, i), (neg, j)):
        assert close((bu[u] * bi[b]).sum(1), (fu[users] * fi[a]).sum(1))


def test_loss_parts_equal_and_recon_is_the_full_mse_over_the_batch_items(sparse_dir):
    ds, model, g = make(sparse_dir, n_mm_layers=2, recon=0.0)
    users, pos, neg = batch(ds)
    with torch.no_grad():
        full, reps, u, i, j = both_modes(model, g, users, pos, neg)
        _, want = model.loss(full, users, pos, neg, torch.Generator().manual_seed(5))
        _, got = model.loss(reps, u, i, j, torch.Generator().manual_seed(5))
    assert set(got) == set(want) == set(LOSS_PARTS)
    for part in LOSS_PARTS:
        assert got[part] == pytest.approx(want[part], rel=1e-6, abs=1e-9), part

    # recon alone (it is the first user of the generator then): the full-mode MSE restricted to T
    cfg = model.config
    cfg.recon, cfg.sampler, cfg.additive = 0.1, 0.0, 0.0
    with torch.no_grad():
        _, got = model.loss(reps, u, i, j, torch.Generator().manual_seed(6))
        generator, items, want = torch.Generator().manual_seed(6), reps.item_ids, 0.0
        for m, f in full.modalities.items():
            decoded = model.decoders[m](perturb(f.item_general[items], cfg.perturb_eps, generator),
                                        perturb(f.item_specific[items], cfg.perturb_eps, generator))
            want += float(torch.nn.functional.mse_loss(decoded, model.raw[m][items]))
    assert got["recon"] == pytest.approx(cfg.recon * want, rel=1e-6)


def test_gradients_of_the_non_recon_loss_match_between_modes(sparse_dir):
    ds, model, g = make(sparse_dir, n_mm_layers=1, recon=0.0)
    users, pos, neg = batch(ds)
    grads = {}
    for mode in ("full", "blocks"):
        model.config.execution = mode
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(*model.batch_forward(g, model.sample_batch(g, users, pos, neg)),
                             torch.Generator().manual_seed(5))
        loss.backward()
        # blocks mode reads the raw tables through a sparse embedding: their gradients are row-sparse
        grads[mode] = {name: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
                       for name, p in model.named_parameters() if p.grad is not None and not name.startswith("club.")}
    assert all(model.raw[m].grad.is_sparse for m in model.modalities)
    assert set(grads["full"]) == set(grads["blocks"])
    checked = [n for n in grads["full"] if n.startswith(("general.", "specific.", "preference.", "raw."))]
    assert len(checked) >= 9
    for name, full in grads["full"].items():
        assert torch.allclose(grads["blocks"][name], full, rtol=1e-5, atol=1e-9), name


def test_execution_auto_picks_by_catalog_size_and_bad_values_are_refused(sparse_dir):
    ds, model, _ = make(sparse_dir, execution="auto", blocks_min_items=10**9, sampled_min_items=10**9)
    assert model.execution() == "full"
    model.config.blocks_min_items = ds.n_items
    assert model.execution() == "blocks"
    model.config.sampled_min_items = ds.n_items
    assert model.execution() == "sampled"
    for cls in (DGMRecConfig, LightGCNConfig, MFBPRConfig):
        assert resolve_execution(cls(execution="auto", blocks_min_items=5, sampled_min_items=10), 10) == "sampled"
        assert resolve_execution(cls(execution="auto", blocks_min_items=5, sampled_min_items=10), 9) == "blocks"
        assert resolve_execution(cls(execution="auto", blocks_min_items=5, sampled_min_items=10), 4) == "full"
        assert resolve_execution(cls(execution="blocks"), 1) == "blocks"
        with pytest.raises(DataError, match="full, blocks, sampled, auto"):
            cls(execution="minibatch")
    with pytest.raises(DataError, match="model.execution.*use one of: full, blocks, sampled, auto"):
        load_config("configs/lightgcn/base.yaml", {"model": {"execution": "minibatch"}})
    for key in ("blocks_min_items", "sampled_min_items"):
        with pytest.raises(DataError, match=key):
            load_config("configs/dgmrec/base.yaml", {"model": {key: -1}})


def test_lightgcn_accepts_blocks_and_runs_the_full_pass(sparse_dir):
    config = load_config("configs/lightgcn/base.yaml", {"data": {"dir": str(sparse_dir)},
                                                        "model": {"execution": "blocks"}})
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    users, pos, neg = batch(ds)
    (user, item, *_), *ids = model.batch_forward(g, model.sample_batch(g, users, pos, neg))
    full_user, full_item = model(g)
    assert torch.equal(user, full_user) and torch.equal(item, full_item)
    assert all(torch.equal(a, b) for a, b in zip(ids, (users, pos, neg)))


def test_two_epochs_in_blocks_mode_train_with_finite_losses(tmp_path):
    data = tmp_path / "demo"
    synthetic.generate(data, synthetic.preset("demo"), progress=False)
    config = load_config("configs/dgmrec/base.yaml", {
        "data": {"dir": str(data), "missing_ratio": 2 / 3},
        "train": {"epochs": 2, "eval_every": 2, "batch_size": 2048, "lr": 0.01},
        "model": {"execution": "blocks", "n_mm_layers": 2}})
    result = train(config, str(tmp_path / "run"), progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert len(lines) == 2 and result["best_epoch"] == 1
    for line in lines:
        assert set(line["loss"]) >= {"bpr", "recon", "gen"}
        assert all(torch.isfinite(torch.tensor(v)) for v in line["loss"].values())


def test_chunked_generation_equals_unchunked(sparse_dir):
    ds, model, g = make(sparse_dir)
    rows = {m: torch.as_tensor(t) for m, t in model.targets.items()}
    assert all(len(r) > 7 for r in rows.values())
    whole = model.generated_features(g, rows, torch.Generator().manual_seed(3))
    chunked = model.generated_features(g, rows, torch.Generator().manual_seed(3), chunk=7)
    for m in rows:
        assert whole[m].shape == (len(rows[m]), model.raw[m].shape[1])
        assert torch.allclose(chunked[m], whole[m], rtol=0, atol=ATOL), m
    before = {m: model.raw[m].detach().clone() for m in rows}
    written = model.generate_features(g, rows, torch.Generator().manual_seed(3), chunk=7)
    for m in rows:
        assert written[m] == len(rows[m])
        assert torch.allclose(model.raw[m].detach()[rows[m]], whole[m], rtol=0, atol=ATOL)
        untouched = torch.ones(ds.n_items, dtype=torch.bool)
        untouched[rows[m]] = False
        assert torch.equal(model.raw[m].detach()[untouched], before[m][untouched])
