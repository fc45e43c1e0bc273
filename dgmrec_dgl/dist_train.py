"""Sampled training on DistDGL partitions: ``dgmrec-dgl train --dist-config P/<name>.json --ip-config F``.

Every machine of a DistDGL cluster runs one graph server and one trainer per partition (the shape of DGL's
``tools/launch.py``; ``dgmrec-dgl dist-launch`` starts them on one host, :mod:`dgmrec_dgl.dist_launch`).
The same command serves when DGL's launcher sets ``DGL_ROLE=server`` (:func:`run`), and trains otherwise.

A trainer (``torch.distributed`` rank r, partition r; gloo):

1. connects to every graph server and opens the :class:`dgl.distributed.DistGraph`
   (:mod:`dgmrec_dgl.graphs.distgraph`);
2. builds the model without its row tables (on torch's ``meta`` device), then holds each table of
   :meth:`~dgmrec_dgl.models.base.Recommender.row_tables` as a :class:`dgl.distributed.DistEmbedding`,
   each row on its node's partition; trainer r fills its partition's rows (Xavier-uniform with the full
   table's bound, from a generator seeded by ``(train.seed, r)``);
3. takes its partition's train interactions (the ``interacts`` edges into the items it owns) and each of
   their users' whole train history (for the negatives);
4. per epoch: shuffles its interactions, draws one negative per interaction outside the user's history,
   and runs S steps, S = ⌈all train interactions / ``train.batch_size``⌉ on every trainer (the single-machine
   step count), each on ⌈E_r / S⌉ of its E_r interactions. A step is :func:`dgmrec_dgl.train.training_step`
   on the :class:`~dgmrec_dgl.models.base.Batch` that ``model.sample_batch`` draws from the ``DistGraph``
   (DGL's ``NeighborSampler``: the same blocks and normalisation as single-machine sampled mode); the
   ``DistEmbedding`` rows it read are stepped by DGL's distributed ``SparseAdam`` (which routes each
   row's gradient to the trainer of its partition) and any dense parameter is all-reduced. With
   ``model.history_every: R``: at steps 0, R, 2R, ... of an epoch every trainer computes, for the nodes it
   owns, the histories of single-machine :mod:`dgmrec_dgl.models.history` into ``DistTensor`` s (the ID
   branch's layers 1..L-1 summed, :meth:`_Inference.history`; DGMRec's Ẽ_m and kNN layers too,
   :meth:`_DGMRecForward.modality_history`), and the steps between run one sampled hop and read the rest from
   them;
5. every ``eval_every`` epochs: all trainers compute the full forward layer by layer, each for the nodes it
   owns, on blocks with every neighbour (exactly the full-graph forward), into ``DistTensor`` s (LightGCN's
   layer means, :class:`_Inference`; DGMRec's ID branch, modality branches and fusion, :class:`_DGMRecForward`);
   rank 0 reads them whole, validates, tests a better model, and writes the run folder
   with the usual machinery (:func:`dgmrec_dgl.train.validate_and_keep_best`, ``log.jsonl``, ``last.pt``).
   The checkpoints hold the tables in the dataset's ids, as a single-machine run's do, so ``evaluate``,
   ``recommend`` and the Python API read the run folder as any other; ``last.pt`` also holds every
   trainer's share of DGL's optimiser state, and ``--resume`` continues from it on the same partition.

DGMRec (:class:`_DGMRecParts`): its dense parameters (encoders, preference maps, decoders, generators, CLUB
estimators) are built on every trainer, made rank 0's, and stepped by one Adam per trainer on gradients
all-reduced after each backward (:func:`dgmrec_dgl.distributed.average_gradients`, the ``--nproc`` path's,
as ``training_step``'s ``sync``; each trainer's loss weighted by its share of the step's interactions); its
raw modality tables X_m are ``DistEmbedding`` s initialised from the partition's ``feat_<m>`` rows. Each
table is read through a :class:`DistRows`, which hands DGL's optimiser one summed gradient per row. The kNN
relations are read from fixed-width ``DistTensor`` s written at start from the partition's ``knn_<m>`` edges
(:func:`write_knn_rows`). Before each epoch: CLUB steps on each trainer's own items (estimator gradients
all-reduced) and the generation (Eq. 12-15) of each trainer's own missing items' raw rows, computed on the
distributed forward; every ``refresh_every`` epochs Eq. 16 refines the kNN rows of each trainer's own missing
items against every part's FAISS index of its present items (:meth:`_DGMRecParts.refine`,
:mod:`dgmrec_dgl.graphs.dist_refine`).

What it approximates (besides sampled mode itself, README "Sampled mode"): DGL's ``SparseAdam`` steps a
row with the mean of the gradients of the trainers that read it in the step (each the gradient of its own
batch mean), where one process would use the gradient of the mean over the whole batch; Adam's update is
nearly invariant to that scale. The batches are per partition, not drawn from all interactions. The
servers draw the neighbour samples with their own random engines, which no trainer seeds, so two runs
with one seed differ.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict

import numba
import numpy as np
import torch
import torch.distributed as tdist

from kernels.sampling import sample_negatives

from . import distributed
from ._dgl import dgl
from .config import Config, save_config
from .errors import DataError
from .graphs.blocks import src_ids
from .graphs.dist_refine import merge_top_k, part_top_k, refine_own_rows, row_cosine_sums
from .graphs.distgraph import (KNN_IDS, KNN_WEIGHTS, block_from_rows, connect, knn_edges, own_nodes, own_train_edges,
                               pack_knn_rows, read_ip_config, sample_relation, serve, user_histories)
from .graphs.hetero import IU, UI, knn_etype, mean_aggregate, propagate
from .graphs.knn import KnnGraph
from .graphs.partition import ID_MAP, SUMMARY, read_partition_config
from .graphs.sampling import sample_ui_blocks
from .models import build_model
from .optim import RowSparseAdam
from .run_folder import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, TRAINING_FILES
from .models.dgmrec.encoders import encode
from .models.dgmrec.model import fuse, refines_before
from .models.dgmrec.preference import filtered_features
from .models.history import refresh_totals, refreshes_since
from .train import (RunState, Session, _last_checkpoint, _lr_factor, _save, _truncate_log, _write_finished,
                    batch_seed, epoch_batches, load_dataset, training_step, validate_and_keep_best)

__all__ = ["DIST_MODELS", "check_request", "run", "serving"]

#: models that train on DistDGL partitions (their distributed full forward is written: LightGCN's layer means,
#: DGMRec's branches, :class:`_DGMRecForward`)
DIST_MODELS = ("lightgcn", "dgmrec")
#: nodes per block of the layer-by-layer full forward
INFER_CHUNK = 16384


def serving() -> bool:
    """True in a graph-server process (DGL's launcher sets ``DGL_ROLE=server``)."""
    return os.environ.get("DGL_ROLE", "client") == "server"


def check_request(config: Config, part_config: str, ip_config: str | None) -> dict:
    """Refuse, before anything connects, what distributed training cannot run; returns the partition config.

    Sets ``config.model.execution`` to ``sampled``: training on partitions is sampled mode (the run
    folder's ``config.yaml`` says so, and ``evaluate`` / ``recommend`` read it as any sampled run).

    Raises:
        DataError: a model or setting distributed training does not support, a missing partition file, an
            ip_config whose line count is not the partition count.
    """
    model = config.model
    if model.name not in DIST_MODELS:
        raise DataError("config", "model.name", f"{model.name!r} does not train on DistDGL partitions yet",
                        f"train one of {', '.join(DIST_MODELS)} with --dist-config, or {model.name} on one machine")
    if model.execution not in ("auto", "sampled"):
        raise DataError("config", "model.execution", f"is {model.execution!r}, but training on partitions is "
                        "sampled mode", "set model.execution: sampled (or auto)")
    if config.train.precision != "fp32":
        raise DataError("config", "train.precision", f"{config.train.precision} is not supported with "
                        "--dist-config", "use train.precision: fp32")
    if config.train.weight_decay:
        raise DataError("config", "train.weight_decay", "DGL's distributed SparseAdam has no weight decay",
                        "set train.weight_decay: 0")
    if config.train.checkpoint_steps:
        raise DataError("config", "train.checkpoint_steps", f"is {config.train.checkpoint_steps}: training on "
                        "partitions checkpoints at epoch ends only", "set train.checkpoint_steps: 0")
    if config.train.negatives == "train_items":
        raise DataError("config", "train.negatives", "train_items is not supported on partitions (each trainer "
                        "draws among every item)", "set train.negatives: all")
    partition = read_partition_config(part_config)
    for name in (ID_MAP, SUMMARY):
        path = os.path.join(os.path.dirname(os.path.abspath(part_config)), name)
        if not os.path.isfile(path):
            raise DataError(path, "partition folder", "does not exist",
                            "copy the whole partition folder, or re-run `dgmrec-dgl partition`")
    if model.name == "dgmrec":
        with open(os.path.join(os.path.dirname(os.path.abspath(part_config)), SUMMARY)) as fh:
            _check_dgmrec(config, json.load(fh), part_config)
    if ip_config is not None:
        read_ip_config(ip_config, int(partition["num_parts"]))
    model.execution = "sampled"
    return partition


def _check_dgmrec(config: Config, summary: dict, part_config: str) -> None:
    """What DGMRec on partitions does not run: the release's new-items setting, refinement from all items
    (``refine_sources: all``) or scores on the initial graph after refinement; and a partition whose kNN graphs
    are not the ones the config asks for."""
    from .config import resolve_fidelity

    made = summary.get("dataset", {})
    model = resolve_fidelity(config.model, config.model.fidelity, max(len(made.get("modalities", {})), 1))
    if config.data.new_items:
        raise DataError("config", "data.new_items", "the new-items setting does not train on partitions yet",
                        "train it on one machine, or drop data.new_items")
    if model.knn_k != summary.get("knn_k"):
        raise DataError(part_config, "model.knn_k", f"is {model.knn_k}, the partition's kNN graphs have "
                        f"k = {summary.get('knn_k')}", f"set model.knn_k: {summary.get('knn_k')}, or partition "
                        f"again with --knn-k {model.knn_k}")
    if model.knn_candidates != "present":
        raise DataError("config", "model.knn_candidates", f"is {model.knn_candidates!r}, the partition's kNN graphs "
                        "rank among present items", "set model.knn_candidates: present")
    if _refinements(model, config.train.epochs):
        if model.refine_sources != "present":
            raise DataError("config", "model.refine_sources", f"is {model.refine_sources!r}: on partitions the "
                            "refined rows find their neighbours among the items that have the modality only",
                            "set model.refine_sources: present (or model.avg_lambda: 0, no refinement)")
        if not model.score_with_refined_graph:
            raise DataError("config", "model.score_with_refined_graph", "is false: on partitions the scores use "
                            "the refined kNN rows (the initial ones are not kept)",
                            "set model.score_with_refined_graph: true (or model.avg_lambda: 0, no refinement)")


def _refinements(model_config, epochs: int) -> int:
    """How many times Eq. 16 refines the kNN rows in a run of ``epochs`` (model_config resolved)."""
    if not model_config.generate or model_config.avg_lambda <= 0:
        return 0
    return sum(refines_before(e, model_config.refresh_every, model_config.refine_count_from) for e in range(epochs))


def run(config: Config, part_config: str, ip_config: str, out_dir: str, *, resume: bool = False,
        progress: bool = False) -> dict | None:
    """Serve (``DGL_ROLE=server``; returns None) or train as one trainer (rank 0 returns ``metrics.json``'s
    content, the others {}).

    A trainer needs ``torch.distributed``'s environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT``; DGL's launcher and ``dist-launch`` set it), one trainer per partition. A trainer that
    fails leaves the others waiting in a collective: the launcher ends them (DGL's exit hook, which waits
    for every trainer, must then not run: the CLI leaves with ``os._exit``).
    """
    partition = check_request(config, part_config, ip_config)
    if serving():
        serve(part_config, ip_config)
        return None
    parts = int(partition["num_parts"])
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world != parts:
        raise DataError("<environment>", "WORLD_SIZE", f"{world} trainers for {parts} partitions",
                        "start one trainer per partition (dgmrec-dgl dist-launch does)")
    dataset = _dataset_of(config, part_config) if rank == 0 else None
    g = connect(part_config, ip_config, partition["graph_name"])
    distributed.init_group()
    if tdist.get_rank() != g.get_partition_book().partid:
        raise DataError("<environment>", "RANK", f"trainer {tdist.get_rank()} is on the machine of partition "
                        f"{g.get_partition_book().partid}", "give the trainer of machine i RANK=i")
    result = _train(config, part_config, g, dataset, out_dir, resume=resume, progress=progress)
    tdist.destroy_process_group()
    dgl.distributed.exit_client()          # waits for every trainer; trainer 0 then shuts the servers down
    return result


def _dataset_of(config: Config, part_config: str):
    """Rank 0's dataset (for evaluation: its interactions), checked against what the partition was made from.

    Its features are not prepared (no mask, reduction or imputation: the files stay memory-mapped), so no
    trainer holds the catalog's features (each reads its own part's from the servers)."""
    dataset = load_dataset(config, prepare_features=False)
    with open(os.path.join(os.path.dirname(os.path.abspath(part_config)), SUMMARY)) as fh:
        made_from = json.load(fh).get("dataset", {})
    have = {"n_users": dataset.n_users, "n_items": dataset.n_items, "n_train": len(dataset.train)}
    want = {k: made_from.get(k) for k in have}
    if have != want:
        raise DataError(part_config, "dataset", f"the partition was made from {made_from.get('root')} "
                        f"({', '.join(f'{k} {v}' for k, v in want.items())}), the config's data is {dataset.root} "
                        f"({', '.join(f'{k} {v}' for k, v in have.items())})",
                        "train on the data the partition was made from, or partition this data")
    return dataset


# ---------------------------------------------------------------------- model and optimiser
def zero_rows(shape, dtype):
    """``init_func`` of the distributed tables (pickled to the servers): zeros; the trainers fill their rows."""
    return torch.zeros(shape, dtype=dtype)


class DistRows:
    """A row table on the partitions, as the model reads it: a ``DistEmbedding`` behind
    :func:`~dgmrec_dgl.models.base.sparse_rows`.

    DGL's ``SparseAdam`` divides a row's gradient by the number of times the row was read in the step
    (it averages duplicate indices), where one process sums the gradients of every read (DGMRec reads the
    user table in the ID branch and in each modality's Eq. 2). So each read here is a plain pull
    (``weight[ids]``, a leaf that records its gradient), and :meth:`merge`, before the optimiser step, hands
    DGL one read per row with the summed gradient: the step is the single-process one, except that DGL
    averages a row over the trainers that read it.
    """

    def __init__(self, table):
        self.table = table
        self.reads: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def shape(self) -> tuple[int, int]:
        return (self.table.num_embeddings, self.table.embedding_dim)

    @property
    def weight(self):
        return self.table.weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.weight[ids]
        if torch.is_grad_enabled():
            rows.requires_grad_(True)
            self.reads.append((ids, rows))
        return rows

    def merge(self) -> None:
        """One trace per table for DGL's optimiser: the distinct rows read, each with its summed gradient."""
        reads = [(ids, rows.grad) for ids, rows in self.reads if rows.grad is not None]
        self.reads = []
        if not reads:
            return
        ids, inverse = torch.unique(torch.cat([i for i, _ in reads]), return_inverse=True)
        grad = torch.zeros(len(ids), self.table.embedding_dim).index_add_(0, inverse, torch.cat([g for _, g in reads]))
        self.table._trace.append((ids, _Traced(grad)))

    def clear(self) -> None:
        self.reads = []


class _Traced:
    """What DGL's sparse optimisers read of a trace entry: its ``grad``."""

    def __init__(self, grad: torch.Tensor):
        self.grad = grad


def distributed_model(config: Config, g, seed: int, modalities: dict | None = None):
    """The configured model with its row tables as ``DistEmbedding`` s; returns ``(model, {key: table})``.

    LightGCN is built without tables (torch's ``meta`` device). DGMRec's dense parameters (encoders, preference
    maps, decoders, generators, CLUB) are built normally on every trainer from one seed and then made rank 0's
    (:func:`_dgmrec_shell`); its raw tables X_m start from the partition's ``feat_<m>`` rows, each trainer
    writing the rows it owns. The model reads each table through a :class:`DistRows`.
    """
    if config.model.name == "dgmrec":
        model = _dgmrec_shell(config, g, seed, modalities)
    else:
        with torch.device("meta"):
            model = build_model(config, _Catalog(g.num_nodes("user"), g.num_nodes("item")))
    tables = {}
    for index, (key, ntype) in enumerate(sorted(model.row_tables().items())):
        parent, attr = _submodule(model, key)
        rows, dim = g.num_nodes(ntype), getattr(parent, attr).shape[1]
        delattr(parent, attr)
        table = dgl.distributed.DistEmbedding(rows, dim, name=key, init_func=zero_rows,
                                              part_policy=g.get_node_partition_policy(ntype))
        own = own_nodes(g, ntype)
        if key.startswith("raw."):                     # X_m: the partition's raw rows (missing ones imputed)
            feat = g.nodes["item"].data[f"feat_{key[4:]}"]
            for start in range(0, len(own), INFER_CHUNK):
                ids = own[start:start + INFER_CHUNK]
                table.weight[ids] = feat[ids].to(torch.float32)
        else:
            bound = math.sqrt(6.0 / (rows + dim))          # nn.init.xavier_uniform_ of the whole [rows, dim] table
            gen = torch.Generator().manual_seed(batch_seed(seed, g.get_partition_book().partid, index))
            table.weight[own] = (torch.rand(len(own), dim, generator=gen) * 2 - 1) * bound
        setattr(parent, attr, DistRows(table))
        tables[key] = table
    if config.model.name != "dgmrec" and list(model.parameters()):
        raise DataError("config", "model.name", f"{config.model.name} has dense parameters, which distributed "
                        "training does not handle", f"train one of {', '.join(DIST_MODELS)}")
    for table in tables.values():
        _flush(table.weight, g, table.part_policy.type_name)
    g.barrier()
    return model, tables


def _dgmrec_shell(config: Config, g, seed: int, modalities: dict):
    """DGMRec's dense parameters and masks, for training on partitions (no table, no kNN graph).

    The constructor runs on a one-user, one-item stand-in (its tables are replaced by ``DistEmbedding`` s
    afterwards); the dense parameters are rank 0's on every trainer. The masks ``present_<m>`` are read
    whole (one byte per item and modality: the loss's Eq. 8 and 12-14 terms select items by them, in DGL's
    ids); the generation targets and refined rows are the trainer's own items'.
    """
    from .models.dgmrec.model import DGMRec, generation_targets, refined_rows

    n_items = g.num_nodes("item")
    one = KnnGraph(np.array([0, 1], np.int64), np.array([0], np.int64), np.array([1.0], np.float32))
    torch.manual_seed(seed)
    model = DGMRec(1, 1, {m: np.zeros((1, int(d)), np.float32) for m, d in modalities.items()},
                   {m: np.ones(1, bool) for m in modalities}, config.model, {m: one for m in modalities})
    dense = distributed.broadcast_object({k: v for k, v in model.state_dict().items()})
    model.load_state_dict(dense)
    present = {m: _pull(g.nodes["item"].data[f"present_{m}"], n_items).bool() for m in modalities}
    for m, mask in present.items():
        setattr(model, f"present_{m}", mask)
    own = own_nodes(g, "item")
    owned = torch.zeros(n_items, dtype=torch.bool)
    owned[own] = True
    cfg = model.config
    has = {m: p.numpy() for m, p in present.items()}
    for m, rows in generation_targets(has, cfg.generate_multi_missing).items():
        rows = torch.from_numpy(rows)
        model.targets[m] = rows[owned[rows]]
    model.refine_rows = {m: rows[owned[torch.from_numpy(rows)].numpy()]
                         for m, rows in refined_rows(has, cfg.refine_rows).items()}
    model.knn, model.initial_knn = {}, {}       # the kNN rows live in DistTensors (graph_state: none)
    return model


def _submodule(model, key: str):
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


class _Catalog:
    """What :func:`~dgmrec_dgl.models.build_model` reads of a dataset, for a model built from a ``DistGraph``."""

    def __init__(self, n_users: int, n_items: int):
        self.n_users, self.n_items, self.root = n_users, n_items, "<DistGraph>"


class DistOptimizer:
    """:func:`~dgmrec_dgl.train.training_step`'s optimiser on partitions: DGL's distributed ``SparseAdam``
    for the ``DistEmbedding`` s, the lazy Adam of single-machine sampled mode for the dense parameters
    (whose gradients :func:`~dgmrec_dgl.distributed.average_gradients` all-reduced: the step's ``sync``)."""

    def __init__(self, tables: dict, rows: list[DistRows], dense: list, lr: float):
        self.sparse = dgl.distributed.optim.SparseAdam(list(tables.values()), lr=lr)
        self.rows = rows
        self.dense = RowSparseAdam(dense, lr=lr, lazy=True) if dense else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sparse.zero_grad()
        for rows in self.rows:
            rows.clear()
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=True)

    def step(self) -> None:
        for rows in self.rows:
            rows.merge()
        self.sparse.step()          # collective: every trainer steps, with or without a batch
        if self.dense is not None:
            self.dense.step()

    def set_lr(self, lr: float) -> None:
        self.sparse._lr = lr        # DGL's sparse optimisers keep the rate there (their state dicts save it so)
        if self.dense is not None:
            for group in self.dense.param_groups:
                group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.sparse._lr


