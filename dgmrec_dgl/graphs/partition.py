"""Partitions of the user–item–kNN heterograph for DistDGL (``dgl.distributed.partition_graph``).

``dgmrec-dgl partition DATA --parts N --out DIR`` writes what DistDGL's graph servers load and its trainers
read through :class:`dgl.distributed.DistGraph`:

* the graph of :func:`~.hetero.build_heterograph`: ``('user', 'interacts', 'item')``,
  ``('item', 'interacted_by', 'user')`` (the train interactions) and one ``('item', 'knn_<m>', 'item')``
  per modality (the normalised kNN graphs of Eq. 4, :func:`~.knn.modality_knn_graphs`), edge field ``w``
  on every relation and node field ``norm`` on both node types, as the single-machine models use them;
* the node data the models read per item: ``feat_<m>`` (the raw modality rows, missing rows imputed as
  the dataset says; float32 or float16 as loaded) and ``present_<m>`` (uint8, 1 where the item has
  modality m: the missing-modality mask).

DGL renumbers the nodes so that each part owns a contiguous id range per node type; ``DIR/orig_ids.npz``
maps them back (``orig_ids[ntype][new_id] = dataset id``). ``DIR/<name>.json`` is DGL's partition config
(the file ``DistGraph``, the servers and ``load_partition`` read), ``DIR/part<i>/`` the parts, and
``DIR/partition_summary.json`` this module's record of the inputs and of every part (see
:func:`summarize_partitions`). Everything is written into a temporary folder beside ``DIR`` and moved into
place when complete, so an interrupted run leaves no half-written partition.

Assignment (``method``). ``metis``: DGL converts the heterograph to a homogeneous one and runs METIS with
one balance constraint per node type (DGL does this for every heterograph) and, with
``balance_edges=True``, one more per node type on the in-degrees: the users' in-edges are exactly their
``interacted_by`` train edges, the items' in-edges their ``interacts`` train edges plus their kNN row
(k entries, or one self-loop for an item missing the modality), so both directions of the train edges are
balanced across parts while the edge cut is minimised. METIS works on this heterograph with DGL 2.1 here
(``tests/test_partition.py``); there is no fallback. Its assignment is not reproducible, though: DGL 2.1's
METIS gave different parts for the same graph call after call (train edges max/mean 1.01-1.07 over runs on
the test set), so partition once and copy the folder to every machine. ``random``: every node is assigned
uniformly at random by DGL's generator (seeded: the same ``seed`` gives the same parts), balanced only in
expectation, with a larger edge cut (a mean cut share of ~0.69 against METIS's ~0.45 at 4 parts there).

DGL needs every part to own at least one node of each type and one edge of each relation; a split that
cannot give that (too many parts for the graph) is refused with a :class:`~dgmrec_dgl.errors.DataError`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import warnings

import numpy as np
import torch

from .._dgl import dgl
from ..errors import DataError
from ..io_utils import atomic_folder, atomic_path, atomic_write_json
from .hetero import IU, UI, build_heterograph
from .knn import modality_knn_graphs

__all__ = ["ID_MAP", "METHODS", "SUMMARY", "format_summary", "partition_dataset", "partition_graph_of",
           "summarize_partitions"]

METHODS = ("metis", "random")
SUMMARY = "partition_summary.json"
ID_MAP = "orig_ids.npz"
TRAIN_RELATIONS = (UI, IU)
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _etype_str(etype: tuple[str, str, str]) -> str:
    """DGL's spelling of a canonical edge type in partition files: ``user:interacts:item``."""
    return ":".join(etype)


def partition_graph_of(dataset, knn_graphs: dict) -> dgl.DGLGraph:
    """The heterograph to partition: :func:`~.hetero.build_heterograph` plus the items' node data.

    Args:
        dataset: a :class:`~dgmrec_dgl.data.dataset.Dataset` (``features`` [n_items, d_m], ``present`` bool
            [n_items] per modality).
        knn_graphs: modality -> normalised :class:`~.knn.KnnGraph` [n_items, n_items].

    Returns:
        the graph, with every sparse format allowed (``partition_graph`` needs COO) and item fields
        ``feat_<m>`` [n_items, d_m], ``present_<m>`` uint8 [n_items].
    """
    g = build_heterograph(dataset, knn_graphs).formats(["coo", "csr", "csc"])
    for m in dataset.modalities:
        # np.array copies: the features may be a read-only memory map, which torch would only wrap
        g.nodes["item"].data[f"feat_{m}"] = torch.from_numpy(np.array(dataset.features[m]))
        g.nodes["item"].data[f"present_{m}"] = torch.from_numpy(np.asarray(dataset.present[m], dtype=np.uint8))
    return g


