"""The user–item + kNN heterograph (dgmrec_dgl.graphs.hetero) against dense torch."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dgmrec_dgl.graphs.hetero import (IU, UI, build_heterograph, knn_etype, mean_aggregate, propagate,
                                      replace_knn_relation)
from dgmrec_dgl.graphs.knn import KnnGraph, build_knn, normalize_knn


@pytest.fixture()
def small():
    rng = np.random.default_rng(4)
    n_users, n_items = 9, 14
    pairs = np.stack([rng.integers(0, n_users, 40), rng.integers(0, n_items, 40)], axis=1)
    pairs = np.concatenate([pairs, pairs[:3]])  # repeated pairs count once
    ds = SimpleNamespace(n_users=n_users, n_items=n_items, train=pairs)
    present = rng.random(n_items) < 0.7
    knn = {m: normalize_knn(build_knn(rng.standard_normal((n_items, 5)).astype(np.float32) + 0.5, 4,
                                      present, index="exact", progress=False)) for m in ("v", "t")}
    return ds, knn


def edges_by_id(g, etype):
    """``(src, dst)`` of a relation in edge-id order (``g.edges`` cannot list CSC-only relations by id)."""
    src, dst, eid = g.edges(etype=etype, form="all", order="srcdst")
    order = torch.argsort(eid)
    return src[order], dst[order]


def dense_bipartite_norm(ds):
    """LightGCN's D^-1/2 A D^-1/2 on the (U + I) adjacency, degrees + 1e-7, as in the reference."""
    n = ds.n_users + ds.n_items
    a = np.zeros((n, n))
    for u, i in ds.train:
        a[u, ds.n_users + i] = a[ds.n_users + i, u] = 1.0
    inv = 1.0 / np.sqrt(a.sum(axis=1) + 1e-7)
    return a * inv[:, None] * inv[None, :]


def test_lightgcn_weights_equal_dense(small):
    ds, knn = small
    g = build_heterograph(ds, knn)
    dense = dense_bipartite_norm(ds)
    u, i = edges_by_id(g, UI)
    assert g.num_edges(UI) == len({(a, b) for a, b in ds.train.tolist()})
    np.testing.assert_allclose(g.edges[UI].data["w"].numpy(), dense[u.numpy(), ds.n_users + i.numpy()],
                               rtol=1e-6)
    iu_i, iu_u = edges_by_id(g, IU)
    np.testing.assert_allclose(g.edges[IU].data["w"].numpy(), dense[ds.n_users + iu_i.numpy(), iu_u.numpy()],
                               rtol=1e-6)
    # the user–item relations keep CSC only (graphs.hetero)
    assert all(g._graph.get_relation_graph(g.get_etype_id(e)).formats()["created"] == ["csc"] for e in (UI, IU))
    # one LightGCN layer on the bipartite graph equals the dense product
    e = torch.randn(ds.n_users + ds.n_items, 6, dtype=torch.float64)
    want = torch.from_numpy(dense) @ e
    got_items = propagate(g, UI, e[:ds.n_users].float())
    got_users = propagate(g, IU, e[ds.n_users:].float())
    torch.testing.assert_close(got_users.double(), want[:ds.n_users], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_items.double(), want[ds.n_users:], rtol=1e-5, atol=1e-6)


def test_knn_edges_point_from_source_to_target(small):
    ds, knn = small
    g = build_heterograph(ds, knn)
    for m, graph in knn.items():
        src, dst = g.edges(etype=knn_etype(m))
        dense = graph.to_scipy().toarray()  # row = target
        np.testing.assert_allclose(g.edges[knn_etype(m)].data["w"].numpy(), dense[dst.numpy(), src.numpy()])
        assert g.num_edges(knn_etype(m)) == graph.nnz


