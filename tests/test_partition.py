"""`dgmrec-dgl partition`: DistDGL partitions of the user–item–kNN heterograph (dgmrec_dgl.graphs.partition)."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import assert_rejected, run_cli

from dgmrec_dgl._dgl import dgl
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.graphs.hetero import IU, UI, build_heterograph
from dgmrec_dgl.graphs.knn import modality_knn_graphs
from dgmrec_dgl.graphs.partition import ID_MAP, SUMMARY, partition_dataset, summarize_partitions

KNN_K = 5


@pytest.fixture(scope="module")
def masked(masked_sparse):
    """(dataset, mask file): the sparse synthetic set with 40% of its items missing a modality."""
    return masked_sparse[0], str(masked_sparse[1])


@pytest.fixture(scope="module")
def metis4(masked, tmp_path_factory):
    """Four METIS parts of the masked set: (summary, folder, the keyword arguments DGL's partition_graph got)."""
    out = tmp_path_factory.mktemp("metis4") / "parts"
    calls = []
    real = dgl.distributed.partition_graph

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dgl.distributed, "partition_graph", spy)
        summary = partition_dataset(masked[0], out, 4, method="metis", knn_k=KNN_K, mask=masked[1])
    return summary, out, calls


def reassemble(folder, summary):
    """Every part's owned node data and edges in dataset ids: ({(ntype, field): array}, {etype: {(u, v): w}})."""
    config = os.path.join(folder, summary["part_config"])
    orig = dict(np.load(os.path.join(folder, ID_MAP)))
    nodes, edges = {}, {}
    for part in range(summary["num_parts"]):
        g, node_feats, edge_feats, gpb, _, ntypes, etypes = dgl.distributed.load_partition(config, part)
        for key, value in node_feats.items():
            ntype, field = key.split("/")
            ids = orig[ntype][gpb.partid2nids(part, ntype).numpy()]
            table = nodes.setdefault((ntype, field), {})
            table.update(zip(ids.tolist(), value.numpy()))
        owned = g.edata["inner_edge"].bool()
        src, dst = (g.ndata[dgl.NID][x][owned] for x in g.edges())
        etype_ids = g.edata[dgl.ETYPE][owned]
        for etype in etypes:
            mine = etype_ids == gpb.canonical_etypes.index(etype)
            s_type, s_ids = gpb.map_to_per_ntype(src[mine])
            d_type, d_ids = gpb.map_to_per_ntype(dst[mine])
            u = orig[etype[0]][s_ids.numpy()]
            v = orig[etype[2]][d_ids.numpy()]
            w = edge_feats[":".join(etype) + "/w"].numpy()
            assert len(w) == len(u)
            edges.setdefault(etype, {}).update(zip(zip(u.tolist(), v.tolist()), w.tolist()))
    return nodes, edges


def test_parts_hold_the_graph_and_the_item_data(masked, metis4):
    ds, _ = masked
    summary, folder, _ = metis4
    nodes, edges = reassemble(folder, summary)
    for m in ds.modalities:
        feat, present = nodes[("item", f"feat_{m}")], nodes[("item", f"present_{m}")]
        assert sorted(feat) == list(range(ds.n_items))
        np.testing.assert_array_equal(np.stack([feat[i] for i in range(ds.n_items)]), ds.features[m])
        np.testing.assert_array_equal(np.array([present[i] for i in range(ds.n_items)]), ds.present[m])
    assert not all(ds.present[m].all() for m in ds.modalities)      # the mask reached the node data
    # the relations, edge by edge with their weights, are the single-machine heterograph's
    knn = modality_knn_graphs({m: ds.features[m] for m in ds.modalities}, ds.present, KNN_K)
    g = build_heterograph(ds, knn).formats(["coo", "csc"])     # (its user–item relations keep CSC only)
    for etype in g.canonical_etypes:
        u, v = (x.numpy() for x in g.edges(etype=etype))
        want = dict(zip(zip(u.tolist(), v.tolist()), g.edges[etype].data["w"].numpy().tolist()))
        assert edges[etype] == want, etype
    for ntype in ("user", "item"):
        norm = nodes[(ntype, "norm")]
        np.testing.assert_array_equal(np.stack([norm[i] for i in range(g.num_nodes(ntype))]),
                                      g.nodes[ntype].data["norm"].numpy())


def test_summary_counts_balance_and_file(masked, metis4):
    ds, _ = masked
    summary, folder, calls = metis4
    assert json.loads((folder / SUMMARY).read_text()) == summary
    rows = summary["parts"]
    assert len(rows) == 4 and summary["method"] == "metis" and summary["knn_k"] == KNN_K
    assert sum(r["nodes"]["user"] for r in rows) == ds.n_users
    assert sum(r["nodes"]["item"] for r in rows) == ds.n_items
    n_train = len(np.unique(ds.train, axis=0))
    assert sum(r["train_edges"] for r in rows) == 2 * n_train
    for r in rows:
        assert r["train_edges"] == r["edges"][":".join(UI)] + r["edges"][":".join(IU)]
        assert 0 < r["halo_share"] < 1 and 0 < r["cut_share"] < 1
        sizes = {kind: os.path.getsize(folder / f"part{r['part']}" / name) for kind, name in
                 (("part_graph", "graph.dgl"), ("node_feats", "node_feat.dgl"), ("edge_feats", "edge_feat.dgl"))}
        assert r["bytes"] == sizes and r["total_bytes"] == sum(sizes.values())
    # METIS gets the edge constraint. Its assignment is not reproducible here (DGL 2.1: the same graph gave
    # different parts call after call), so the balance it reaches varies: train edges max/mean measured
    # 1.01-1.07 with the constraint and 1.06-1.12 without; only a loose bound is safe to assert.
    assert [(c["part_method"], c["balance_edges"]) for c in calls] == [("metis", True)]
    assert summary["balance"]["train_edges"] < 1.25
    assert summary["dataset"]["missing"] == {m: int((~ds.present[m]).sum()) for m in ds.modalities}
    assert sorted(os.listdir(folder)) == sorted(summary["files"])