def _check_request(dataset, parts: int, method: str, name: str) -> None:
    if method not in METHODS:
        raise DataError("<command line>", "--method", f"{method!r} is not a partition method",
                        f"use one of {', '.join(METHODS)}")
    if not isinstance(parts, int) or parts < 1:
        raise DataError("<command line>", "--parts", f"{parts!r} is not an integer >= 1", "give an integer >= 1")
    if not _NAME.fullmatch(name):
        raise DataError("<command line>", "--name", f"{name!r} is not a graph name",
                        "use letters, digits, '_' and '-' only (DistDGL names shared memory after it)")
    smallest = min(dataset.n_users, dataset.n_items)
    if parts > smallest:
        raise DataError(dataset.root, "--parts", f"{parts} parts for {dataset.n_users:,} users and "
                        f"{dataset.n_items:,} items: every part must own users and items",
                        f"use at most {smallest:,} parts (far fewer in practice)")


def _previous_partition(out: str, overwrite: bool) -> list[str]:
    """The entries of an earlier partition in ``out`` to replace (none for a new or empty folder).

    Anything else is refused: a folder holding other files, or a partition folder without ``overwrite``.
    """
    if not os.path.exists(out):
        return []
    if not os.path.isdir(out):
        raise DataError(out, "--out", "is an existing file, not a folder", "name a new or empty folder")
    entries = os.listdir(out)
    if not entries:
        return []
    summary = os.path.join(out, SUMMARY)
    if not overwrite:
        raise DataError(out, "--out", f"is not empty ({len(entries)} entries)",
                        "name a new or empty folder, or pass --overwrite to replace the partition in it")
    if not os.path.isfile(summary):
        raise DataError(out, "--out", f"holds no {SUMMARY}, so it is not a partition folder to overwrite",
                        "name a new or empty folder")
    with open(summary) as fh:
        written = json.load(fh).get("files", [])
    return [e for e in written if isinstance(e, str) and e not in ("", ".", "..") and os.path.basename(e) == e]


def partition_dataset(dataset, out: str | os.PathLike, parts: int, *, method: str = "metis", knn_k: int = 10,
                      knn_index: str = "auto", seed: int = 0, name: str | None = None, mask: str | None = None,
                      overwrite: bool = False, progress: bool = False) -> dict:
    """Build the heterograph of ``dataset``, split it into ``parts`` DistDGL partitions in ``out``.

    Args:
        dataset: the :class:`~dgmrec_dgl.data.dataset.Dataset` (its mask, if any, already applied).
        out: the output folder: new, empty, or (with ``overwrite``) one this function wrote before.
        parts: number of partitions (one graph server each).
        method: ``metis`` or ``random`` (module docstring).
        knn_k, knn_index: the kNN graphs (``model.knn_k``, ``model.knn_index`` of the training config).
        seed: seeds the kNN index (IVF) and the random assignment.
        name: the graph name ``DistGraph`` is opened with (default: the dataset's name).
        mask: the mask file ``dataset`` was loaded with (recorded in the summary).
        overwrite: replace the partition files of an earlier run in ``out`` (only those).
        progress: DGL's progress lines on stderr (else they are dropped).

    Returns:
        the summary (also written to ``out/partition_summary.json``), see :func:`summarize_partitions`.

    Raises:
        DataError: a bad ``parts``, ``method`` or ``name``; ``out`` not usable; a split DGL cannot make.
    """
    out = os.path.abspath(os.fspath(out))
    name = dataset.name if name is None else name
    _check_request(dataset, parts, method, name)
    previous = _previous_partition(out, overwrite)
    knn = modality_knn_graphs({m: dataset.features[m] for m in dataset.modalities}, dataset.present, knn_k,
                              index=knn_index, seed=seed, progress=progress)
    g = partition_graph_of(dataset, knn)
    with atomic_folder(out, replace=previous) as tmp:
        orig_nids = _split(g, name, parts, method, seed, tmp, progress, dataset.root)
        with atomic_path(os.path.join(tmp, ID_MAP), suffix=".npz") as path:
            np.savez(path, **{nt: ids.numpy() for nt, ids in orig_nids.items()})
        inputs = {"dataset": _describe(dataset, mask), "method": method, "balance_edges": True,
                  "knn_k": int(knn_k), "knn_index": knn_index, "seed": int(seed)}
        summary = summarize_partitions(os.path.join(tmp, f"{name}.json"), inputs)
        atomic_write_json(os.path.join(tmp, SUMMARY), summary)
    return summary