@pytest.mark.parametrize("relation", ["knn", "ui", "iu"])
def test_update_all_with_autograd_equals_dense(small, relation):
    ds, knn = small
    g = build_heterograph(ds, knn)
    etype = {"knn": knn_etype("v"), "ui": UI, "iu": IU}[relation]
    src_t, _, dst_t = etype
    src, dst = edges_by_id(g, etype)
    # a field other than "w" takes the u_mul_e path on every relation, with a gradient for the kNN weights
    # (the user–item relations are CSC-only and their weights constants: DGL's SDDMM needs CSR or COO)
    w = g.edges[etype].data["w"].clone().requires_grad_(relation == "knn")
    g.edges[etype].data["w_edge"] = w
    h = torch.randn(g.num_nodes(src_t), 7, requires_grad=True)
    out = propagate(g, etype, h, weight="w_edge")
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()

    h2 = h.detach().clone().requires_grad_(True)
    w2 = w.detach().clone().requires_grad_(relation == "knn")
    a = torch.zeros(g.num_nodes(dst_t), g.num_nodes(src_t)).index_put((dst, src), w2, accumulate=True)
    want = a @ h2
    (want * upstream).sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)
    if relation == "knn":
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("etype", [UI, IU])
def test_user_item_node_factors_equal_edge_weights(small, etype):
    """The user–item step (copy_u on features scaled by ``norm``) equals the u_mul_e step on ``w``."""
    ds, knn = small
    g = build_heterograph(ds, knn)
    src, dst = edges_by_id(g, etype)
    src_t, _, dst_t = etype
    torch.testing.assert_close(g.srcnodes[src_t].data["norm"][src, 0] * g.dstnodes[dst_t].data["norm"][dst, 0],
                               g.edges[etype].data["w"], rtol=1e-6, atol=0)
    g.edges[etype].data["w_edge"] = g.edges[etype].data["w"]
    h = torch.randn(g.num_nodes(src_t), 5, requires_grad=True)
    h2 = h.detach().clone().requires_grad_(True)
    fast, slow = propagate(g, etype, h), propagate(g, etype, h2, weight="w_edge")
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(fast)
    (fast * upstream).sum().backward()
    (slow * upstream).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_propagate_on_a_block_equals_the_full_graph(small):
    """A one-layer block seeded by some destination nodes gives them the full-graph sums (both paths)."""
    from dgmrec_dgl._dgl import dgl

    ds, knn = small
    g = build_heterograph(ds, knn)
    for etype in (UI, knn_etype("v")):
        src_t, _, dst_t = etype
        seeds = torch.tensor([0, 3, 5])
        sub = dgl.in_subgraph(dgl.edge_type_subgraph(g, [etype]), {dst_t: seeds})
        block = dgl.to_block(sub, {dst_t: seeds})
        h = torch.randn(g.num_nodes(src_t), 4)
        full = propagate(g, etype, h)
        got = propagate(block, etype, h[block.srcnodes[src_t].data[dgl.NID]])
        torch.testing.assert_close(got, full[seeds])


def test_mean_aggregate_equals_dense(small):
    ds, knn = small
    g = build_heterograph(ds, knn)
    pairs = np.unique(ds.train, axis=0)
    a = np.zeros((ds.n_users, ds.n_items))
    a[pairs[:, 0], pairs[:, 1]] = 1.0
    h = torch.randn(ds.n_items, 4, dtype=torch.float64, requires_grad=True)
    deg = a.sum(axis=1, keepdims=True)
    want = torch.from_numpy(np.divide(a, deg, out=np.zeros_like(a), where=deg > 0)) @ h
    got = mean_aggregate(g, "interacted_by", h.detach().float().requires_grad_(True))
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    # users without train items get zeros
    assert torch.all(got[torch.from_numpy(deg[:, 0] == 0)] == 0)


