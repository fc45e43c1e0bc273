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
   row's gradient to the trainer of its partition) and any dense parameter is all-reduced;
5. every ``eval_every`` epochs: all trainers compute the full LightGCN layer means layer by layer, each
   for the nodes it owns, on blocks with every neighbour (exactly the full-graph forward), into
   ``DistTensor`` s; rank 0 reads them whole, validates, tests a better model, and writes the run folder
   with the usual machinery (:func:`dgmrec_dgl.train.validate_and_keep_best`, ``log.jsonl``, ``last.pt``).
   The checkpoints hold the tables in the dataset's ids, as a single-machine run's do, so ``evaluate``,
   ``recommend`` and the Python API read the run folder as any other; ``last.pt`` also holds every
   trainer's share of DGL's optimiser state, and ``--resume`` continues from it on the same partition.

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
from .graphs.distgraph import connect, own_nodes, own_train_edges, read_ip_config, serve, user_histories
from .graphs.hetero import IU, UI, propagate
from .graphs.partition import ID_MAP, SUMMARY, read_partition_config
from .graphs.sampling import sample_ui_blocks
from .models import build_model
from .run_folder import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, TRAINING_FILES
from .train import (RunState, Session, _last_checkpoint, _lr_factor, _save, _truncate_log, _write_finished,
                    batch_seed, epoch_batches, load_dataset, training_step, validate_and_keep_best)

__all__ = ["DIST_MODELS", "check_request", "run", "serving"]

#: models that train on DistDGL partitions (their distributed full forward is written: LightGCN's layer means)
DIST_MODELS = ("lightgcn",)
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
    if model.history_every:
        raise DataError("config", "model.history_every", "historical embeddings need whole-graph refreshes, "
                        "which distributed training does not run", "set model.history_every: 0")
    if config.train.precision != "fp32":
        raise DataError("config", "train.precision", f"{config.train.precision} is not supported with "
                        "--dist-config", "use train.precision: fp32")
    if config.train.weight_decay:
        raise DataError("config", "train.weight_decay", "DGL's distributed SparseAdam has no weight decay",
                        "set train.weight_decay: 0")
    if config.train.negatives == "train_items":
        raise DataError("config", "train.negatives", "train_items is not supported on partitions (each trainer "
                        "draws among every item)", "set train.negatives: all")
    partition = read_partition_config(part_config)
    for name in (ID_MAP, SUMMARY):
        path = os.path.join(os.path.dirname(os.path.abspath(part_config)), name)
        if not os.path.isfile(path):
            raise DataError(path, "partition folder", "does not exist",
                            "copy the whole partition folder, or re-run `dgmrec-dgl partition`")
    if ip_config is not None:
        read_ip_config(ip_config, int(partition["num_parts"]))
    model.execution = "sampled"
    return partition


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
    tdist.init_process_group("gloo")
    if tdist.get_rank() != g.get_partition_book().partid:
        raise DataError("<environment>", "RANK", f"trainer {tdist.get_rank()} is on the machine of partition "
                        f"{g.get_partition_book().partid}", "give the trainer of machine i RANK=i")
    result = _train(config, part_config, g, dataset, out_dir, resume=resume, progress=progress)
    tdist.destroy_process_group()
    dgl.distributed.exit_client()          # waits for every trainer; trainer 0 then shuts the servers down
    return result


def _dataset_of(config: Config, part_config: str):
    """Rank 0's dataset (for evaluation), checked against what the partition was made from."""
    dataset = load_dataset(config)
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


def _submodule(model, key: str):
    path, _, attr = key.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def distributed_model(config: Config, g, seed: int):
    """The configured model with its row tables as ``DistEmbedding`` s; returns ``(model, {key: table})``."""
    sizes = _Catalog(g.num_nodes("user"), g.num_nodes("item"))
    with torch.device("meta"):
        model = build_model(config, sizes)
    tables = {}
    for index, (key, ntype) in enumerate(sorted(model.row_tables().items())):
        parent, attr = _submodule(model, key)
        rows, dim = getattr(parent, attr).shape
        delattr(parent, attr)
        table = dgl.distributed.DistEmbedding(rows, dim, name=key, init_func=zero_rows,
                                              part_policy=g.get_node_partition_policy(ntype))
        setattr(parent, attr, table)
        own = own_nodes(g, ntype)
        bound = math.sqrt(6.0 / (rows + dim))          # nn.init.xavier_uniform_ of the whole [rows, dim] table
        gen = torch.Generator().manual_seed(batch_seed(seed, g.get_partition_book().partid, index))
        table.weight[own] = (torch.rand(len(own), dim, generator=gen) * 2 - 1) * bound
        tables[key] = table
    dense = [p for p in model.parameters()]
    if dense:
        raise DataError("config", "model.name", f"{config.model.name} has dense parameters, which distributed "
                        "training does not handle yet", f"train one of {', '.join(DIST_MODELS)}")
    g.barrier()
    return model, tables


class _Catalog:
    """What :func:`~dgmrec_dgl.models.build_model` reads of a dataset, for a model built from a ``DistGraph``."""

    def __init__(self, n_users: int, n_items: int):
        self.n_users, self.n_items, self.root = n_users, n_items, "<DistGraph>"


