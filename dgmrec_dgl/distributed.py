"""Data-parallel training on ``torch.distributed`` (gloo backend, CPU).

The scheme
----------
Every rank holds a full replica: the dataset, the model and the DGL heterograph. Each step:

1. Every rank draws the *same* BPR batch (the sampler is seeded by ``(seed, epoch)`` only) and takes its
   contiguous shard of it (:func:`shard_bounds`; shard sizes differ by at most one, so a last batch that
   does not divide evenly, or one smaller than the world, is handled — an empty shard computes nothing).
2. Each rank runs the full-graph forward and the model's loss on its shard, weighted by
   ``W · n_r / B`` (:func:`shard_weight`: W ranks, n_r rows in this shard, B rows in the batch).
3. After ``backward``, :func:`average_gradients` all-reduces the gradients of the main parameters,
   flattened into buckets (a few large messages instead of one per tensor), and divides by W. The mean over
   ranks of ``W · n_r / B · ∇L_r`` is ``Σ_r n_r / B · ∇L_r``: for a loss that is a mean over the batch rows
   (BPR, LightGCN and MF-BPR without their regulariser) that is exactly the gradient of the full-batch
   mean, up to floating-point summation order. A parameter no rank produced a gradient for keeps
   ``grad = None``, as in a single-process run (Adam then skips it).
4. Every rank steps its own Adam on identical gradients, so the replicas stay identical.

Terms that are not a mean over rows differ from a single-process run, as they do under any
data-parallel scheme: the in-batch InfoNCE terms of DGMRec see the shard as negatives; MMRec's EmbLoss
(Frobenius norms of the batch rows, not squared, over B) is Σ_r ‖X_r‖ / B instead of ‖X‖ / B; DGMRec's
generation loss averages over the shard's distinct positives. Terms independent of the batch (DGMRec's
reconstruction over all items) get weight Σ_r n_r / B = 1, as they should.

Per-epoch work and randomness
-----------------------------
``model.before_epoch`` (DGMRec: CLUB estimator steps, generation of missing features, kNN refinement;
CI2MG: OT block order) runs on *every* rank with the same inputs: identical parameters and the same
shared ``torch.Generator`` state. The shared generator is used by ``before_epoch`` only; the noise of the
loss (perturbations, CLUB permutations) comes from a per-rank generator reseeded every epoch from
``(seed, epoch, rank)`` (:func:`rank_generator`), so the shards get independent noise and the shared
stream stays in step on all ranks without communication. Running the work everywhere costs one
replica's time but no transfer of raw features or graphs. At the end of every epoch the ranks exchange a
hash of their parameters, buffers, graph state and shared generator (:func:`fingerprint`); the trainer
logs them and stops with an error if they differ.

Rank 0 alone evaluates and writes ``log.jsonl``, the checkpoints and ``metrics.json``. At start, rank 0
reads ``last.pt`` (``--resume``) or takes its fresh model and broadcasts the state to the others, so the
replicas start identical and only rank 0 needs the run folder.

Why not ``DistributedDataParallel``
-----------------------------------
DDP accepts the dataclass that ``forward`` returns, but the models compute their losses outside
``forward`` (``model.loss``) with parameters ``forward`` does not touch (DGMRec's decoders, generators,
CLUB estimators, raw features in the reconstruction term). DDP with ``find_unused_parameters=False``
then fails as soon as one parameter gets no gradient on some step ("Expected to have finished reduction
in the prior iteration"), which happens with DGMRec's conditional generation losses (tried: a mask where
every item misses a modality) and with an empty last shard; ``find_unused_parameters=True`` marks the
parameters used only in ``loss`` as unused and then fails when their gradients arrive ("Expected to mark a
variable ready only once"). An explicit bucketed all-reduce after ``backward`` has neither problem, keeps
``grad = None`` semantics, and costs little here: the full-graph forward/backward dominates a step, so
overlapping communication with backward (DDP's advantage) would gain little.

Launching
---------
``dgmrec-dgl train ... --nproc N`` calls :func:`launch`, which spawns N local workers on a free loopback
port. Under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in the
environment) :func:`run_from_env` joins the group torchrun describes instead. Each rank uses
``threads // N`` torch and Numba threads (N = ranks on this machine; at least one).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from .errors import DataError

BUCKET_BYTES = 32 << 20   # gradients are all-reduced in flat buffers of at most this size


@dataclass(frozen=True)
class World:
    """This process's place in the group (a single process is rank 0 of a world of 1)."""

    rank: int = 0
    size: int = 1
    local_size: int = 1       # ranks on this machine (sets the thread share)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_world() -> World:
    """The initialised process group's rank and size, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    size = dist.get_world_size()
    return World(dist.get_rank(), size, int(os.environ.get("LOCAL_WORLD_SIZE", size)))


def rank_threads(threads: int, local_size: int) -> int:
    """Threads of one rank: ``threads`` (0 = torch's default) shared among the ranks of this machine."""
    return max(1, (threads or torch.get_num_threads()) // max(local_size, 1))


# ---------------------------------------------------------------------- sharding
def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` rows (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_weight(n_shard: int, n_batch: int, world: int) -> float:
    """Loss weight ``W · n_r / B``: the mean over ranks of the weighted gradients is the full-batch one."""
    return world * n_shard / n_batch


def rank_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of one rank's loss noise in one epoch (independent across ranks, reproducible)."""
    state = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# ---------------------------------------------------------------------- gradients
def _buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[int]]:
    """Consecutive parameter indices grouped into buckets of at most ``bucket_bytes`` (one may exceed it)."""
    groups, size = [[]], 0
    for i, p in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if groups[-1] and size + nbytes > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups if groups[0] else []


def pack_gradients(params: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[torch.Tensor]:
    """``[flags, bucket_1, ...]``: 1.0 per parameter that has a gradient, then the gradients flattened
    (zeros where ``grad is None``, sparse ones densified) into buckets of at most ``bucket_bytes``."""
    flags = torch.tensor([float(p.grad is not None) for p in params])
    grads = [(torch.zeros_like(p) if p.grad is None else p.grad.to_dense() if p.grad.is_sparse else p.grad)
             .reshape(-1) for p in params]
    return [flags] + [torch.cat([grads[i] for i in group]) for group in _buckets(params, bucket_bytes)]


def unpack_gradients(params: list[torch.Tensor], packed: list[torch.Tensor], world: int,
                     bucket_bytes: int = BUCKET_BYTES) -> None:
    """Set ``p.grad`` to its summed gradient in ``packed`` divided by ``world``; ``None`` where no rank had one."""
    flags = packed[0].tolist()
    for group, bucket in zip(_buckets(params, bucket_bytes), packed[1:]):
        bucket /= world
        offset = 0
        for i in group:
            n = params[i].numel()
            params[i].grad = bucket[offset:offset + n].view_as(params[i]) if flags[i] else None
            offset += n


def average_gradients(params: list[torch.Tensor], world: int, bucket_bytes: int = BUCKET_BYTES) -> None:
    """All-reduce (sum) the gradients of ``params`` in flat buckets and divide by ``world``, in place."""
    packed = pack_gradients(params, bucket_bytes)
    for tensor in packed:
        dist.all_reduce(tensor)
    unpack_gradients(params, packed, world, bucket_bytes)


# ---------------------------------------------------------------------- state agreement
def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; tensors included)."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_on_main(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 only (None elsewhere): what only rank 0 writes need not
    be unpickled on every rank (:func:`gather_objects` holds every rank's copy on each)."""
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def fingerprint(*states) -> str:
    """A 16-hex-digit hash of tensors / arrays / bytes nested in dicts, lists and tuples (exact bits)."""
    h = hashlib.blake2b(digest_size=8)

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(str(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, torch.Tensor):
            h.update(str(x.dtype).encode() + str(tuple(x.shape)).encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            h.update(str(x.dtype).encode() + str(x.shape).encode())
            h.update(np.ascontiguousarray(x).view(np.uint8).reshape(-1))
        elif isinstance(x, (bytes, bytearray)):
            h.update(x)
        else:
            h.update(repr(x).encode())

    for state in states:
        walk(state)
    return h.hexdigest()


# ---------------------------------------------------------------------- launching
def launched_by_torchrun() -> bool:
    """True when the environment describes a process group (``torchrun`` sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_group() -> None:
    """``init_process_group("gloo")`` from the environment, after importing the torch modules that capture the
    group at import time.

    ``torch.distributed.nn.functional`` binds ``group.WORLD`` as the default ``group`` argument of its ten
    collectives when it is imported. The first ``torch.optim`` optimizer a rank builds imports
    ``torch._dynamo`` (``Optimizer.add_param_group`` is wrapped in ``torch._disable_dynamo``), which imports
    that module through FSDP and ``torch.distributed._shard``; imported after ``init_process_group``, its
    defaults hold the live gloo group. ``destroy_process_group`` then cannot free the group, and its threads
    (``gloo_tcp_loop``, two ``pt_gloo_runloop``, rank 0's ``pt_tcpstore_uv``) run on into interpreter
    shutdown. That caused the intermittent "terminate called without an active exception" of a rank at exit
    (CI, ``tests/test_distributed.py``'s ``dgmrec_runs``): a ``pt_gloo_runloop`` thread that drops a finished
    collective (``all_gather_object``'s tensors) late needs the GIL to release the tensors' Python objects;
    once the interpreter is finalizing, ``take_gil`` ends the thread with ``pthread_exit``, whose unwinding
    through the ``noexcept`` ``~TensorImpl`` calls ``std::terminate`` (core dump backtrace). Imported here
    first, the defaults bind ``None`` (no group yet), and ``destroy_process_group`` frees the group and joins
    its threads while the interpreter is whole; ``tests/test_distributed.py`` checks that no gloo thread
    outlives ``_worker``. Every group of the package starts here (``--nproc``, ``torchrun``, DistDGL trainers).
    """
    import torch.distributed.nn.functional  # noqa: F401

    dist.init_process_group("gloo")


def run_from_env(fn, *args, **kwargs):
    """Join the group described by RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, run ``fn``, leave."""
    if int(os.environ["WORLD_SIZE"]) == 1:
        return fn(*args, **kwargs)
    init_group()
    try:
        return fn(*args, **kwargs)
    finally:
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free at the time of the call."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(fn, nproc: int, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` in ``nproc`` spawned processes forming a gloo group on loopback.

    Returns rank 0's return value. A :class:`~dgmrec_dgl.errors.DataError` raised in a worker is raised
    again here (so the CLI prints its one line); other failures raise ``torch.multiprocessing``'s
    ``ProcessRaisedException`` with the worker's traceback.
    """
    if nproc == 1:
        return fn(*args, **kwargs)
    # Outcomes travel through files, not a pipe: a worker blocked writing to a full pipe would never exit.
    with tempfile.TemporaryDirectory(prefix="dgmrec-launch-") as box:
        try:
            mp.spawn(_worker, args=(nproc, "127.0.0.1", free_port(), fn, args, kwargs, box), nprocs=nproc)
        except ProcessException:
            for name in sorted(os.listdir(box)):
                kind, value = _read(os.path.join(box, name))
                if kind == "data_error":
                    raise DataError(*value) from None
            raise
        return _read(os.path.join(box, "0"))[1]


def _read(path: str):
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _worker(rank, nproc, addr, port, fn, args, kwargs, box):
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nproc),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
    init_group()
    outcome = None
    try:
        outcome = ("ok", fn(*args, **kwargs))
    except DataError as err:
        outcome = ("data_error", (err.path, err.field, err.problem, err.fix))
        raise
    finally:
        dist.destroy_process_group()
        if outcome is not None and (rank == 0 or outcome[0] == "data_error"):
            with open(os.path.join(box, str(rank)), "wb") as fh:
                pickle.dump(outcome, fh)