def test_metis_cuts_fewer_edges_than_random_and_random_follows_the_seed(masked, metis4, tmp_path):
    ds, _ = masked
    metis = metis4[0]
    random = [partition_dataset(ds, tmp_path / f"r{i}", 4, method="random", knn_k=KNN_K, seed=seed)
              for i, seed in enumerate((1, 1, 2))]

    def cut(summary):
        return np.mean([r["cut_share"] for r in summary["parts"]])

    assert cut(metis) < cut(random[0]) - 0.1       # measured: 0.44-0.45 and 0.68-0.70
    maps = [dict(np.load(tmp_path / f"r{i}" / ID_MAP)) for i in range(3)]
    np.testing.assert_array_equal(maps[0]["item"], maps[1]["item"])
    assert not np.array_equal(maps[0]["item"], maps[2]["item"])


def test_overwrite_replaces_only_the_partition(masked, tmp_path):
    ds, _ = masked
    out = tmp_path / "parts"
    partition_dataset(ds, out, 3, method="random", knn_k=KNN_K)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="--overwrite"):
        partition_dataset(ds, out, 2, method="random", knn_k=KNN_K)
    summary = partition_dataset(ds, out, 2, method="random", knn_k=KNN_K, overwrite=True)
    assert summary["num_parts"] == 2
    assert sorted(os.listdir(out)) == sorted(summary["files"] + ["notes.txt"])     # part2/ is gone
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".tmp-")]


def test_missing_partition_files_are_named(masked, tmp_path):
    ds, _ = masked
    summary = partition_dataset(ds, tmp_path / "parts", 2, method="random", knn_k=KNN_K)
    config = tmp_path / "parts" / summary["part_config"]
    (tmp_path / "parts" / "part1" / "node_feat.dgl").unlink()
    with pytest.raises(DataError, match=r"part1/node_feat\.dgl: part-1 node_feats: does not exist"):
        summarize_partitions(config)
    with pytest.raises(DataError, match="partition config: does not exist"):
        summarize_partitions(tmp_path / "parts" / "other.json")


def test_cli_prints_the_table_and_writes(sparse_dir, tmp_path, capsys):
    from dgmrec_dgl.cli import main

    assert main(["partition", str(sparse_dir), "--parts", "2", "--out", str(tmp_path / "p"), "--knn-k", "3",
                 "--method", "random", "--quiet", "--name", "g1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["part", "users", "items"] and len(out) == 5
    summary = json.loads((tmp_path / "p" / SUMMARY).read_text())
    assert summary["graph_name"] == "g1" and summary["knn_k"] == 3 and (tmp_path / "p" / "g1.json").exists()
    users = [int(line.split()[1].replace(",", "")) for line in out[1:3]]
    assert users == [r["nodes"]["user"] for r in summary["parts"]]


@pytest.mark.parametrize("argv, culprits", [
    (["partition", "{missing}", "--parts", "2", "--out", "{out}"], ["{missing}", "folder"]),
    (["partition", "{data}", "--parts", "0", "--out", "{out}"], ["--parts", "'0'"]),
    (["partition", "{data}", "--parts", "-1", "--out", "{out}"], ["--parts"]),
    (["partition", "{data}", "--parts", "2", "--out", "{out}", "--method", "spectral"], ["--method"]),
    (["partition", "{tiny}", "--parts", "7", "--out", "{out}"], ["--parts", "at most 6"]),
    (["partition", "{tiny}", "--parts", "5", "--out", "{out}", "--knn-k", "2"], ["--parts", "fewer parts"]),
    (["partition", "{data}", "--parts", "2", "--out", "{out}", "--name", "a/b"], ["--name"]),
])
def test_bad_input_is_one_line(sparse_dir, tiny_dir, tmp_path, capsys, argv, culprits):
    names = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "data": str(sparse_dir),
             "tiny": str(tiny_dir)}
    code, lines = run_cli(capsys, [a.format(**names) for a in argv] + ["--quiet"])
    assert_rejected(code, lines, *(c.format(**names) for c in culprits))
    assert not (tmp_path / "out").exists()
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".tmp-")]


def test_node_data_keeps_float16_features(tmp_path, sparse_dir):
    loaded = Dataset.load(sparse_dir)
    ds = dataclasses.replace(loaded, features={m: np.asarray(x, np.float16) for m, x in loaded.features.items()})
    summary = partition_dataset(ds, tmp_path / "p", 1, knn_k=KNN_K)
    _, feats, *_ = dgl.distributed.load_partition(str(tmp_path / "p" / summary["part_config"]), 0)
    assert feats["item/feat_image"].dtype == torch.float16
    np.testing.assert_array_equal(feats["item/feat_image"].numpy(), ds.features["image"])