class DistOptimizer:
    """:func:`~dgmrec_dgl.train.training_step`'s optimiser on partitions: DGL's distributed ``SparseAdam``
    for the ``DistEmbedding`` s (dense parameters: none yet, refused by :func:`distributed_model`)."""

    def __init__(self, tables: dict, lr: float):
        self.sparse = dgl.distributed.optim.SparseAdam(list(tables.values()), lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sparse.zero_grad()

    def step(self) -> None:
        self.sparse.step()          # collective: every trainer steps, with or without a batch

    def set_lr(self, lr: float) -> None:
        self.sparse._lr = lr        # DGL's sparse optimisers keep the rate there (their state dicts save it so)

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
    model, tables = distributed_model(config, g, tcfg.seed)
    optimizer = DistOptimizer(tables, tcfg.lr)
    s = Session(config, out_dir, distributed.World(rank, world, world), dataset, model, g, optimizer, None, None,
                torch.Generator().manual_seed(tcfg.seed), contextlib.nullcontext, RunState(),
                notes={"distributed": {"parts": world, "partition": os.path.abspath(part_config)}})
    _restore(s, tables, orig, resume)
    if s.main:
        _write_finished(s, False)

    users, items = own_train_edges(g)
    seen_users, user_rows = torch.unique(users, return_inverse=True)
    indptr, history = user_histories(g, seen_users)
    shares = distributed.gather_objects(len(users))          # every trainer's interactions
    steps = max(1, math.ceil(sum(shares) / tcfg.batch_size))
    batch_size = max(1, math.ceil(len(users) / steps))
    lr_factor = _lr_factor(config)
    infer = _Inference(g, model, tables)

    t_setup = time.perf_counter()
    for epoch in range(s.state.epoch, tcfg.epochs):
        if s.state.stopped:
            break
        record: dict = {"epoch": epoch, "execution": model.execution(),
                        "distributed": {"parts": world, "steps": steps, "interactions": shares}}
        optimizer.set_lr(tcfg.lr * lr_factor(epoch))
        t0 = time.perf_counter()
        s.g, record["before_epoch"] = model.before_epoch(epoch, s.g, s.generator)
        t1 = time.perf_counter()
        triples = _triples(users, items, user_rows, indptr, history, g.num_nodes("item"), tcfg.seed, epoch, rank)
        generator = distributed.rank_generator(tcfg.seed, epoch, rank)
        batches = epoch_batches(model, s.g, triples, batch_size, batch_seed(tcfg.seed, rank, 0), epoch, inline=True)
        sums: dict[str, float] = {}
        taken = 0
        for _ in range(steps):
            batch = next(batches, None)
            if batch is None:                # this partition ran out of interactions: the collective step only
                optimizer.zero_grad()
                optimizer.step()
                continue
            for k, v in training_step(model, s.g, batch, optimizer, generator).items():
                sums[k] = sums.get(k, 0.0) + v
            taken += 1
        t2 = time.perf_counter()
        record["loss"] = _mean_over_trainers(sums, taken)
        record["lr"] = optimizer.lr
        state = _tables_state(tables, g, orig) if rank == 0 else None     # the tables whole, read once
        if (epoch + 1) % tcfg.eval_every == 0:
            embeddings = infer.embeddings(orig, rank)          # every trainer computes, rank 0 receives
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
    shares = distributed.gather_objects(s.optimizer.sparse.local_state_dict())
    if s.main:
        with open(s.path("log.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        _save(s.path(LAST_CHECKPOINT), keep_previous=s.path(PREVIOUS_CHECKPOINT),
              model=tables_state, optimizer={"dgl_sparse": shares}, scheduler=None,
              auxiliary=None, generator=s.generator.get_state(), torch_rng=torch.get_rng_state(),
              state=asdict(s.state), graph_state={}, distributed=_layout(s.g))
    tdist.barrier()


def _layout(g) -> dict:
    """What a checkpoint's optimiser shares depend on: the partition's node ranges."""
    book = g.get_partition_book()
    return {"parts": book.num_partitions(),
            "ranges": {nt: [int(book.partid2nids(p, nt)[0]) for p in range(book.num_partitions())]
                       for nt in g.ntypes}}


def _restore(s: Session, tables: dict, orig: dict, resume: bool) -> None:
    """``last.pt`` (rank 0 reads it) into the tables, every trainer's optimiser share and the run state."""
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
    s.state = RunState(**distributed.broadcast_object(asdict(s.state)))
    s.g.barrier()


# ---------------------------------------------------------------------- the full forward, layer by layer
class _Inference:
    """LightGCN's layer means of every node, computed by the trainers together (each for the nodes it owns).

    Layer l+1 of a node reads layer l of all its neighbours, so every layer is written to a ``DistTensor``
    and the trainers wait for each other (``DistGraph.barrier``) before the next; the blocks hold every
    neighbour (fanout -1), where the sampled normalisation is the full graph's.
    """

    def __init__(self, g, model, tables: dict):
        self.g, self.n_layers = g, model.backbone.n_layers
        self.layer0 = {tables[key].part_policy.type_name: tables[key] for key in tables}
        dim = next(iter(tables.values())).embedding_dim
        self.buffers = [{nt: dgl.distributed.DistTensor((g.num_nodes(nt), dim), torch.float32, f"layer{i}_{nt}",
                                                        init_func=zero_rows, part_policy=g.get_node_partition_policy(nt))
                         for nt in ("user", "item")} for i in range(3)]

    def embeddings(self, orig: dict, rank: int):
        """``(user, item)`` layer means in the dataset's ids on rank 0; None elsewhere."""
        g = self.g
        own = {nt: own_nodes(g, nt) for nt in ("user", "item")}
        with torch.no_grad():
            current = {nt: self.layer0[nt].weight for nt in own}
            total = {nt: current[nt][own[nt]] for nt in own}
            for layer in range(self.n_layers):
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
                g.barrier()
                current = out
            final = self.buffers[2]
            for nt in own:
                final[nt][own[nt]] = total[nt] / (self.n_layers + 1)
            g.barrier()
            if rank != 0:
                return None
            return tuple(_to_dataset_order(_pull(final[nt], g.num_nodes(nt)), orig[nt]) for nt in ("user", "item"))
