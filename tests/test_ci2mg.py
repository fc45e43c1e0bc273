"""CI2MG: hypergraph normalisation (Eq. 3–5), Sinkhorn OT (Eq. 6–9), contrastive (Eq. 10), generation
(Eq. 11–12) and the model: generated features are used only where a modality is missing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgmrec_dgl.models.ci2mg.contrastive import modality_contrastive
from dgmrec_dgl.models.ci2mg.generation import TaskGuidedGenerator, reconstruction_loss
from dgmrec_dgl.models.ci2mg.hypergraph import (PrototypeHypergraph, edge_to_node, hypergraph_conv, incidence,
                                                node_to_edge)
from dgmrec_dgl.models.ci2mg.transport import (block_transport, item_blocks, sinkhorn, squared_distances,
                                               transport_plan)


def _release_sinkhorn(cost: torch.Tensor, epsilon: float, iters: int) -> torch.Tensor:
    """The released scaling loop (rows to 1/B, then columns to 1/K, times B), written out for comparison."""
    q = torch.exp(-cost / epsilon)
    n, k = q.shape
    q = q / q.sum()
    for _ in range(iters):
        q = q / q.sum(dim=1, keepdim=True) / n
        q = q / q.sum(dim=0, keepdim=True) / k
    return q * n


# ---------------------------------------------------------------------- hypergraph (Eq. 3–5)
def test_incidence_is_cosine_and_positive_variant_clamps():
    gen = torch.Generator().manual_seed(0)
    items, protos = torch.randn(30, 8, generator=gen), torch.randn(5, 8, generator=gen)
    h = incidence(items, protos, "cosine")
    expected = torch.nn.functional.cosine_similarity(items[:, None, :], protos[None, :, :], dim=2)
    torch.testing.assert_close(h, expected, atol=1e-6, rtol=1e-5)
    assert (h < 0).any()
    assert (incidence(items, protos, "positive") >= 0).all()
    with pytest.raises(ValueError):
        incidence(items, protos, "softmax")


@pytest.mark.parametrize("kind", ["cosine", "positive"])
def test_hypergraph_incidence_rows_sum_to_one(kind):
    """D^-1 H (item → hyperedges) and B^-1 H^T (hyperedge → items) are row-stochastic."""
    gen = torch.Generator().manual_seed(1)
    h = incidence(torch.rand(40, 8, generator=gen), torch.rand(6, 8, generator=gen), kind)
    torch.testing.assert_close(edge_to_node(h).sum(dim=1), torch.ones(40))
    torch.testing.assert_close(node_to_edge(h).sum(dim=1), torch.ones(6))


def test_zero_sums_are_replaced_by_one():
    h = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.5, 0.0]])   # item 0 in no edge, edge 1 empty
    assert torch.equal(edge_to_node(h)[0], torch.zeros(2))
    assert torch.equal(node_to_edge(h)[1], torch.zeros(3))
    assert torch.isfinite(hypergraph_conv(torch.ones(3, 4), h, torch.eye(2))).all()


def test_factorised_conv_equals_dense_operator():
    gen = torch.Generator().manual_seed(2)
    h = incidence(torch.randn(25, 8, generator=gen), torch.randn(4, 8, generator=gen))
    w, q = torch.randn(4, 4, generator=gen), torch.randn(25, 3, generator=gen)
    dense = torch.diag(1 / h.sum(1)) @ h @ w @ torch.diag(1 / h.sum(0)) @ h.T          # the release's I×I R
    torch.testing.assert_close(hypergraph_conv(q, h, w), dense @ q, atol=1e-4, rtol=1e-4)


def test_prototype_hypergraph_layers_and_gradients():
    torch.manual_seed(0)
    hg = PrototypeHypergraph(d=8, n_prototypes=5, n_layers=2)
    seed = torch.randn(20, 8, requires_grad=True)
    q = hg(seed)
    assert q.shape == (20, 8) and ((q > 0) & (q < 1)).all()
    q.sum().backward()
    assert hg.prototypes.grad.abs().sum() > 0 and hg.weight.grad.abs().sum() > 0 and seed.grad is not None


# ---------------------------------------------------------------------- Sinkhorn (Eq. 6–8)
@pytest.mark.parametrize("method", ["log", "stabilized"])
@pytest.mark.parametrize("shape", [(50, 50), (37, 61)])
def test_sinkhorn_marginals_match_to_1e4(method, shape):
    gen = torch.Generator().manual_seed(3)
    cost = squared_distances(torch.rand(shape[0], 6, generator=gen), torch.rand(shape[1], 6, generator=gen))
    f, g = sinkhorn(cost, 0.1, 5000, tol=1e-6, method=method)
    plan = transport_plan(cost, f, g, 0.1).double()
    n, k = shape
    assert (plan.sum(dim=1) * n - 1).abs().max() < 1e-4      # rows: 1/n each
    assert (plan.sum(dim=0) * k - 1).abs().max() < 1e-4      # columns: 1/k each
    assert abs(float(plan.sum()) - 1) < 1e-4


@pytest.mark.parametrize("method", ["log", "stabilized"])
def test_ten_iterations_reproduce_the_release_plan(method):
    gen = torch.Generator().manual_seed(4)
    cost = squared_distances(torch.rand(64, 16, generator=gen), torch.rand(64, 16, generator=gen))
    f, g = sinkhorn(cost, 5.0, 10, method=method)
    ours = transport_plan(cost, f, g, 5.0).double() * 64
    torch.testing.assert_close(ours, _release_sinkhorn(cost.double(), 5.0, 10), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["log", "stabilized"])
def test_sinkhorn_is_stable_where_the_plain_kernel_underflows(method):
    """Adding a constant to a row or column of the cost leaves the optimal plan unchanged, but makes
    exp(-C/ε) of that row underflow to zero: the released scaling loop returns NaN, ours the same plan."""
    gen = torch.Generator().manual_seed(5)
    cost = squared_distances(torch.rand(40, 4, generator=gen), torch.rand(40, 4, generator=gen))
    shifted = cost.clone()
    shifted[3] += 200.0                                       # exp(-200) is below float32's smallest number
    shifted[:, 7] += 300.0
    assert torch.isnan(_release_sinkhorn(shifted, 1.0, 10)).any()
    reference = transport_plan(cost, *sinkhorn(cost, 1.0, 2000, tol=1e-6, method="log"), 1.0)
    plan = transport_plan(shifted, *sinkhorn(shifted, 1.0, 2000, tol=1e-6, method=method), 1.0)
    assert torch.isfinite(plan).all()
    torch.testing.assert_close(plan, reference, atol=1e-6, rtol=1e-3)
    assert (plan.sum(dim=0).double() * 40 - 1).abs().max() < 1e-4
    assert (plan.sum(dim=1).double() * 40 - 1).abs().max() < 1e-4


def test_solvers_agree():
    gen = torch.Generator().manual_seed(6)
    cost = squared_distances(torch.rand(30, 5, generator=gen), torch.rand(45, 5, generator=gen))
    a = transport_plan(cost, *sinkhorn(cost, 0.2, 50, method="log"), 0.2)
    b = transport_plan(cost, *sinkhorn(cost, 0.2, 50, method="stabilized"), 0.2)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------------- block transport (Eq. 9)
def test_item_blocks_partition_evenly():
    blocks = item_blocks(torch.randperm(10), 4)
    assert [len(b) for b in blocks] == [4, 3, 3]
    assert sorted(torch.cat(blocks).tolist()) == list(range(10))
    assert len(item_blocks(torch.arange(10), 100)) == 1


def test_one_block_is_the_full_problem_and_gradient_reaches_target_only():
    gen = torch.Generator().manual_seed(7)
    src = torch.rand(24, 5, generator=gen, requires_grad=True)
    tgt = torch.rand(24, 5, generator=gen, requires_grad=True)
    out = block_transport(src, tgt, item_blocks(torch.arange(24), 64), epsilon=5.0, n_iters=10)
    plan = _release_sinkhorn(squared_distances(src.detach(), tgt.detach()), 5.0, 10).float()
    torch.testing.assert_close(out, plan @ tgt.detach(), atol=1e-5, rtol=1e-4)
    weights = torch.randn(24, 5, generator=gen)
    (out * weights).sum().backward()
    assert src.grad is None                                   # the plan is a constant, as released
    torch.testing.assert_close(tgt.grad, plan.T @ weights, atol=1e-4, rtol=1e-4)


def test_blocks_transport_within_themselves_in_any_order():
    gen = torch.Generator().manual_seed(8)
    src, tgt = torch.rand(30, 4, generator=gen), torch.rand(30, 4, generator=gen)
    order = torch.randperm(30, generator=gen)
    blocks = item_blocks(order, 10)
    out = block_transport(src, tgt, blocks)
    for idx in blocks:                                        # each block is its own OT problem
        alone = block_transport(src[idx], tgt[idx], [torch.arange(len(idx))])
        torch.testing.assert_close(out[idx], alone)
        # rows are convex combinations of the block's targets
        assert (out[idx] <= tgt[idx].max(0).values + 1e-5).all()


def test_delta_offset_adds_the_same_vector_to_a_block():
    gen = torch.Generator().manual_seed(9)
    src, tgt = torch.rand(12, 3, generator=gen), torch.rand(12, 3, generator=gen)
    delta = torch.zeros(12, requires_grad=True)
    blocks = [torch.arange(12)]
    base = block_transport(src, tgt, blocks)
    with torch.no_grad():
        delta[3] = 0.5
    moved = block_transport(src, tgt, blocks, delta=delta)
    torch.testing.assert_close(moved - base, (0.5 * tgt[3]).expand(12, 3))
    moved.sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


# ---------------------------------------------------------------------- contrastive (Eq. 10)
def test_contrastive_paper_is_infonce_and_release_is_constant_log2():
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(16, 8, generator=gen, requires_grad=True)
    q_hat = torch.randn(16, 8, generator=gen, requires_grad=True)
    paper = modality_contrastive(q, q_hat, temperature=0.5)
    cos = torch.nn.functional.cosine_similarity(q[:, None], q_hat[None], dim=2) / 0.5
    expected = (-torch.log_softmax(cos, dim=1).diagonal()).mean()
    torch.testing.assert_close(paper, expected)
    paper.backward()
    assert q.grad.abs().sum() > 0

    q.grad = None
    release = modality_contrastive(q, q_hat, temperature=1.0, release=True)
    assert float(release.detach()) == pytest.approx(math.log(2), abs=1e-6)
    release.backward()
    assert q.grad.abs().max() < 1e-6                          # a constant: nothing to learn
    assert float(modality_contrastive(q[:0], q_hat[:0])) == 0.0


# ---------------------------------------------------------------------- task-guided generation (Eq. 11–12)
def test_task_guided_generator_and_reconstruction_on_observed_rows():
    torch.manual_seed(0)
    gen_net = TaskGuidedGenerator(d=6, activation="sigmoid")
    q, q_hat = torch.randn(10, 6), torch.randn(10, 6)
    z = gen_net(q, q_hat)
    assert z.shape == (10, 6) and ((z > 0) & (z < 1)).all()
    target = torch.randn(10, 6)
    observed = torch.tensor([1, 4, 7])
    loss = reconstruction_loss(z, target, observed)
    torch.testing.assert_close(loss, ((z[observed] - target[observed]) ** 2).mean())
    assert float(reconstruction_loss(z, target, observed[:0])) == 0.0
    with pytest.raises(ValueError):
        TaskGuidedGenerator(6, activation="relu")


# ---------------------------------------------------------------------- the model (Eq. 1, 13–15)
from dgmrec_dgl.config import CI2MGConfig, load_config  # noqa: E402
from dgmrec_dgl.data.dataset import Dataset  # noqa: E402
from dgmrec_dgl.data.masks import MissingMask  # noqa: E402
from dgmrec_dgl.graphs.hetero import mean_aggregate  # noqa: E402
from dgmrec_dgl.models.ci2mg.model import CI2MG, id_propagation  # noqa: E402


def _masked_tiny(tiny_dir):
    ds = Dataset.load(tiny_dir)
    mask = MissingMask(ds.n_items, ds.modalities, {"t": np.array([1, 5]), "v": np.array([2]), "all": np.array([6])})
    return ds.with_mask(mask)


def _model(ds, **overrides):
    torch.manual_seed(0)
    cfg = CI2MGConfig(embedding_dim=8, n_prototypes=4, **overrides)
    model = CI2MG.from_dataset(ds, cfg, seed=0)
    return model, model.make_graph(ds)


def test_mean_normalised_eq1_and_id_branch(tiny_dir):
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds)
    r = torch.from_numpy(ds.train_matrix().toarray()).float()          # [U, I]
    x = torch.randn(ds.n_items, 3)
    torch.testing.assert_close(mean_aggregate(g, "interacted_by", x), (r / r.sum(1, keepdim=True)) @ x)
    u = torch.randn(ds.n_users, 3)
    deg_i = r.sum(0).clamp_min(1)[:, None]
    torch.testing.assert_close(mean_aggregate(g, "interacts", u), (r.T @ u) / deg_i)
    # Eq. 1 and the LightGCN ID branch with D^-1 A
    eu, ei = id_propagation(g, model.user_emb, model.item_emb, 1, "mean")
    torch.testing.assert_close(eu, (model.user_emb + (r / r.sum(1, keepdim=True)) @ model.item_emb) / 2)
    torch.testing.assert_close(ei, (model.item_emb + (r.T @ model.user_emb) / deg_i) / 2)


def test_generated_features_are_used_only_where_a_modality_is_missing(tiny_dir):
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds)
    model.eval()
    reps = model(g)
    for m, v in reps.modalities.items():
        present = torch.from_numpy(ds.present[m])
        assert torch.equal(v.completed[present], v.projected[present])
        assert torch.equal(v.completed[~present], v.generated[~present])
    _, item_before = model.fused(reps)
    with torch.no_grad():                                  # change every generator: only missing rows move
        for gen_net in model.generate.values():
            gen_net.linear.weight.add_(1.0)
    _, item_after = model.fused(model(g))
    complete = torch.from_numpy(np.all([ds.present[m] for m in ds.modalities], axis=0))
    assert torch.equal(item_after[complete], item_before[complete])
    assert not torch.allclose(item_after[~complete], item_before[~complete])
    # gradients of complete items' scores never reach the generators
    model.zero_grad()
    item_after[complete].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.generate.parameters())


def test_release_mode_uses_generated_features_everywhere(tiny_dir):
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds, generated_for="all")
    for v in model(g).modalities.values():
        assert torch.equal(v.completed, v.generated)


def test_loss_parts_and_reconstruction_on_observed_items(tiny_dir):
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds)
    reps = model(g)
    users, pos, neg = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 5, 0]), torch.tensor([3, 4, 7, 6])
    total, parts = model.loss(reps, users, pos, neg)
    assert set(parts) == {"bpr", "rec", "cl"}
    rec = 0.0
    for m, v in reps.modalities.items():
        has = torch.unique(pos)[torch.from_numpy(ds.present[m])[torch.unique(pos)]]
        rec += ((v.generated[has] - v.projected[has]) ** 2).mean().item()
    assert parts["rec"] == pytest.approx(rec, rel=1e-5)
    total.backward()
    assert model.item_emb.grad.abs().sum() > 0
    for m in model.modalities:
        assert model.hypergraph[m].prototypes.grad.abs().sum() > 0
        assert model.project[m].weight.grad.abs().sum() > 0
    release, _ = _model(ds, contrastive="release")
    _, parts = release.loss(release(g), users, pos, neg)
    assert parts["cl"] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_ot_blocks_are_redrawn_each_epoch_and_one_block_is_the_full_problem(tiny_dir):
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds, ot_block=3)
    before = model.ot_order.clone()
    _, log = model.before_epoch(0, g, torch.Generator().manual_seed(1))
    assert log["ot_blocks"] == 3 and not torch.equal(before, model.ot_order)
    assert sorted(model.ot_order.tolist()) == list(range(ds.n_items))
    full, _ = _model(ds, ot_block=4096)
    full.load_state_dict(model.state_dict())
    assert full.before_epoch(0, g, torch.Generator())[1] == {}
    assert not torch.allclose(model(g).modalities["image"].inter, full(g).modalities["image"].inter)


def test_single_modality_and_three_modalities(tiny_dir, tmp_path):
    _masked_tiny(tiny_dir)
    one = Dataset.load(tiny_dir, feature_files={"text": "text_feat.npy"})
    model, g = _model(one)
    _, parts = model.loss(model(g), torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    assert set(parts) == {"bpr", "rec"}
    np.save(tiny_dir / "audio_feat.npy", np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32))
    three = Dataset.load(tiny_dir)
    assert three.modalities == ("image", "text", "audio")
    model, g = _model(three, ot_delta=True)
    user, item = model.fused(model(g))
    assert user.shape == (6, 4 * 8) and item.shape == (8, 4 * 8)
    total, _ = model.loss(model(g), torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([3, 4]))
    total.backward()
    assert all(p.grad is not None for p in model.delta.values())


def test_ci2mg_trains_with_the_generic_trainer_and_resumes_exactly(tmp_path):
    from dgmrec_dgl.data.synthetic import generate, preset
    from dgmrec_dgl.train import train

    data = tmp_path / "toy"
    generate(data, preset("toy", n_users=200, n_items=150), progress=False)
    config = load_config(None, {"model": {"name": "ci2mg", "ot_block": 64},
                                "data": {"dir": str(data), "missing_ratio": 2 / 3},
                                "train": {"epochs": 4, "eval_every": 2, "batch_size": 512, "threads": 1}})
    result = train(config, str(tmp_path / "run"), progress=False)
    assert result["epochs_run"] == 4 and result["test"]["recall@20"] > 0
    # "killed" after one epoch (OT blocks redrawn, Adam moments and RNG states mid-run), then resumed
    train(config, str(tmp_path / "part"), progress=False, max_epochs=1)
    resumed = train(config, str(tmp_path / "part"), resume=True, progress=False)
    assert (resumed["best_epoch"], resumed["valid"], resumed["test"]) == (result["best_epoch"], result["valid"],
                                                                       result["test"])


@pytest.mark.parametrize("shared", [True, False])
def test_shared_norm_mixes_the_modalities_running_statistics(tiny_dir, shared):
    """The release's one BatchNorm: a training forward updates its running mean once per modality in order,
    so scoring normalises every modality with a blend of both; ``shared_norm=False``: one per modality."""
    ds = _masked_tiny(tiny_dir)
    model, g = _model(ds, shared_norm=shared)
    norms = [model.generate[m].norm for m in model.modalities]
    assert (norms[0] is norms[1]) == shared
    model.train()
    reps = model(g)
    momentum = norms[0].momentum
    expected, running = {}, torch.zeros(8)
    for m in model.modalities:
        v = reps.modalities[m]
        with torch.no_grad():
            mean = model.generate[m].linear(torch.cat([v.intra, v.inter], dim=1)).mean(dim=0)
        running = (1 - momentum) * (running if shared else torch.zeros(8)) + momentum * mean
        expected[m] = running
    for m in model.modalities:
        want = expected[model.modalities[-1]] if shared else expected[m]
        torch.testing.assert_close(model.generate[m].norm.running_mean, want, atol=1e-6, rtol=1e-5)
    assert sum(p.numel() for p in model.generate.parameters()) == \
        sum(p.numel() for m in model.modalities for p in model.generate[m].linear.parameters()) + 16 * (1 if shared else 2)
