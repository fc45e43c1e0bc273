"""The single DGL import point: dgl imports with torch 2.13, message passing matches dense torch."""

import sys

import torch

from dgmrec_dgl._dgl import dgl, fn, graphbolt_available, import_dgl


def test_import_is_idempotent_and_graphbolt_standin_is_explicit():
    assert import_dgl() is dgl
    gb = sys.modules["dgl.graphbolt"]
    if not graphbolt_available():
        try:
            gb.ItemSampler  # noqa: B018
        except ImportError as exc:
            assert "graphbolt" in str(exc).lower()
        else:  # pragma: no cover
            raise AssertionError("stand-in graphbolt must raise ImportError on use")


def test_weighted_update_all_on_heterograph_matches_dense_with_gradients():
    torch.manual_seed(0)
    n_users, n_items = 5, 7
    src = torch.tensor([0, 0, 1, 2, 3, 4, 4, 1])
    dst = torch.tensor([0, 3, 1, 2, 6, 5, 0, 6])
    g = dgl.heterograph(
        {("user", "interacts", "item"): (src, dst), ("item", "interacted_by", "user"): (dst, src)},
        num_nodes_dict={"user": n_users, "item": n_items},
    )
    h_user = torch.randn(n_users, 3, requires_grad=True)
    h_item = torch.randn(n_items, 3, requires_grad=True)
    w = torch.rand(len(src), requires_grad=True)
    g.nodes["user"].data["h"] = h_user
    g.nodes["item"].data["h"] = h_item
    g.edges["interacts"].data["w"] = w
    g.edges["interacted_by"].data["w"] = w
    g.update_all(fn.u_mul_e("h", "w", "m"), fn.sum("m", "out"), etype="interacts")
    g.update_all(fn.u_mul_e("h", "w", "m"), fn.sum("m", "out"), etype="interacted_by")
    out_item, out_user = g.nodes["item"].data["out"], g.nodes["user"].data["out"]
    loss = (out_item ** 2).sum() + (out_user * torch.arange(3.0)).sum()
    loss.backward()
    got = [h_user.grad.clone(), h_item.grad.clone(), w.grad.clone()]

    # dense reference: A[i, u] = w_e for edge u -> i
    hu, hi, wd = (t.detach().clone().requires_grad_(True) for t in (h_user, h_item, w))
    adj = torch.zeros(n_items, n_users).index_put((dst, src), wd, accumulate=True)
    ref_item, ref_user = adj @ hu, adj.T @ hi
    assert torch.allclose(out_item, ref_item, atol=1e-6)
    assert torch.allclose(out_user, ref_user, atol=1e-6)
    ((ref_item ** 2).sum() + (ref_user * torch.arange(3.0)).sum()).backward()
    for a, b in zip(got, [hu.grad, hi.grad, wd.grad]):
        assert torch.allclose(a, b, atol=1e-5)