def test_replace_knn_relation_keeps_user_item_part(small):
    ds, knn = small
    g = build_heterograph(ds, knn)
    g.nodes["item"].data["x"] = torch.ones(ds.n_items, 2)
    ui_w, iu_w = g.edges[UI].data["w"], g.edges[IU].data["w"]
    ui_edges, iu_edges = edges_by_id(g, UI), edges_by_id(g, IU)
    t_w = g.edges[knn_etype("t")].data["w"]
    old_v = g.edges(etype=knn_etype("v"))

    new_v = KnnGraph(np.arange(ds.n_items + 1, dtype=np.int64), np.arange(ds.n_items, dtype=np.int64),
                     np.full(ds.n_items, 0.5, np.float32))
    g2 = replace_knn_relation(g, "v", new_v)

    # user–item relations and the other modality: same tensors, same edges
    assert g2.edges[UI].data["w"] is ui_w and g2.edges[IU].data["w"] is iu_w
    assert g2.edges[knn_etype("t")].data["w"] is t_w
    for before, after in ((ui_edges, edges_by_id(g2, UI)), (iu_edges, edges_by_id(g2, IU))):
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert g2.nodes["item"].data["x"] is g.nodes["item"].data["x"]
    # the replaced relation
    src, dst = g2.edges(etype=knn_etype("v"))
    assert torch.equal(src, dst) and torch.equal(src, torch.arange(ds.n_items))
    assert torch.all(g2.edges[knn_etype("v")].data["w"] == 0.5)
    h = torch.randn(ds.n_items, 3)
    torch.testing.assert_close(propagate(g2, knn_etype("v"), h), 0.5 * h)
    # the original graph is untouched, and new fields on g2 do not leak into it
    assert all(torch.equal(a, b) for a, b in zip(old_v, g.edges(etype=knn_etype("v"))))
    g2.edges[UI].data["extra"] = torch.zeros(g.num_edges(UI))
    assert "extra" not in g.edges[UI].data
    torch.testing.assert_close(propagate(g2, UI, torch.ones(ds.n_users, 2)),
                               propagate(g, UI, torch.ones(ds.n_users, 2)))


def test_bad_input(small):
    ds, knn = small
    with pytest.raises(ValueError, match="items"):
        build_heterograph(ds, {"v": normalize_knn(build_knn(np.eye(5, dtype=np.float32), 2, progress=False))})
    with pytest.raises(ValueError, match="n_users"):
        build_heterograph(SimpleNamespace(n_items=3, train=np.zeros((1, 2), np.int64)), {})
    bad = SimpleNamespace(n_users=2, n_items=3, train=np.array([[0, 5]]))
    with pytest.raises(ValueError, match="items must lie"):
        build_heterograph(bad, {})
    g = build_heterograph(ds, knn)
    with pytest.raises(ValueError, match="no relation"):
        replace_knn_relation(g, "a", knn["v"])
    with pytest.raises(ValueError, match="rows"):
        propagate(g, UI, torch.zeros(3, 2))


def test_lightgcn_layer_mean_and_its_hand_written_backward_equal_dense_autograd(small):
    """``lightgcn`` saves nothing for backward and uses Â's symmetry: check values and gradients in float64."""
    from dgmrec_dgl.models.lightgcn import lightgcn

    ds, knn = small
    g = build_heterograph(ds, knn)
    dense = torch.from_numpy(dense_bipartite_norm(ds))
    torch.manual_seed(0)
    e0 = torch.randn(ds.n_users + ds.n_items, 5, dtype=torch.float64)
    weights = torch.randn(ds.n_users + ds.n_items, 5, dtype=torch.float64)   # a non-symmetric loss

    def layer_mean(e):
        layers = [e]
        for _ in range(3):
            layers.append(dense @ layers[-1])
        return torch.stack(layers).mean(0)

    want = layer_mean(e0.requires_grad_())
    (want * weights).sum().backward()

    user = e0.detach()[:ds.n_users].float().requires_grad_()
    item = e0.detach()[ds.n_users:].float().requires_grad_()
    got_u, got_i = lightgcn(g, user, item, 3)
    torch.testing.assert_close(torch.cat([got_u, got_i]).double(), want.detach(), rtol=1e-5, atol=1e-6)
    # the layers past the first are scaled in place for their next hop; layer 0, the tables, is not
    assert torch.equal(torch.cat([user, item]).detach(), e0.detach().float())
    ((got_u * weights[:ds.n_users].float()).sum() + (got_i * weights[ds.n_users:].float()).sum()).backward()
    torch.testing.assert_close(torch.cat([user.grad, item.grad]).double(), e0.grad, rtol=1e-5, atol=1e-6)
    # an output that does not reach the loss contributes nothing
    user.grad = item.grad = None
    lightgcn(g, user, item, 3)[1].sum().backward()
    e0.grad = None
    layer_mean(e0)[ds.n_users:].sum().backward()
    torch.testing.assert_close(torch.cat([user.grad, item.grad]).double(), e0.grad, rtol=1e-5, atol=1e-6)
