"""DistDGL's side of distributed training: graph servers, a trainer's ``DistGraph``, its share of the train edges.

One process per role, as DGL's ``tools/launch.py`` starts them (environment variables ``DGL_ROLE``,
``DGL_SERVER_ID``, ``DGL_NUM_SERVER``, ``DGL_NUM_CLIENT``, ``DGL_IP_CONFIG``, ``DGL_CONF_PATH``):

* :func:`serve`: a graph server of one partition (``DGL_ROLE=server``); returns only when the trainers
  shut the servers down.
* :func:`connect`: a trainer's connection to every server and its :class:`dgl.distributed.DistGraph`.
  Trainer r works for partition r (one trainer per partition: ``torch.distributed`` rank r on machine r).
* :func:`own_train_edges`: the partition's train interactions, the ``interacts`` in-edges of the items the
  partition owns (DGL assigns an edge to the part of its destination), drawn by DGL's distributed sampler
  with every neighbour; :func:`user_histories`: every train item of some users (their ``interacted_by``
  in-edges), for the negatives' rejection.

Several partitions on one host (``dgmrec-dgl dist-launch``): every server and trainer plays the machine
of its part (:func:`dgmrec_dgl._dgl.play_machine`, chosen by the environment variables it names); the
servers then keep the graph structure out of shared memory (``disable_shared_mem``), so a trainer reads
its own part's structure over loopback like every other part's, and gets its partition book from the
partition config (:func:`dgl.distributed.load_partition_book`) instead of from shared memory.
"""

from __future__ import annotations

import os

import torch

from dgmrec_dgl._dgl import dgl, play_machine, played_machine
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.graphs.hetero import IU, UI, knn_etype
from dgmrec_dgl.graphs.sampling import relation_fanouts

__all__ = ["KNN_IDS", "KNN_WEIGHTS", "block_from_rows", "connect", "knn_edges", "knn_row_blocks", "own_nodes",
           "own_train_edges", "pack_knn_rows", "read_ip_config", "sample_relation", "serve", "user_histories"]

#: seeds per distributed sampling request when a trainer reads whole neighbourhoods
CHUNK = 65536


def read_ip_config(path: str, parts: int) -> list[tuple[str, int]]:
    """The ``(address, port)`` of each graph server: one ``IP PORT`` line per partition, machine i on line i.

    Raises:
        DataError: the file is missing or unreadable, a line is not ``IP PORT``, or the line count is not
            the partition count (DistDGL runs one machine, with its graph server, per partition).
    """
    try:
        with open(path) as fh:
            lines = [line.split() for line in fh if line.strip()]
    except OSError as exc:
        raise DataError(path, "--ip-config", f"cannot be read ({exc.strerror})",
                        "pass a file with one 'IP PORT' line per partition") from None
    servers = []
    for number, fields in enumerate(lines, 1):
        if len(fields) != 2 or not fields[1].isdigit() or not 0 < int(fields[1]) < 65536:
            raise DataError(path, f"line {number}", f"{' '.join(fields)!r} is not 'IP PORT'",
                            "write one 'IP PORT' line per partition, e.g. '10.0.0.1 30050'")
        servers.append((fields[0], int(fields[1])))
    if len(servers) != parts:
        raise DataError(path, "--ip-config", f"lists {len(servers)} machines for {parts} partitions",
                        f"give {parts} lines, one 'IP PORT' per partition (machine i serves partition i)")
    return servers


def serve(part_config: str, ip_config: str) -> None:
    """Serve one partition as DGL's launcher asks (``DGL_ROLE=server`` and the ``DGL_*`` variables it sets).

    Returns when the trainers shut the servers down. Under :func:`~dgmrec_dgl._dgl.played_machine`
    (several parts on one host) the server plays its part's machine and keeps the graph out of shared memory.
    """
    host = played_machine()
    if host is None:
        dgl.distributed.initialize(ip_config)       # DGL_ROLE=server: serves, then exits the process
        return
    play_machine(*host)
    server = dgl.distributed.DistGraphServer(
        int(os.environ["DGL_SERVER_ID"]), ip_config, int(os.environ.get("DGL_NUM_SERVER", "1")),
        int(os.environ["DGL_NUM_CLIENT"]), part_config, disable_shared_mem=True, graph_format=["csc"])
    server.start()


