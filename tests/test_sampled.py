"""Sampled mini-batch training (``model.execution: sampled``) against the full-graph step, in float64.

With every fanout and sample size at least the largest degree, DGL's samplers draw every neighbour and a
sampled step must equal the full-graph step for the batch (values and gradients); with small fanouts the
layers must still be unbiased estimates of the full ones. The batch is small next to the catalog, so a
neighbour left out, or a wrong normalisation, shows.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgmrec_dgl.cli import main
from dgmrec_dgl.config import load_config
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.graphs.hetero import IU, UI
from dgmrec_dgl.graphs.sampling import lightgcn_blocks, sample_ui_blocks, seed_sampling
from dgmrec_dgl.graphs.blocks import src_ids
from dgmrec_dgl.models import build_model
from dgmrec_dgl.models.lightgcn import lightgcn
from dgmrec_dgl.optim import RowSparseAdam
from dgmrec_dgl.train import epoch_batches, load_dataset, train

LOSS_PARTS = ("bpr", "reg", "ui_align", "bm_align", "inter_modal", "club", "gen")


def make(data_dir, name="dgmrec", **model):
    config = load_config(f"configs/{name}/base.yaml", {"data": {"dir": str(data_dir), "missing_ratio": 2 / 3},
                                                       "model": model})
    ds = load_dataset(config)
    torch.manual_seed(0)
    net = build_model(config, ds).double()
    g = net.make_graph(ds)
    for etype in g.canonical_etypes:          # float64 edge weights and degree terms, as the parameters
        g.edges[etype].data["w"] = g.edges[etype].data["w"].double()
    for ntype in g.ntypes:
        g.nodes[ntype].data["norm"] = g.nodes[ntype].data["norm"].double()
    return ds, net, g


def max_degree(g) -> int:
    return int(max(g.in_degrees(etype=UI).max(), g.in_degrees(etype=IU).max()))


def draw_every_neighbour(model, g) -> None:
    """DGMRec's fanouts and sample sizes at the largest degree: the samplers then draw every neighbour."""
    deg = max_degree(g)
    cfg = model.config
    cfg.fanouts, cfg.user_items_sample, cfg.item_users_sample = (deg,) * cfg.n_ui_layers, deg, deg


def batch(ds, size=32):
    rows = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(1))[:size]
    users, pos = torch.from_numpy(ds.train[rows.numpy(), 0]), torch.from_numpy(ds.train[rows.numpy(), 1])
    neg = torch.randint(0, ds.n_items, (size,), generator=torch.Generator().manual_seed(2))
    return users, pos, neg


def step(model, g, mode, users, pos, neg, seed=5):
    """Loss parts and dense gradients of one step in ``mode``."""
    model.config.execution = mode
    model.zero_grad(set_to_none=True)
    seed_sampling(11)
    b = model.sample_batch(g, users, pos, neg)
    reps, *ids = model.batch_forward(g, b)
    loss, parts = model.loss(reps, *ids, torch.Generator().manual_seed(seed))
    loss.backward()
    grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
             for n, p in model.named_parameters() if p.grad is not None and not n.startswith("club.")}
    return b, reps, ids, parts, grads