def _split(g, name: str, parts: int, method: str, seed: int, folder: str, progress: bool, root: str) -> dict:
    """``dgl.distributed.partition_graph`` into ``folder``; returns ntype -> [n] dataset id of each new id."""
    dgl.seed(seed)
    try:
        # DGL prints its progress (and leaves /proc/self/status open each time it reads its peak memory)
        with contextlib.redirect_stdout(sys.stderr if progress else io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            orig_nids, _ = dgl.distributed.partition_graph(g, name, parts, folder, part_method=method,
                                                           balance_edges=True, return_mapping=True)
    except (IndexError, RuntimeError, AssertionError, dgl.DGLError) as exc:
        raise DataError(root, "--parts", f"DGL cannot split this graph into {parts} parts with {method} "
                        "(every part must own a node of each type and an edge of each relation; "
                        f"DGL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})", "use fewer parts") from exc
    return orig_nids


def _describe(dataset, mask: str | None) -> dict:
    """What the partition was made from, for the summary."""
    return {"root": os.path.abspath(dataset.root), "name": dataset.name,
            "mask": os.path.abspath(mask) if mask else None, "imputation": dataset.imputation,
            "n_users": int(dataset.n_users), "n_items": int(dataset.n_items), "n_train": int(len(dataset.train)),
            "modalities": {m: int(dataset.features[m].shape[1]) for m in dataset.modalities},
            "missing": {m: int((~dataset.present[m]).sum()) for m in dataset.modalities}}


def _read_config(config_path: str) -> dict:
    if not os.path.isfile(config_path):
        raise DataError(config_path, "partition config", "does not exist",
                        "pass the <name>.json that `dgmrec-dgl partition` wrote")
    try:
        with open(config_path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(config_path, "partition config", f"cannot be read as JSON ({exc})",
                        "re-run `dgmrec-dgl partition`") from None
    for key in ("graph_name", "num_parts", "ntypes", "etypes"):
        if key not in config:
            raise DataError(config_path, key, "is missing: not a DGL partition config",
                            "pass the <name>.json that `dgmrec-dgl partition` wrote")
    folder = os.path.dirname(config_path)
    for part in range(int(config["num_parts"])):
        files = config.get(f"part-{part}")
        if not isinstance(files, dict):
            raise DataError(config_path, f"part-{part}", "is missing", "re-run `dgmrec-dgl partition`")
        for kind in ("part_graph", "node_feats", "edge_feats"):
            path = os.path.join(folder, files.get(kind, ""))
            if not os.path.isfile(path):
                raise DataError(path, f"part-{part} {kind}", "does not exist",
                                "copy the whole partition folder, or re-run `dgmrec-dgl partition`")
    return config


def summarize_partitions(config_path: str | os.PathLike, inputs: dict | None = None) -> dict:
    """What each part of a partition holds: owned nodes and edges, halo, bytes on disk.

    Args:
        config_path: DGL's partition config ``<name>.json``.
        inputs: what the partition was made from (recorded as is; ``partition_dataset`` passes it).

    Returns:
        a JSON-ready dict: ``graph_name``, ``num_parts``, ``files`` (entries of the folder the partition
        wrote), ``parts`` (one dict per part: ``nodes`` owned per node type, ``halo_nodes`` per node type,
        ``halo_share`` = halo / stored nodes, ``edges`` owned per relation, ``cut_share`` = share of the owned
        edges whose source node another part owns (what sampling reads remotely), ``train_edges`` = owned
        ``interacts`` + ``interacted_by`` edges, ``stored_edges``, ``bytes`` per file and ``total_bytes``)
        and ``balance`` (max / mean over the parts of owned train edges, users and items).

    Raises:
        DataError: the config or a part's file is missing or unreadable.
    """
    config_path = os.path.abspath(os.fspath(config_path))
    config = _read_config(config_path)
    folder = os.path.dirname(config_path)
    ntypes = {int(i): nt for nt, i in config["ntypes"].items()}
    etypes = {int(i): et for et, i in config["etypes"].items()}
    train = [_etype_str(r) for r in TRAIN_RELATIONS]
    rows = []
    for part in range(int(config["num_parts"])):
        with contextlib.redirect_stdout(io.StringIO()):
            g = dgl.distributed.load_partition(config_path, part, load_feats=False)[0]
        inner = g.ndata["inner_node"].bool()
        node_type = g.ndata[dgl.NTYPE].long()
        owned_edges = g.edata["inner_edge"].bool()
        edge_type = g.edata[dgl.ETYPE].long()
        nodes = {nt: int((inner & (node_type == i)).sum()) for i, nt in sorted(ntypes.items())}
        halo = {nt: int((~inner & (node_type == i)).sum()) for i, nt in sorted(ntypes.items())}
        edges = {et: int((owned_edges & (edge_type == i)).sum()) for i, et in sorted(etypes.items())}
        remote = owned_edges & ~inner[g.edges()[0]]     # owned edges whose source another part owns
        files = config[f"part-{part}"]
        sizes = {kind: os.path.getsize(os.path.join(folder, files[kind]))
                 for kind in ("part_graph", "node_feats", "edge_feats")}
        rows.append({"part": part, "nodes": nodes, "halo_nodes": halo,
                     "halo_share": sum(halo.values()) / max(g.num_nodes(), 1), "edges": edges,
                     "cut_share": int(remote.sum()) / max(int(owned_edges.sum()), 1),
                     "train_edges": sum(edges.get(et, 0) for et in train), "stored_edges": int(g.num_edges()),
                     "bytes": sizes, "total_bytes": sum(sizes.values())})

    def spread(values):
        return max(values) / (sum(values) / len(values)) if sum(values) else 1.0

    entries = [os.path.basename(config_path), ID_MAP, SUMMARY] + sorted(
        {os.path.normpath(config[f"part-{p}"]["part_graph"]).split(os.sep)[0] for p in range(len(rows))})
    return {"graph_name": config["graph_name"], "num_parts": len(rows), "part_config": os.path.basename(config_path),
            "id_map": ID_MAP, "files": entries, **(inputs or {}), "parts": rows,
            "balance": {"train_edges": spread([r["train_edges"] for r in rows]),
                        **{nt: spread([r["nodes"][nt] for r in rows]) for nt in ntypes.values()}}}


def format_summary(summary: dict) -> str:
    """The per-part table ``dgmrec-dgl partition`` prints."""
    knn = [et for et in summary["parts"][0]["edges"] if et.split(":")[1].startswith("knn_")]
    lines = [f"{'part':>4} {'users':>10} {'items':>10} {'train edges':>12} {'kNN edges':>11} "
             f"{'cut share':>9} {'halo share':>10} {'MB':>9}"]
    for row in summary["parts"]:
        lines.append(f"{row['part']:>4} {row['nodes'].get('user', 0):>10,} {row['nodes'].get('item', 0):>10,} "
                     f"{row['train_edges']:>12,} {sum(row['edges'][et] for et in knn):>11,} "
                     f"{row['cut_share']:>9.3f} {row['halo_share']:>10.3f} {row['total_bytes'] / 1e6:>9.2f}")
    balance = summary["balance"]
    lines.append(f"max/mean over parts: train edges {balance['train_edges']:.3f}, users {balance['user']:.3f}, "
                 f"items {balance['item']:.3f}; cut share: owned edges whose source another part owns; "
                 "halo share: stored nodes another part owns")
    return "\n".join(lines)