def connect(part_config: str, ip_config: str, graph_name: str):
    """This trainer's :class:`dgl.distributed.DistGraph` (after ``dgl.distributed.initialize``)."""
    host = played_machine()
    if host is not None:
        play_machine(*host)
    dgl.distributed.initialize(ip_config)
    book = None if host is None else dgl.distributed.load_partition_book(part_config, host[0])[0]
    return dgl.distributed.DistGraph(graph_name, gpb=book)


def own_nodes(g, ntype: str) -> torch.Tensor:
    """The ids (DGL's numbering) of the ``ntype`` nodes this trainer's partition owns: one contiguous range."""
    book = g.get_partition_book()
    return book.partid2nids(book.partid, ntype)


def _in_edges(g, ntype: str, relation, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every in-edge ``(src, dst, edge id)`` of ``relation`` into ``nodes``, drawn in chunks by DGL's distributed
    sampler."""
    fanouts = relation_fanouts(g, {relation}, -1)
    src, dst, eid = [], [], []
    for start in range(0, len(nodes), CHUNK):
        frontier = dgl.distributed.sample_etype_neighbors(g, {ntype: nodes[start:start + CHUNK]}, fanouts)
        s, d = frontier.edges(etype=relation)
        src.append(s)
        dst.append(d)
        eid.append(frontier.edges[relation].data[dgl.EID])
    return (torch.cat(src), torch.cat(dst), torch.cat(eid)) if src else (torch.zeros(0, dtype=torch.int64),) * 3


def own_train_edges(g) -> tuple[torch.Tensor, torch.Tensor]:
    """``(users, items)``: the train interactions this trainer's partition owns, sorted by item then user."""
    users, items, _ = _in_edges(g, "item", UI, own_nodes(g, "item"))
    order = torch.argsort(items * g.num_nodes("user") + users)
    return users[order], items[order]


def user_histories(g, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(indptr [len(users)+1], indices)`` of every train item of ``users`` (distinct, sorted), row i
    for ``users[i]``, items ascending: what the BPR negatives are drawn outside of."""
    items, dst, _ = _in_edges(g, "user", IU, users)
    row = torch.searchsorted(users, dst)
    order = torch.argsort(row * g.num_nodes("item") + items)
    counts = torch.bincount(row, minlength=len(users))
    indptr = torch.zeros(len(users) + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, items[order]


# ---------------------------------------------------------------------- kNN relations as fixed-width rows
#: node fields of the kNN rows of modality m (``DistTensor`` s the trainers write at start; Eq. 16 rewrites them)
KNN_IDS, KNN_WEIGHTS = "knn_ids_{}", "knn_w_{}"


def knn_edges(g, modality: str, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(src, dst, w)``: every in-edge of ``knn_<modality>`` into ``items`` with its weight (Eq. 4's S^m_{dst,src}),
    read with DGL's distributed sampler at fanout -1 on that relation only."""
    relation = knn_etype(modality)
    src, dst, eid = _in_edges(g, "item", relation, items)
    return src, dst, (g.edges[relation].data["w"][eid] if len(eid) else torch.zeros(0))


def pack_knn_rows(src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor, items: torch.Tensor,
                  width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kNN rows of ``items`` [n] as fixed-width arrays: ``(ids [n, width] int64, weights [n, width] float32)``.

    Row r holds the sources of the edges ``src -> items[r]`` in ascending id order, padded with id -1 and
    weight 0. A row longer than ``width`` keeps its ``width`` largest weights (a refined row past the cap).
    """
    row = torch.searchsorted(items, dst)
    keep = torch.ones(len(src), dtype=torch.bool)
    counts = torch.bincount(row, minlength=len(items))
    if len(counts) and int(counts.max()) > width:
        order = torch.argsort(w, descending=True, stable=True)
        order = order[torch.argsort(row[order], stable=True)]           # by row, largest weight first
        rank = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        keep[order[rank >= width]] = False
        src, row, w = src[keep], row[keep], w[keep]
    order = torch.argsort(row * (int(src.max()) + 1 if len(src) else 1) + src)
    src, row, w = src[order], row[order], w[order]
    counts = torch.bincount(row, minlength=len(items))
    slot = torch.arange(len(src)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    ids = torch.full((len(items), width), -1, dtype=torch.int64)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    ids[row, slot] = src
    weights[row, slot] = w.to(torch.float32)
    return ids, weights


def block_from_rows(modality: str, dst: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """A ``knn_<modality>`` block onto items ``dst`` [n] from their fixed-width rows (``ids``, ``weights``
    [n, width], id -1 = padding), built with ``dgl.create_block``.

    As :func:`~.blocks.relation_block`: destination items first among the sources (then the other sources
    in ascending id order), global ids in ``dgl.NID``, edge field ``w``, so one
    :func:`~.hetero.propagate` on it is one step ``h <- S^m h`` at ``dst``.
    """
    filled = ids >= 0
    src_global = ids[filled]
    dst_local = torch.arange(len(dst)).unsqueeze(1).expand_as(ids)[filled]
    others = torch.unique(src_global)
    others = others[~torch.isin(others, dst)]
    src_nodes = torch.cat([dst, others])
    order = torch.argsort(src_nodes)
    src_local = order[torch.searchsorted(src_nodes[order], src_global)]
    etype = knn_etype(modality)
    block = dgl.create_block({etype: (src_local, dst_local)}, num_src_nodes={"item": len(src_nodes)},
                             num_dst_nodes={"item": len(dst)}, idtype=torch.int64)
    block.srcnodes["item"].data[dgl.NID] = src_nodes
    block.dstnodes["item"].data[dgl.NID] = dst
    block.edges[etype].data["w"] = weights[filled]
    return block


def knn_row_blocks(g, modality: str, seeds: torch.Tensor, n_layers: int) -> list:
    """:func:`~.blocks.knn_blocks` on a ``DistGraph``: the ``n_layers`` kNN blocks seeded by ``seeds``, every
    neighbour, read from the fixed-width rows of node fields ``knn_ids_<m>`` / ``knn_w_<m>`` (a ``DistGraph``'s
    structure cannot change, and Eq. 16 changes the kNN rows, so they live in ``DistTensor`` s)."""
    data = g.nodes["item"].data
    ids, weights = data[KNN_IDS.format(modality)], data[KNN_WEIGHTS.format(modality)]
    blocks = []
    dst = torch.as_tensor(seeds, dtype=torch.int64)
    for _ in range(n_layers):
        block = block_from_rows(modality, dst, ids[dst], weights[dst])
        blocks.insert(0, block)
        dst = block.srcnodes["item"].data[dgl.NID]
    return blocks


def sample_relation(g, etype, dst: torch.Tensor, fanout: int):
    """:func:`~.sampling.sample_one_hop` on a ``DistGraph``: DGL's distributed sampler with a fanout per
    relation (``sample_etype_neighbors``; ``sample_neighbors`` with one int would draw over all relations
    together), then the block of ``etype`` onto ``dst``."""
    etype = g.to_canonical_etype(etype)
    dst = torch.as_tensor(dst, dtype=torch.int64)
    frontier = dgl.distributed.sample_etype_neighbors(g, {etype[2]: dst}, relation_fanouts(g, {etype}, fanout))
    return dgl.to_block(frontier.edge_type_subgraph([etype]), {etype[2]: dst})