def test_lightgcn_sampled_step_equals_the_full_step_when_fanouts_reach_every_neighbour(sparse_dir):
    ds, model, g = make(sparse_dir, "lightgcn")
    model.config.fanouts = (max_degree(g),) * model.config.n_layers
    users, pos, neg = batch(ds)
    _, _, _, want, full = step(model, g, "full", users, pos, neg)
    b, reps, ids, got, sampled = step(model, g, "sampled", users, pos, neg)
    assert len(src_ids(b.drawn["blocks"][-1], "item")) < ds.n_items   # the last block is a strict subgraph
    assert model.backbone.user.grad.is_sparse and model.backbone.item.grad.is_sparse
    assert got.keys() == want.keys() == {"bpr", "reg"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    for n in full:
        assert torch.allclose(sampled[n], full[n], rtol=0, atol=1e-14), n
    # small fanouts draw fewer neighbours and change the step
    model.config.fanouts = (2, 2, 2)
    _, _, _, small, _ = step(model, g, "sampled", users, pos, neg)
    assert small["bpr"] != pytest.approx(want["bpr"], rel=1e-9)


def test_a_sampled_layer_is_an_unbiased_estimate_of_the_full_layer(sparse_dir):
    """Mean of many fanout-2 draws of one layer → the full layer (a block-degree normalisation would not)."""
    ds, model, g = make(sparse_dir, "lightgcn")
    users, items = torch.arange(0, 40), torch.arange(100, 140)
    user0, item0 = model.backbone.user.detach(), model.backbone.item.detach()
    full_user, full_item = lightgcn(g, user0, item0, 1)
    draws = 400
    mean_user, mean_item = torch.zeros(40, user0.shape[1], dtype=user0.dtype), torch.zeros(40, item0.shape[1], dtype=item0.dtype)
    for s in range(draws):
        seed_sampling(s)
        blocks = sample_ui_blocks(g, users, items, [2])
        u, i, *_ = lightgcn_blocks(blocks, user0[src_ids(blocks[0], "user")], item0[src_ids(blocks[0], "item")])
        mean_user += u / draws
        mean_item += i / draws
    scale = full_user[users].abs().mean()
    # the sampling error of the mean of 400 draws is ~5% of the scale here; biased normalisations are off by 30%+
    assert (mean_user - full_user[users]).abs().mean() < 0.12 * scale
    assert (mean_item - full_item[items]).abs().mean() < 0.12 * full_item[items].abs().mean()
    seed_sampling(0)
    blocks = sample_ui_blocks(g, users, items, [2])
    one_user, *_ = lightgcn_blocks(blocks, user0[src_ids(blocks[0], "user")], item0[src_ids(blocks[0], "item")])
    assert (one_user - full_user[users]).abs().mean() > (mean_user - full_user[users]).abs().mean()


def test_dgmrec_sampled_step_equals_the_full_step_for_the_batch(sparse_dir):
    ds, model, g = make(sparse_dir, recon=0.0)
    draw_every_neighbour(model, g)
    cfg, deg = model.config, max_degree(g)
    users, pos, neg = batch(ds)
    _, full_reps, _, want, full = step(model, g, "full", users, pos, neg)
    b, reps, (u, i, j), got, sampled = step(model, g, "sampled", users, pos, neg)
    items = reps.item_ids
    assert len(items) < ds.n_items / 2
    assert set(got) == set(want) == set(LOSS_PARTS)
    for part in LOSS_PARTS:
        assert got[part] == pytest.approx(want[part], rel=1e-10, abs=1e-14), part
    (fu, fi), (bu, bi) = full_reps.fused(), reps.fused()
    for a, r in ((pos, i), (neg, j)):
        assert torch.allclose((bu[u] * bi[r]).sum(1), (fu[users] * fi[a]).sum(1), rtol=0, atol=1e-12)
    for m in ds.modalities:
        assert torch.allclose(reps.modalities[m].user_general, full_reps.modalities[m].user_general[reps.user_ids],
                              rtol=0, atol=1e-12)
    # every trainable table is read sparsely, and the gradients are the full step's
    assert model.user_emb.grad.is_sparse and model.item_emb.grad.is_sparse
    assert all(model.raw[m].grad.is_sparse for m in model.modalities)
    assert set(sampled) == set(full)
    for n in full:
        assert torch.allclose(sampled[n], full[n], rtol=1e-9, atol=1e-13), n

    # a sample of the users' items (Eq. 6) or of the items' users (Eq. 2) changes the step
    for key in ("user_items_sample", "item_users_sample"):
        setattr(cfg, key, 1)
        _, _, _, small, _ = step(model, g, "sampled", users, pos, neg)
        assert small["ui_align"] != pytest.approx(want["ui_align"], rel=1e-9), key
        setattr(cfg, key, deg)


def test_the_same_batch_seed_draws_the_same_blocks_in_the_sampler_thread(sparse_dir):
    ds, model, g = make(sparse_dir, execution="sampled", fanouts=[3, 3, 3], user_items_sample=2, item_users_sample=2)
    csr = ds.train_matrix()
    users, items = csr.nonzero()
    triples = tuple(torch.from_numpy(a.astype(np.int64)) for a in (
        users, items, np.random.default_rng(0).integers(0, ds.n_items, csr.nnz)))

    def signature(seed, ahead):
        out = []
        for b in epoch_batches(model, g, triples, 256, seed, 0, ahead=ahead):
            blocks = b.drawn["id"]["blocks"] + [b.drawn["to_users"]] + list(b.drawn["preference"].values())
            out.append([torch.cat([blk.edges(etype=e)[0] for e in blk.canonical_etypes]).tolist() for blk in blocks])
        return out

    first = signature(1, ahead=2)
    assert len(first) == -(-csr.nnz // 256)
    assert signature(1, ahead=0) == first          # the overlap does not change what is drawn
    assert signature(2, ahead=2) != first


def test_the_sampler_thread_keeps_one_openmp_thread_after_torch_ran_there():
    """Torch sets a thread's OpenMP count to its own when the thread first asks; the sampler thread must keep
    DGL's draws on one thread anyway (on 2, at 50K items, two runs drew different neighbours)."""
    import dgmrec_dgl.train as train_module

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # a torch kernel on the sampler thread, then the OpenMP count DGL's kernels there get
        threads = train_module._SAMPLER.submit(lambda: (torch.ones(1 << 17).sum(), torch.get_num_threads())[1])
        assert threads.result() == 1
    finally:
        torch.set_num_threads(before)


def test_lazy_adam_matches_sparse_adam_and_leaves_unread_rows_alone():
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(10, 4))
    ref = torch.nn.Parameter(ours.detach().clone())
    opt, ref_opt = RowSparseAdam([ours], lr=0.1, lazy=True), torch.optim.SparseAdam([ref], lr=0.1)
    for it in range(6):
        idx = torch.tensor([1, 3, 3, 7]) if it % 2 else torch.tensor([0, 1])
        for p, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            (torch.nn.functional.embedding(idx, p, sparse=True) ** 2).sum().backward()
            o.step()
    assert torch.allclose(ours, ref, rtol=0, atol=1e-6)
    before = ours.detach().clone()
    opt.zero_grad()
    torch.nn.functional.embedding(torch.tensor([2]), ours, sparse=True).sum().backward()
    opt.step()
    moved = (ours.detach() != before).any(1)
    assert moved.tolist() == [r == 2 for r in range(10)]    # dense Adam would move rows 0, 1, 3, 7 by momentum


def sampled_config(data_dir):
    return load_config("configs/dgmrec/base.yaml", {
        "data": {"dir": str(data_dir), "missing_ratio": 2 / 3},
        "train": {"epochs": 2, "eval_every": 1, "batch_size": 512, "lr": 0.01},
        "eval": {"user_sample": 100},
        "model": {"execution": "sampled", "fanouts": [5, 5, 5], "user_items_sample": 3, "item_users_sample": 3}})


def test_two_sampled_trainings_with_one_seed_give_the_same_metrics(sparse_dir, tmp_path):
    results = []
    for run in ("a", "b"):
        results.append(train(sampled_config(sparse_dir), str(tmp_path / run), progress=False))
        log = [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
        assert [r["execution"] for r in log] == ["sampled", "sampled"]
        assert log[0]["valid"]["n_users"] == 100          # validations rank a sample of the valid users
        assert log[0]["seconds"]["train_sample"] > 0
    assert results[0]["execution"] == "sampled"
    assert results[0]["test"]["n_users"] > 100            # the test ranks every test user
    assert results[0]["valid"] == results[1]["valid"] and results[0]["test"] == results[1]["test"]
    # killed after one epoch and resumed: the lazy Adam state and the batch seeds carry over
    train(sampled_config(sparse_dir), str(tmp_path / "part"), progress=False, max_epochs=1)
    resumed = train(sampled_config(sparse_dir), str(tmp_path / "part"), resume=True, progress=False)
    assert resumed["valid"] == results[0]["valid"] and resumed["test"] == results[0]["test"]


@pytest.mark.parametrize("model, value, key", [
    ({"fanouts": [0, 10, 10]}, "0", "model.fanouts"),
    ({"fanouts": [10, 10]}, "2 entries", "model.fanouts"),
    ({"user_items_sample": -3}, "-3", "model.user_items_sample"),
    ({"item_users_sample": 0}, "0", "model.item_users_sample"),
])
def test_bad_sampling_values_exit_2_with_one_line(tiny_dir, tmp_path, capsys, model, value, key):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"extends: {Path('configs/dgmrec/base.yaml').resolve()}\n"
                   f"model: {json.dumps(model)}\n")
    code = main(["train", "--config", str(cfg), "--data", str(tiny_dir), "--out", str(tmp_path / "run")])
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning:")]
    assert code == 2 and len(err) == 1 and key in err[0] and value in err[0] and "fix:" in err[0]
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_ci2mg_refuses_sampled_mode():
    with pytest.raises(DataError, match="ci2mg trains only in full mode"):
        load_config("configs/ci2mg/base.yaml", {"model": {"execution": "sampled"}})


def test_epoch_steps_stops_each_epoch_after_that_many_steps(sparse_dir, tmp_path):
    from dgmrec_dgl.train import train

    def run(name: str, steps: int) -> list[dict]:
        config = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "lightgcn" / "base.yaml"),
                             {"data": {"dir": str(sparse_dir), "missing_ratio": 0.5},
                              "train": {"epochs": 2, "batch_size": 256, "eval_every": 1, "threads": 1,
                                        "epoch_steps": steps},
                              "model": {"execution": "sampled"}})
        train(config, str(tmp_path / name), progress=False)
        return [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]

    whole, capped = run("whole", 0), run("capped", 2)
    assert whole[0]["steps"] > 2 and [r["steps"] for r in capped] == [2, 2]
    assert capped[0]["loss"]["bpr"] != whole[0]["loss"]["bpr"]         # the mean of 2 steps, not of the epoch


def test_an_epochs_triples_are_held_int32_and_cut_into_int64_batches(sparse_dir):
    from kernels.sampling import bpr_triples

    from dgmrec_dgl.train import batch_triples, epoch_triples

    ds, _, _ = make(sparse_dir, "lightgcn")
    triples = epoch_triples(ds, 7, 3)
    assert [t.dtype for t in triples] == [torch.int32] * 3
    csr = ds.train_matrix()
    for held, drawn in zip(triples, bpr_triples(csr.indptr, csr.indices, ds.n_items, 7 * 100003 + 3)):
        assert np.array_equal(held.numpy(), drawn)
    cut = batch_triples(triples, slice(5, 21))
    assert [t.dtype for t in cut] == [torch.int64] * 3
    assert all(torch.equal(c, t[5:21].long()) for c, t in zip(cut, triples))