# ---------------------------------------------------------------------- tables <-> checkpoints
def _pull(tensor, n: int) -> torch.Tensor:
    """All ``n`` rows of a ``DistTensor`` (read from every partition), in DGL's numbering."""
    return torch.cat([tensor[torch.arange(i, min(i + INFER_CHUNK * 8, n))] for i in range(0, n, INFER_CHUNK * 8)])


def _flush(tensor, g, ntype: str) -> None:
    """Wait until every server has applied this trainer's writes to ``tensor``: DGL's pushes are not
    answered, but a server answers a read after the writes the same trainer sent it before."""
    book = g.get_partition_book()
    tensor[torch.stack([book.partid2nids(p, ntype)[0] for p in range(book.num_partitions())])]


def _to_dataset_order(rows: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(rows)
    out[orig] = rows
    return out


# ---------------------------------------------------------------------- the trainer
def _train(config: Config, part_config: str, g, dataset, out_dir: str, *, resume: bool, progress: bool) -> dict:
    rank, world = tdist.get_rank(), tdist.get_world_size()
    tcfg = config.train
    threads = distributed.rank_threads(tcfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.manual_seed(tcfg.seed)
    folder = os.path.dirname(os.path.abspath(part_config))
    orig = {nt: torch.from_numpy(ids) for nt, ids in np.load(os.path.join(folder, ID_MAP)).items()}
    with open(os.path.join(folder, SUMMARY)) as fh:
        modalities = json.load(fh).get("dataset", {}).get("modalities", {})
    model, tables = distributed_model(config, g, tcfg.seed, modalities)
    dense = [p for p in model.main_parameters() if p.requires_grad]
    rows = [r for r in _row_readers(model)]
    optimizer = DistOptimizer(tables, rows, dense, tcfg.lr)
    s = Session(config, out_dir, distributed.World(rank, world, world), dataset, model, g, optimizer, None, None,
                torch.Generator().manual_seed(tcfg.seed), contextlib.nullcontext, RunState(),
                notes={"distributed": {"parts": world, "partition": os.path.abspath(part_config)}})
    parts = _DGMRecParts(s, tables, orig, epochs=tcfg.epochs) if config.model.name == "dgmrec" else _Inference(
        g, {tables[k].part_policy.type_name: tables[k].weight for k in tables}, model.backbone.n_layers,
        next(iter(tables.values())).embedding_dim, history=bool(config.model.history_every))
    every = config.model.history_every          # historical embeddings: refreshed by every trainer at once
    _restore(s, tables, orig, resume, parts)
    if s.main:
        _write_finished(s, False)

    users, items = own_train_edges(g)
    seen_users, user_rows = torch.unique(users, return_inverse=True)
    indptr, history = user_histories(g, seen_users)
    shares = distributed.gather_objects(len(users))          # every trainer's interactions
    steps = max(1, math.ceil(sum(shares) / tcfg.batch_size))
    batch_size = max(1, math.ceil(len(users) / steps))
    # the steps an epoch runs: all of them, or the first train.epoch_steps (the same batches and weights)
    run_steps = min(steps, tcfg.epoch_steps) if tcfg.epoch_steps else steps
    lr_factor = _lr_factor(config)

    def sync():          # the dense gradients, averaged over the trainers (the --nproc path's all-reduce)
        distributed.average_gradients(dense, world)

    def weight(step: int) -> float:
        """W · n_r / Σ n: the dense gradients' mean over trainers is then the gradient of the mean over all
        the step's interactions (each trainer's share of step ``step`` follows from ``shares``)."""
        sizes = [max(0, min(math.ceil(n / steps), n - step * math.ceil(n / steps))) for n in shares]
        return world * sizes[rank] / max(sum(sizes), 1)

    t_setup = time.perf_counter()
    for epoch in range(s.state.epoch, tcfg.epochs):
        if s.state.stopped:
            break
        record: dict = {"epoch": epoch, "execution": model.execution(), "steps": run_steps,
                        "distributed": {"parts": world, "steps": steps, "interactions": shares}}
        optimizer.set_lr(tcfg.lr * lr_factor(epoch))
        t0 = time.perf_counter()
        if isinstance(parts, _DGMRecParts):
            record["before_epoch"] = parts.before_epoch(epoch)
        else:
            s.g, record["before_epoch"] = model.before_epoch(epoch, s.g, s.generator)
        t1 = time.perf_counter()
        triples = _triples(users, items, user_rows, indptr, history, g.num_nodes("item"), tcfg.seed, epoch, rank)
        generator = distributed.rank_generator(tcfg.seed, epoch, rank)
        batches = epoch_batches(model, s.g, triples, batch_size, batch_seed(tcfg.seed, rank, 0), epoch, inline=True)
        sums: dict[str, float] = {}
        taken = 0
        refreshed = refresh_totals(model)
        for step in range(run_steps):
            if every and step % every == 0:
                parts.refresh_histories(model)
            batch = next(batches, None)
            if batch is None:                # this partition ran out of interactions: the collective step only
                optimizer.zero_grad()
                if dense:
                    sync()
                optimizer.step()
                continue
            extra = {"loss_weight": weight(step), "sync": sync} if dense else {}
            for k, v in training_step(model, s.g, batch, optimizer, generator, **extra).items():
                sums[k] = sums.get(k, 0.0) + v
            taken += 1
        t2 = time.perf_counter()
        record["loss"] = _mean_over_trainers(sums, taken)
        if every:                    # the refreshes, inside the training seconds
            record["history"] = refreshes_since(model, refreshed)
        record["lr"] = optimizer.lr
        state = _model_state(model, tables, g, orig) if rank == 0 else None     # the tables whole, read once
        if (epoch + 1) % tcfg.eval_every == 0:
            embeddings = parts.embeddings(orig, rank)          # every trainer computes, rank 0 receives
            if rank == 0:
                validate_and_keep_best(s, epoch, record, progress=progress, embeddings=embeddings, model_state=state)
        t3 = time.perf_counter()
        record["seconds"] = {"train": t2 - t1, "before_epoch": t1 - t0, "eval": t3 - t2}
        s.state = RunState(**distributed.broadcast_object(asdict(s.state)))   # rank 0 decides early stopping
        s.state.epoch = epoch + 1
        _checkpoint(s, record, state)
    result = _write_finished(s, s.state.stopped or s.state.epoch >= tcfg.epochs) if rank == 0 else {}
    tdist.barrier()
    result["epochs_run"] = s.state.epoch
    result["train_seconds"] = time.perf_counter() - t_setup
    return result


def _triples(users, items, user_rows, indptr, history, n_items: int, seed: int, epoch: int, rank: int):
    """This trainer's BPR triples of ``epoch``: its interactions shuffled, each with a negative outside the
    user's whole train history (seeded by ``(seed, epoch, rank)``)."""
    gen = torch.Generator().manual_seed(batch_seed(seed, epoch, rank))
    order = torch.randperm(len(users), generator=gen)
    neg = sample_negatives(indptr.numpy(), history.numpy(), user_rows[order].numpy(), n_items,
                           batch_seed(seed + 1, epoch, rank))
    return users[order], items[order], torch.from_numpy(np.asarray(neg, dtype=np.int64))


def _mean_over_trainers(sums: dict[str, float], taken: int) -> dict[str, float]:
    """The loss parts, mean over every trainer's batches (``sums`` over this trainer's ``taken`` batches)."""
    gathered = distributed.gather_objects((sums, taken))
    batches = max(sum(n for _, n in gathered), 1)
    keys = sorted({k for part, _ in gathered for k in part})
    return {k: sum(part.get(k, 0.0) for part, _ in gathered) / batches for k in keys}


def _row_readers(model) -> list[DistRows]:
    """The :class:`DistRows` the model reads its row tables through."""
    return [getattr(*_submodule(model, key)) for key in sorted(model.row_tables())]


def _model_state(model, tables: dict, g, orig: dict) -> dict:
    """The model's ``state_dict`` as one process's: the row tables whole and every item mask in the dataset's
    ids, the dense parameters as they are (rank 0 reads all parts)."""
    state = {k: v for k, v in model.state_dict().items()}
    for key in [k for k in state if k.startswith("present_")]:
        state[key] = _to_dataset_order(state[key], orig["item"])
    return {**state, **_tables_state(tables, g, orig)}


def _tables_state(tables: dict, g, orig: dict) -> dict:
    """The row tables whole, in the dataset's ids, under their ``state_dict`` keys (rank 0 reads all parts)."""
    state = {}
    for key, table in tables.items():
        ntype = table.part_policy.type_name if table.part_policy is not None else None
        state[key] = _to_dataset_order(_pull(table.weight, g.num_nodes(ntype)), orig[ntype])
    return state


def _checkpoint(s: Session, record: dict, tables_state: dict | None) -> None:
    """``log.jsonl`` and ``last.pt`` on rank 0: the tables whole (``tables_state``, rank 0's), every trainer's
    share of DGL's optimiser state."""
    shares = distributed.gather_on_main(s.optimizer.sparse.local_state_dict())    # rank 0 writes them
    if s.main:
        with open(s.path("log.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        _save(s.path(LAST_CHECKPOINT), keep_previous=s.path(PREVIOUS_CHECKPOINT),
              model=tables_state, optimizer={"dgl_sparse": shares, **_dense_optimizers(s)}, scheduler=None,
              auxiliary=None, generator=s.generator.get_state(), torch_rng=torch.get_rng_state(),
              state=asdict(s.state), graph_state=s.model.graph_state(), distributed=_layout(s.g))
    tdist.barrier()


def _dense_optimizers(s: Session) -> dict:
    """The dense parameters' optimiser states (the same on every trainer: their gradients are all-reduced)."""
    out = {}
    if s.optimizer.dense is not None:
        out["dense"] = s.optimizer.dense.state_dict()
    if s.model.auxiliary_optimizer() is not None:
        out["auxiliary"] = s.model.auxiliary_optimizer().state_dict()
    return out


def _layout(g) -> dict:
    """What a checkpoint's optimiser shares depend on: the partition's node ranges."""
    book = g.get_partition_book()
    return {"parts": book.num_partitions(),
            "ranges": {nt: [int(book.partid2nids(p, nt)[0]) for p in range(book.num_partitions())]
                       for nt in g.ntypes}}


def _restore(s: Session, tables: dict, orig: dict, resume: bool, parts=None) -> None:
    """``last.pt`` (rank 0 reads it) into the tables, the dense parameters and their optimisers, every
    trainer's share of DGL's optimiser state, the kNN rows (DGMRec) and the run state."""
    ckpt = _last_checkpoint(s) if s.main and resume else None
    if s.main and ckpt is not None and ckpt.get("distributed") != _layout(s.g):
        raise DataError(s.path(LAST_CHECKPOINT), "distributed", "was written on another partition of the data",
                        "resume on the partition the run was trained on, or start afresh with --overwrite")
    if s.main:
        save_config(s.config, s.path("config.yaml"))
    found = distributed.broadcast_object(ckpt is not None)
    if not found:
        if s.main:
            for stale in TRAINING_FILES:
                if os.path.exists(s.path(stale)):
                    os.unlink(s.path(stale))
        return
    shares = [None]
    tdist.scatter_object_list(shares, ckpt["optimizer"]["dgl_sparse"] if s.main else None, src=0)
    s.optimizer.sparse.load_local_state_dict(shares[0])
    tables_keys = set(tables)
    dense = distributed.broadcast_object(
        ({k: v for k, v in ckpt["model"].items() if k not in tables_keys and not k.startswith("present_")},
         {k: v for k, v in ckpt["optimizer"].items() if k != "dgl_sparse"}) if s.main else None)
    if dense[0]:
        s.model.load_state_dict(dense[0], strict=False)
    if "dense" in dense[1]:
        s.optimizer.dense.load_state_dict(dense[1]["dense"])
    if "auxiliary" in dense[1]:
        s.model.auxiliary_optimizer().load_state_dict(dense[1]["auxiliary"])
    if s.main:
        for key, table in tables.items():
            ntype = table.part_policy.type_name
            rows = ckpt["model"][key][orig[ntype]]
            for start in range(0, len(rows), INFER_CHUNK * 8):
                ids = torch.arange(start, min(start + INFER_CHUNK * 8, len(rows)))
                table.weight[ids] = rows[ids]
            _flush(table.weight, s.g, ntype)
        s.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        s.state = RunState(**ckpt["state"])
        _truncate_log(s.path("log.jsonl"), s.state.epoch)
    if isinstance(parts, _DGMRecParts):
        parts.load_knn(ckpt.get("graph_state") if s.main else None)
    s.state = RunState(**distributed.broadcast_object(asdict(s.state)))
    s.g.barrier()


# ---------------------------------------------------------------------- the full forward, layer by layer
def _new_tensor(g, ntype: str, width: int, name: str, dtype=torch.float32):
    """A zero ``DistTensor`` ``[num_nodes(ntype), width]`` with one row per node on its node's partition."""
    return dgl.distributed.DistTensor((g.num_nodes(ntype), width), dtype, name, init_func=zero_rows,
                                      part_policy=g.get_node_partition_policy(ntype))


def _settle(g, written: list) -> None:
    """Every trainer's writes to ``written`` ((tensor, ntype) pairs) applied on every server, then a barrier."""
    for tensor, ntype in written:
        _flush(tensor, g, ntype)
    g.barrier()


def _rows_of(table, ids: torch.Tensor) -> np.ndarray:
    """Rows ``ids`` of a ``DistTensor`` as a float32 numpy array (read in chunks)."""
    if not len(ids):
        return np.zeros((0, table.shape[1]), np.float32)
    return np.ascontiguousarray(torch.cat([table[c] for c in _chunks(ids)]).numpy(), dtype=np.float32)


def _chunks(ids: torch.Tensor):
    for start in range(0, len(ids), INFER_CHUNK):
        yield ids[start:start + INFER_CHUNK]


class _Inference:
    """LightGCN's layer means of every node, computed by the trainers together (each for the nodes it owns).

    Layer l+1 of a node reads layer l of all its neighbours, so every layer is written to a ``DistTensor``
    and the trainers wait for each other (``DistGraph.barrier``) before the next; the blocks hold every
    neighbour (fanout -1), where the sampled normalisation is the full graph's. DGMRec's ID branch
    (:class:`_DGMRecForward`) is the same computation on its ID tables.

    Args:
        g: the ``DistGraph``.
        layer0: ``{"user": DistTensor [n_users, d], "item": ...}``, the layer-0 tables.
        n_layers: L.
        dim: d.
        prefix: of the ``DistTensor`` names (one set per instance).
        history: keep the ``DistTensor`` s of the historical embeddings (:meth:`history`).
    """

    def __init__(self, g, layer0: dict, n_layers: int, dim: int, prefix: str = "", history: bool = False):
        self.g, self.n_layers, self.layer0 = g, n_layers, layer0
        self.buffers = [{nt: _new_tensor(g, nt, dim, f"{prefix}layer{i}_{nt}") for nt in ("user", "item")}
                        for i in range(3)]
        # historical embeddings (model.history_every): C = sum_{l=1}^{L-1} Â^l E^(0), refreshed by history()
        self.history_tables = {nt: _new_tensor(g, nt, dim, f"{prefix}history_{nt}")
                               for nt in ("user", "item")} if history else None

    def refresh_histories(self, model) -> None:
        """Every trainer at once: LightGCN's ``model.history`` := :meth:`history`."""
        model.history.refresh(self.history)

    def layer_means(self) -> dict:
        """Every trainer: the layer means of its own nodes into ``DistTensor`` s; returns ``{ntype: DistTensor}``."""
        return self._layer_sum(self.n_layers, self.buffers[2], with_layer0=True, divisor=self.n_layers + 1)

    def history(self) -> dict:
        """Every trainer: the ID branch's history of its own nodes (what
        :func:`~dgmrec_dgl.models.history.lightgcn_history` gives on one machine, layers 1..L-1 summed) into
        ``DistTensor`` s; returns ``{ntype: DistTensor}``, which a step reads rows of."""
        return self._layer_sum(self.n_layers - 1, self.history_tables, with_layer0=False, divisor=1)

    def _layer_sum(self, n_layers: int, final: dict, *, with_layer0: bool, divisor: int) -> dict:
        """``sum_{l=0 or 1}^{n_layers} Â^l E^(0) / divisor`` of the own nodes into ``final`` (layer by layer, a barrier
        between layers)."""
        g = self.g
        own = {nt: own_nodes(g, nt) for nt in ("user", "item")}
        with torch.no_grad():
            current = dict(self.layer0)
            total = {nt: current[nt][own[nt]] if with_layer0 else torch.zeros(len(own[nt]), final[nt].shape[1])
                     for nt in own}
            for layer in range(n_layers):
                out = self.buffers[layer % 2]
                chunks = max(math.ceil(len(own[nt]) / INFER_CHUNK) for nt in own)
                for c in range(chunks):
                    seeds = {nt: own[nt][c * INFER_CHUNK:(c + 1) * INFER_CHUNK] for nt in own}
                    block = sample_ui_blocks(g, seeds["user"], seeds["item"], [-1])[0]
                    h = {nt: current[nt][src_ids(block, nt)] for nt in own}
                    for nt, relation, source in (("user", IU, "item"), ("item", UI, "user")):
                        if len(seeds[nt]):       # (a block has no relation into a type without seeds)
                            new = propagate(block, relation, h[source])
                            out[nt][seeds[nt]] = new
                            total[nt][c * INFER_CHUNK:c * INFER_CHUNK + len(seeds[nt])] += new
                _settle(g, [(out[nt], nt) for nt in own])
                current = out
            for nt in own:
                final[nt][own[nt]] = total[nt] / divisor if divisor != 1 else total[nt]
            _settle(g, [(final[nt], nt) for nt in own])
        return final

    def embeddings(self, orig: dict, rank: int):
        """``(user, item)`` layer means in the dataset's ids on rank 0; None elsewhere."""
        final = self.layer_means()
        if rank != 0:
            return None
        return tuple(_to_dataset_order(_pull(final[nt], self.g.num_nodes(nt)), orig[nt]) for nt in ("user", "item"))


# ---------------------------------------------------------------------- DGMRec on partitions
#: a kNN row on partitions holds at most this many times k entries (Eq. 16 grows a refined row by up to k per
#: refinement; past the width a row keeps its largest weights)
KNN_ROW_CAP = 8


def knn_width(model_config, epochs: int) -> int:
    """Entries per item of the kNN ``DistTensor`` s: k times (1 + the refinements a run of ``epochs`` makes),
    since each Eq. 16 blend adds at most k entries to a row (a missing item's row starts as one self-loop),
    at most ``KNN_ROW_CAP`` times k."""
    return int(model_config.knn_k) * min(1 + _refinements(model_config, epochs), KNN_ROW_CAP)


def write_knn_rows(g, modalities, width: int) -> None:
    """Every trainer: the kNN rows of the items it owns, read from the partition's ``knn_<m>`` edges, into the
    fixed-width ``DistTensor`` s ``knn_ids_<m>`` / ``knn_w_<m>`` [n_items, width] (node fields of ``g``, which the
    kNN blocks of a step read, :func:`~dgmrec_dgl.graphs.distgraph.knn_row_blocks`)."""
    own = own_nodes(g, "item")
    written = []
    for m in modalities:
        ids = _new_tensor(g, "item", width, KNN_IDS.format(m), torch.int64)
        weights = _new_tensor(g, "item", width, KNN_WEIGHTS.format(m))
        for chunk in _chunks(own):
            rows, w = pack_knn_rows(*knn_edges(g, m, chunk), chunk, width)
            ids[chunk] = rows
            weights[chunk] = w
        g.nodes["item"].data[KNN_IDS.format(m)] = ids
        g.nodes["item"].data[KNN_WEIGHTS.format(m)] = weights
        written += [(ids, "item"), (weights, "item")]
    _settle(g, written)


class _DGMRecForward:
    """DGMRec's full forward (:meth:`~dgmrec_dgl.models.dgmrec.model.DGMRec.forward`) computed by the trainers
    together, each for the users and items it owns, into ``DistTensor`` s, step by step with a barrier between
    the steps that read other parts' rows:

    1. the ID branch: LightGCN's layer means E_u, E_i (:class:`_Inference`);
    2. per modality m: the user preferences tanh(W_m e_u) of its users [n_users, d]; then per item the encoders
       (Eq. 1) on its raw row X_m, its preference p_{i,m} (Eq. 2, mean over all its users) and the filtered
       Ẽ_m = [p ⊙ E^g, p ⊙ E^s] (Eq. 3) [n_items, 2d]; ``n_mm_layers`` kNN steps (Eq. 4-5) on blocks built from
       the fixed-width kNN rows; the user features f̄_{u,m} (Eq. 6, mean over all train items) [n_users, 2d];
    3. the fusion (Eq. 17-18) of every own user and item [n, d].

    Kept for generation (:meth:`_DGMRecParts.generate`): E^g_m and p_m per item, [ḡ_m, s̄_m] per item.
    """

    def __init__(self, g, model, tables: dict):
        cfg = model.config
        d, self.g, self.model = cfg.embedding_dim, g, model
        self.ids = _Inference(g, {"user": tables["user_emb"].weight, "item": tables["item_emb"].weight},
                              cfg.n_ui_layers, d, prefix="dgmrec_id_", history=bool(cfg.history_every))
        self.raw = {m: tables[f"raw.{m}"].weight for m in model.modalities}
        self.user_pref = _new_tensor(g, "user", d, "dgmrec_user_pref")
        self.general = {m: _new_tensor(g, "item", d, f"dgmrec_general_{m}") for m in model.modalities}
        self.pref = {m: _new_tensor(g, "item", d, f"dgmrec_pref_{m}") for m in model.modalities}
        self.item = {m: _new_tensor(g, "item", 2 * d, f"dgmrec_item_{m}") for m in model.modalities}
        self.user = {m: _new_tensor(g, "user", 2 * d, f"dgmrec_user_{m}") for m in model.modalities}
        self.layers = [_new_tensor(g, "item", 2 * d, f"dgmrec_layer{i}") for i in range(2)]
        # generation (Eq. 12-15): the generators' outputs [Ĝ_m, Ŝ_m] and their propagation
        self.gen_in = _new_tensor(g, "item", 2 * d, "dgmrec_generated_in")
        self.gen_out = _new_tensor(g, "item", 2 * d, "dgmrec_generated_out")
        self.final = {nt: _new_tensor(g, nt, d, f"dgmrec_final_{nt}") for nt in ("user", "item")}
        self.own = {nt: own_nodes(g, nt) for nt in ("user", "item")}
        # historical embeddings (model.history_every): per modality [Ẽ_m, Ē^(1)_m, ..., Ē^(L)_m]
        self.history_layers = {m: [_new_tensor(g, "item", 2 * d, f"dgmrec_history_{m}_{i}")
                                   for i in range(cfg.n_mm_layers + 1)]
                               for m in model.modalities} if cfg.history_every else None

    def filter(self, m: str, out) -> None:
        """Eq. 1-3 for every own item: the user preferences tanh(W_m e_u) of the own users, then per item the
        encoders on X_m, the preference p_{i,m} (mean over all its users) and Ẽ_m = [p ⊙ E^g, p ⊙ E^s] into
        ``out`` [n_items, 2d] (E^g_m and p_m kept for generation)."""
        g, model, own = self.g, self.model, self.own
        for chunk in _chunks(own["user"]):
            self.user_pref[chunk] = model.preference[m].user_preferences(self.ids.layer0["user"][chunk])
        _settle(g, [(self.user_pref, "user")])
        for chunk in _chunks(own["item"]):
            block = sample_relation(g, UI, chunk, -1)
            pref = mean_aggregate(block, UI, self.user_pref[src_ids(block, "user")])
            general, specific = encode(model.general, model.specific[m], m, self.raw[m][chunk])
            self.general[m][chunk], self.pref[m][chunk] = general, pref
            out[chunk] = filtered_features(pref, general, specific)
        _settle(g, [(self.general[m], "item"), (self.pref[m], "item"), (out, "item")])

    @torch.no_grad()
    def modality_history(self) -> dict:
        """Every trainer: the modality branches' histories of its own items, what one machine's :class:`DGMRec`
        refreshes (per modality Ẽ_m and each kNN layer's output); returns ``{modality: [DistTensor, ...]}``,
        which a step reads rows of. (The ID branch's is ``self.ids.history()``.)"""
        for m, layers in self.history_layers.items():
            self.filter(m, layers[0])
            for below, above in zip(layers, layers[1:]):
                self.propagate(m, below, above, 1)
        return self.history_layers

    def propagate(self, m: str, source, out, n_layers: int) -> None:
        """``n_layers`` steps ``h <- S^m h`` (Eq. 4-5) of ``source`` [n_items, w] into ``out``, for the own items
        layer by layer (intermediate layers in ``self.layers``; ``source`` must not be one of them)."""
        g, own = self.g, self.own["item"]
        data = g.nodes["item"].data
        ids, weights = data[KNN_IDS.format(m)], data[KNN_WEIGHTS.format(m)]
        current = source
        for layer in range(n_layers):
            target = out if layer == n_layers - 1 else self.layers[layer % 2]
            for chunk in _chunks(own):
                block = block_from_rows(m, chunk, ids[chunk], weights[chunk])
                target[chunk] = propagate(block, knn_etype(m), current[src_ids(block, "item")])
            _settle(g, [(target, "item")])
            current = target
        if n_layers == 0:
            for chunk in _chunks(own):
                out[chunk] = source[chunk]
            _settle(g, [(out, "item")])

    @torch.no_grad()
    def run(self) -> dict:
        """Every trainer: the whole forward (steps 1-3); returns ``{ntype: DistTensor}`` of the fused rows."""
        g, model, own = self.g, self.model, self.own
        cfg = model.config
        model.eval()
        ids = self.ids.layer_means()
        for m in model.modalities:
            self.filter(m, self.layers[0])
            filtered = self.layers[0]
            if cfg.n_mm_layers > 1:            # layer 0 must not be overwritten before layer 1 has read it
                for chunk in _chunks(own["item"]):
                    self.item[m][chunk] = filtered[chunk]
                _settle(g, [(self.item[m], "item")])
                filtered = self.item[m]
            self.propagate(m, filtered, self.item[m], cfg.n_mm_layers)
            for chunk in _chunks(own["user"]):
                block = sample_relation(g, IU, chunk, -1)
                self.user[m][chunk] = mean_aggregate(block, IU, self.item[m][src_ids(block, "item")])
            _settle(g, [(self.user[m], "user")])
        for nt, views in (("user", self.user), ("item", self.item)):
            for chunk in _chunks(own[nt]):
                parts = [views[m][chunk].chunk(2, dim=1) for m in model.modalities]
                self.final[nt][chunk] = fuse(ids[nt][chunk], [general for general, _ in parts],
                                             [specific for _, specific in parts])
        _settle(g, [(self.final[nt], nt) for nt in own])
        model.train()
        return self.final


def _scatter_answers(slices: list) -> list:
    """Every trainer's answers to this trainer's queries, in trainer order: trainer t sends ``slices[r]`` (its
    answers to trainer r's queries) to trainer r only (one ``scatter_object_list`` per sender)."""
    received = []
    for sender in range(tdist.get_world_size()):
        box = [None]
        tdist.scatter_object_list(box, slices if tdist.get_rank() == sender else None, src=sender)
        received.append(box[0])
    return received


class _DGMRecParts:
    """What DGMRec needs on partitions beyond :func:`~dgmrec_dgl.train.training_step`: its kNN rows in
    ``DistTensor`` s, the distributed full forward (:class:`_DGMRecForward`; evaluation) and the per-epoch work
    of :meth:`~dgmrec_dgl.models.dgmrec.model.DGMRec.before_epoch` (:meth:`before_epoch`)."""

    def __init__(self, s: Session, tables: dict, orig: dict, *, epochs: int):
        self.s, self.g, self.model, self.tables, self.orig = s, s.g, s.model, tables, orig
        write_knn_rows(self.g, self.model.modalities, knn_width(self.model.config, epochs))
        self.forward = _DGMRecForward(self.g, self.model, tables)
        self.own_items = own_nodes(self.g, "item")
        self.item_shares = distributed.gather_objects(len(self.own_items))

    def refresh_histories(self, model) -> None:
        """Every trainer at once: DGMRec's ID and modality histories, computed on the partitions."""
        model.history.refresh(self.forward.ids.history)
        model.modality_history.refresh(self.forward.modality_history)

    def embeddings(self, orig: dict, rank: int):
        """``(user, item)`` fused representations (Eq. 17-18) in the dataset's ids on rank 0; None elsewhere."""
        final = self.forward.run()
        if rank != 0:
            return None
        return tuple(_to_dataset_order(_pull(final[nt], self.g.num_nodes(nt)), orig[nt]) for nt in ("user", "item"))

    def before_epoch(self, epoch: int) -> dict:
        """CLUB steps (:meth:`club_steps`), the generation of the own items' missing raw rows (:meth:`generate`)
        and, every ``refresh_every`` epochs, Eq. 16 on their kNN rows (:meth:`refine`), as
        :meth:`DGMRec.before_epoch` does on one machine."""
        cfg, s = self.model.config, self.s
        generator = distributed.rank_generator(s.config.train.seed + 1, epoch, tdist.get_rank())
        log: dict = {}
        if cfg.sampler:
            log["club_nll"] = self.club_steps(generator)
        if cfg.generate:
            log["generated_rows"] = self.generate(generator)
            if cfg.avg_lambda > 0 and refines_before(epoch, cfg.refresh_every, cfg.refine_count_from):
                log["refined_rows"] = self.refine()
                log["knn_edges"] = self.knn_edges()
        return log

    def refine(self) -> dict[str, int]:
        """Eq. 16 on the kNN rows of every trainer's own items missing a modality
        (:mod:`dgmrec_dgl.graphs.dist_refine`): each trainer indexes its own source items' raw rows (those that
        have m), the query rows (every trainer's own items to refine) are exchanged, each trainer answers all
        of them, and each merges the answers to its own queries (the exact top-k of the union), normalises and
        blends its rows with the single-machine kernels and writes them into the kNN ``DistTensor`` s.
        Returns the rows refined per modality over all trainers."""
        model, g, cfg = self.model, self.g, self.model.config
        rank, world = tdist.get_rank(), tdist.get_world_size()
        data = g.nodes["item"].data
        refined = {}
        for m in model.modalities:
            raw, ids_t, w_t = self.forward.raw[m], data[KNN_IDS.format(m)], data[KNN_WEIGHTS.format(m)]
            rows = torch.as_tensor(np.asarray(model.refine_rows[m], dtype=np.int64))
            queries = distributed.gather_objects(raw[rows].numpy() if len(rows) else None)     # every trainer's
            asked = [q for q in queries if q is not None]
            sources = self.own_items[model.present(m)[self.own_items]]
            ids, cos = part_top_k(sources.numpy(), _rows_of(raw, sources), np.concatenate(asked) if asked
                                  else np.zeros((0, raw.shape[1]), np.float32), cfg.knn_k, index=cfg.knn_index,
                                  seed=self.s.config.train.seed)
            bounds = np.cumsum([0] + [0 if q is None else len(q) for q in queries])
            answers = _scatter_answers([(ids[bounds[t]:bounds[t + 1]], cos[bounds[t]:bounds[t + 1]])
                                        for t in range(world)])
            refined[m] = int(bounds[-1])
            if not len(rows):
                continue
            new = merge_top_k(answers, cfg.knn_k)
            used = np.unique(new[1])
            neighbours = ids_t[torch.from_numpy(used)]
            degree = row_cosine_sums(_rows_of(raw, torch.from_numpy(used)), neighbours.numpy(),
                                     _rows_of(raw, neighbours.clamp(min=0).flatten()).reshape(
                                         len(used), neighbours.shape[1], -1))
            indptr, indices, weights = refine_own_rows(rows.numpy(), ids_t[rows].numpy(), w_t[rows].numpy(), new,
                                                       used, degree, 1.0 - cfg.avg_lambda, cfg.refine_tolerance)
            dst = torch.from_numpy(np.repeat(rows.numpy(), np.diff(indptr)))
            packed_ids, packed_w = pack_knn_rows(torch.from_numpy(indices), dst, torch.from_numpy(weights), rows,
                                                 ids_t.shape[1])
            ids_t[rows], w_t[rows] = packed_ids, packed_w
        _settle(g, [(data[field.format(m)], "item") for m in model.modalities for field in (KNN_IDS, KNN_WEIGHTS)])
        if rank == 0:
            model.knn = self.knn_graphs()
        return refined

    def knn_edges(self) -> dict[str, int]:
        """Entries of every modality's kNN graph (all trainers' rows)."""
        data = self.g.nodes["item"].data
        return {m: sum(distributed.gather_objects(int((data[KNN_IDS.format(m)][self.own_items] >= 0).sum())))
                for m in self.model.modalities}

    def knn_graphs(self) -> dict:
        """Rank 0: the current kNN graphs whole, in the dataset's ids (:meth:`DGMRec.graph_state`'s form, what
        checkpoints hold and ``load_run`` scores with)."""
        data, n, orig = self.g.nodes["item"].data, self.g.num_nodes("item"), self.orig["item"]
        graphs = {}
        for m in self.model.modalities:
            ids, w = _pull(data[KNN_IDS.format(m)], n), _pull(data[KNN_WEIGHTS.format(m)], n)
            filled = ids >= 0
            dst = orig[torch.arange(n).unsqueeze(1).expand_as(ids)[filled]]
            src = orig[ids[filled]]
            order = torch.argsort(dst * n + src)
            indptr = torch.zeros(n + 1, dtype=torch.int64)
            indptr[1:] = torch.cumsum(torch.bincount(dst, minlength=n), 0)
            graphs[m] = KnnGraph(indptr.numpy(), src[order].numpy(), w[filled][order].numpy())
        return graphs

    def load_knn(self, graph_state: dict | None) -> None:
        """Every trainer: rank 0 writes the kNN graphs of a checkpoint (dataset ids, ``graph_state``) into the
        kNN ``DistTensor`` s (a resumed run continues on the refined rows)."""
        data, n = self.g.nodes["item"].data, self.g.num_nodes("item")
        written = [(data[field.format(m)], "item") for m in self.model.modalities for field in (KNN_IDS, KNN_WEIGHTS)]
        if graph_state:
            dgl_of = torch.empty(n, dtype=torch.int64)
            dgl_of[self.orig["item"]] = torch.arange(n)
            graphs = {}
            for m, (indptr, indices, weights) in graph_state.items():
                dst = dgl_of[torch.repeat_interleave(torch.arange(n), torch.diff(indptr))]
                ids_t = data[KNN_IDS.format(m)]
                rows, w = pack_knn_rows(dgl_of[indices], dst, weights, torch.arange(n), ids_t.shape[1])
                for chunk in _chunks(torch.arange(n)):
                    ids_t[chunk] = rows[chunk]
                    data[KNN_WEIGHTS.format(m)][chunk] = w[chunk]
                graphs[m] = KnnGraph(indptr.numpy(), indices.numpy(), weights.numpy())
            self.model.knn = graphs
        _settle(self.g, written)

    def club_steps(self, generator: torch.Generator) -> float:
        """``club_steps`` maximum-likelihood steps of the CLUB estimators (:meth:`DGMRec.club_step`), each trainer
        on a share of ``club_batch`` drawn among its own items (its share of the catalog), the estimators'
        gradients weighted by the trainer's share of the rows and all-reduced; returns the last step's NLL,
        the rows' mean over all trainers."""
        model, cfg, world = self.model, self.model.config, tdist.get_world_size()
        n_items = sum(self.item_shares)
        sizes = [min(n, max(1, round(cfg.club_batch * n / n_items))) for n in self.item_shares]
        mine = sizes[tdist.get_rank()]
        optimizer = model.auxiliary_optimizer()
        params = [p for p in model.club.parameters()]
        nll = 0.0
        for _ in range(cfg.club_steps):
            idx = self.own_items[torch.randperm(len(self.own_items), generator=generator)[:mine]]
            with torch.no_grad():
                pairs = {}
                for m in model.modalities:
                    x = self.forward.raw[m][idx]
                    pairs[m] = (model.specific[m](x), model.general(m, x))
            optimizer.zero_grad(set_to_none=True)
            loss = -sum(model.club[m].log_likelihood(sp, ge) for m, (sp, ge) in pairs.items())
            (loss * (world * mine / sum(sizes))).backward()
            distributed.average_gradients(params, world)
            optimizer.step()
            nll = sum(distributed.gather_objects(float(loss.detach()) * mine)) / sum(sizes)
        return nll

    @torch.no_grad()
    def generate(self, generator: torch.Generator) -> dict[str, int]:
        """Eq. 12-15 for the own items in ``model.targets`` (:meth:`DGMRec.generated_features`): the generators'
        inputs of every own item, ``n_mm_layers`` kNN steps on the partitions, then the targets' rows perturbed,
        decoded and written into their raw table rows (each trainer its own part's). Returns the rows written
        per modality over all trainers."""
        model, g, fwd = self.model, self.g, self.forward
        cfg = model.config
        fwd.run()
        d = cfg.embedding_dim
        model.eval()
        written = {}
        for m in model.modalities:
            others = [o for o in model.modalities if o != m]

            def source(o, rows):          # ḡ_o (filtered, propagated) or, as the release, E^g_o
                return fwd.item[o][rows][:, :d] if cfg.generation_input == "propagated" else fwd.general[o][rows]

            for chunk in _chunks(fwd.own["item"]):
                general = (model.general_generators[m](torch.cat([source(o, chunk) for o in others], 1)) if others
                           else source(m, chunk))
                fwd.gen_in[chunk] = torch.cat([general, model.specific_generators[m](fwd.pref[m][chunk])], 1)
            _settle(g, [(fwd.gen_in, "item")])
            fwd.propagate(m, fwd.gen_in, fwd.gen_out, cfg.n_mm_layers)
            targets = model.targets[m]
            if len(targets):
                gen_hat, spec_hat = fwd.gen_out[targets].chunk(2, dim=1)
                gen_hat, spec_hat = model._perturbed([gen_hat, spec_hat], generator)
                for start in range(0, len(targets), INFER_CHUNK):
                    rows = targets[start:start + INFER_CHUNK]
                    fwd.raw[m][rows] = model.decoders[m](gen_hat[start:start + INFER_CHUNK],
                                                        spec_hat[start:start + INFER_CHUNK])
            written[m] = sum(distributed.gather_objects(len(targets)))
        _settle(g, [(fwd.raw[m], "item") for m in model.modalities])
        model.train()
        return written
