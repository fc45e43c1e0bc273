"""Training any :class:`~dgmrec_dgl.models.base.Recommender`: one readable loop, timing and logging inline.

Per epoch (the reference schedule, DGMRec_SPEC §1 and §4):

1. ``model.before_epoch``: for DGMRec the CLUB estimator steps, the generation of the raw-feature rows of
   items missing a modality and, every ``refresh_every`` epochs, the refinement of their kNN rows (Eq. 16).
2. BPR triples (one uniform negative per train interaction, Numba sampler), mini-batches, Adam with the
   lr multiplied by ``lr_decay^(epoch / lr_decay_every)``. Each batch is made by ``model.sample_batch``
   (:func:`epoch_batches`: in sampled mode on a background thread, ahead of the steps) and fed to
   :func:`training_step`, the one step of every mode (full, blocks, sampled, data-parallel shards, the
   benchmarks), whose loss reads ``model.batch_forward``.
3. Every ``eval_every`` epochs: ``model.before_validation`` (DGMRec in the new-items setting: the new items'
   features are generated and the inference graphs refreshed, as the release does before each validation),
   then valid Recall@20 (full ranking; ``eval.user_sample`` users if set); the best model is checkpointed
   atomically and tested on every test user; training stops after ``patience`` validations without
   improvement (``patience + 1`` under ``train.patience_rule: exceed``, the release's).

:func:`train` reads as its pieces: :func:`_setup` (data, model, graph, optimisers), :func:`_restore`
(resume or a fresh folder), then per epoch :func:`run_epoch`, :func:`validate_and_keep_best` and
:func:`_checkpoint`.

Each epoch appends one JSON line to ``log.jsonl`` (losses; seconds in training, generation/refinement and
evaluation, the evaluation's parts in ``eval_seconds``; ``peak_rss_gb``, the process's peak so far, over the
sittings of an epoch resumed inside it).
``last.pt`` is written atomically after every epoch (the one before it kept as ``last.prev.pt``), and with
``train.checkpoint_steps: N`` after every N-th step inside one (for epochs of hours), so ``resume=True``
continues a killed run to the same result as an uninterrupted one; a ``last.pt`` that does not load falls
back to ``last.prev.pt`` with a warning. Checkpoints hold tensors and plain values only and load with
``torch.load(weights_only=True)`` (memory-mapped). ``metrics.json`` says whether the run ``finished`` (all its
epochs, or early stopping). The run folder's ownership (lock, refusal of another run's files, resuming under
the same config) is :mod:`dgmrec_dgl.run_folder`'s, around this loop.

Called inside an initialised ``torch.distributed`` group of more than one process, the same loop trains
data-parallel (:mod:`dgmrec_dgl.distributed`: each rank takes a shard of every batch, gradients are
averaged; rank 0 alone evaluates and writes the run folder).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import json
import math
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field

import numba
import numpy as np
import torch
from tqdm.auto import tqdm

from kernels.sampling import bpr_triples

from . import distributed
from .config import Config, load_config, resolve_fidelity, save_config
from .data.dataset import Dataset, find_mask
from .data.masks import MissingMask
from .data.new_items import interaction_files, is_shipped_split, negative_candidates, new_items_setting
from .errors import DataError
from .evaluate import evaluate
from .inject import apply_injection
from .io_utils import atomic_path, atomic_write_json
from .graphs.sampling import dgl_threads, seed_sampling
from .models import build_model
from .models.base import Batch, Recommender
from .models.history import histories_of, refresh_totals, refreshes_since
from .optim import RowSparseAdam
from .run_folder import LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, TRAINING_FILES


def load_dataset(config: Config, *, prepare_features: bool = True) -> Dataset:
    """The dataset of ``config.data``: loaded, new-items split if asked, reduced if asked, masked, imputed.

    The PCA reduction (``data.reduce_dims``) is fitted on the items the mask leaves with each modality
    and applied before imputation, so the imputed rows are written only at the reduced width. With
    ``prepare_features=False`` it stops after the split (for what needs only the interactions): the
    features stay as read, without mask, reduction, imputation or injection.
    """
    cfg = config.data
    inter, shipped = interaction_files(cfg.dir, cfg.inter, new_items=cfg.new_items, protocol=cfg.new_items_protocol)
    dataset = Dataset.load(cfg.dir, inter=inter, require_features=True, feature_dtype=cfg.feature_dtype)
    if cfg.new_items:
        dataset = new_items_setting(dataset, protocol=cfg.new_items_protocol, seed=cfg.new_items_seed,
                                    shipped=shipped)
    elif is_shipped_split(dataset.name):
        warnings.warn(f"{dataset.name}.inter is a new-items split of the study (its new items have no train "
                      "row); without data.new_items (--new-items) it trains as plain interactions and tests on "
                      "its test rows alone")
    if not prepare_features:
        return dataset
    mask = None
    if cfg.mask:
        path = find_mask(cfg.dir, cfg.mask)
        if not os.path.exists(path):
            raise DataError(path, "data.mask", "does not exist", "name the study's mask file (e.g. "
                            "missing_items_0.666.npz in the data folder) or another, or give --mask FILE, or "
                            "--missing-ratio R to generate a mask")
        mask = MissingMask.load(path, dataset.n_items, dataset.modalities or None, allow_pickle=cfg.allow_pickle)
    elif cfg.missing_ratio is not None:
        mask = MissingMask.generate(dataset.n_items, dataset.modalities, cfg.missing_ratio, cfg.mask_seed)
    unknown = sorted(set(cfg.reduce_dims) - set(dataset.modalities)) if isinstance(cfg.reduce_dims, dict) else []
    if unknown:
        raise DataError("config", "data.reduce_dims", f"names {', '.join(unknown)}, which {cfg.dir} does not have",
                        f"name modalities among {', '.join(dataset.modalities)}, or give one width for all")
    try:
        dataset = dataset.reduced(cfg.reduce_dims, sample=cfg.reduce_sample, seed=cfg.reduce_seed,
                                  dtype=cfg.feature_dtype, mask=mask)
    except ValueError as exc:           # a width the data cannot give (too few items to fit, not narrower)
        raise DataError("config", "data.reduce_dims", f"{cfg.reduce_dims} on {cfg.dir}: {exc}",
                        "lower data.reduce_dims (or leave it out)") from None
    if mask is not None:
        dataset = dataset.with_mask(mask, imputation=cfg.imputation)
    return apply_injection(dataset, cfg)   # data.inject: none (default), mean or nn (dgmrec_dgl.inject)


# ---------------------------------------------------------------------- state
@dataclass
class RunState:
    epoch: int = 0                      # next epoch to run
    best_metric: float = -math.inf
    best_epoch: int = -1
    bad_validations: int = 0
    stopped: bool = False
    step: int = 0                       # steps of epoch ``epoch`` taken before a mid-epoch checkpoint
    partial: dict | None = None         # that epoch's record so far (:func:`run_epoch`)


@dataclass
class Session:
    """Everything a run trains with, built once by :func:`_setup` and passed to the loop's pieces."""

    config: Config
    out_dir: str
    world: distributed.World
    dataset: Dataset
    model: Recommender
    g: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    auxiliary: torch.optim.Optimizer | None
    generator: torch.Generator
    step_precision: object
    state: RunState
    notes: dict = field(default_factory=dict)    # extra entries of metrics.json (distributed training's)

    @property
    def main(self) -> bool:
        return self.world.is_main

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)


def _save(path, *, keep_previous: str | None = None, **payload):
    """``payload`` (tensors and plain values) to ``path`` atomically; the file it replaces to ``keep_previous``."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
        if keep_previous is not None and os.path.exists(path):
            os.replace(path, keep_previous)


def _load(path) -> dict:
    """A checkpoint written by :func:`_save`; only tensors and plain values are unpickled.

    Memory-mapped (private, copy-on-write): a 1M-item DGMRec checkpoint holds ~10 GB of tables and Adam
    moments, which would otherwise sit in memory beside the model they are copied into.
    """
    return torch.load(path, weights_only=True, mmap=True)


def _lr_factor(config: Config):
    t = config.train
    return lambda epoch: t.lr_decay ** (epoch / t.lr_decay_every)


# ---------------------------------------------------------------------- the step
def training_step(model: Recommender, g, batch: Batch, optimizer: torch.optim.Optimizer,
                  generator: torch.Generator | None, precision=contextlib.nullcontext, *,
                  loss_weight: float = 1.0, sync=None) -> dict[str, float]:
    """One step of the main optimiser on ``batch``: the training step of every mode, and of the benchmarks.

    Full, blocks and sampled mode differ in the batch they feed it (:meth:`Recommender.sample_batch`); the
    data-parallel trainer weights its shard's loss (``loss_weight``) and all-reduces the gradients between
    backward and the optimiser step (``sync``). Returns the loss parts (unweighted) as floats.
    """
    optimizer.zero_grad(set_to_none=True)
    with precision():
        loss, parts = model.loss(*model.batch_forward(g, batch), generator)
    (loss if loss_weight == 1.0 else loss * loss_weight).backward()
    if sync is not None:
        sync()
    optimizer.step()
    return parts


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of DGL's sampler for batch ``index`` of ``epoch`` (independent of where it is sampled)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def _on_sampler_thread():
    """The first call makes this thread DGL's sampler thread: its kernels on one OpenMP thread (see below).

    Torch sets a thread's OpenMP thread count to its own (``torch.set_num_threads``) the first time the thread
    asks for it, which any torch kernel does; left to the first batch, that reset two DGL draws to 2 threads at
    50K items (whose draws then differed run to run). Asking first makes the count of one stick.
    """
    torch.get_num_threads()
    dgl_threads(1)


#: The one thread every sampled batch is drawn on, for the life of the process. DGL's random engine seeds a
#: thread with ``seed + n``, n numbering threads in the order they first draw, and its kernels hand rows to
#: OpenMP threads in whatever order they run; one persistent thread, on one OpenMP thread, makes a batch's
#: draw depend only on its seed (:func:`batch_seed`).
_SAMPLER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-sampler",
                                                 initializer=_on_sampler_thread)


def epoch_batches(model: Recommender, g, triples, batch_size: int, seed: int, epoch: int, *, ahead: int = 2,
                  timing: dict | None = None, inline: bool = False, first: int = 0):
    """The epoch's :class:`Batch` es, in order: ``model.sample_batch`` on each slice of ``triples``, from
    batch ``first`` on (a run resumed inside the epoch; each batch is the same whatever ``first``).

    In sampled mode the batches are drawn on the sampler thread (DGL's samplers release the GIL), up to
    ``ahead`` batches ahead of the step that consumes them, so sampling overlaps the compute; ``ahead=0``
    draws each batch only once the previous step has finished (no overlap; for measuring). Other modes
    draw nothing worth a thread and build the batches inline, as ``inline=True`` makes every mode do (on
    a ``DistGraph`` the draws are requests to the graph servers, and DGL's RPC client is not thread-safe:
    a response could reach the step's thread instead). ``timing`` (if given) receives ``sample``
    (seconds the sampler worked) and ``wait`` (seconds the step waited for a batch).
    """
    starts = list(range(0, len(triples[0]), batch_size))
    timing = {} if timing is None else timing
    timing.setdefault("sample", 0.0)
    timing.setdefault("wait", 0.0)

    def make(i: int) -> Batch:
        t = time.perf_counter()
        seed_sampling(batch_seed(seed, epoch, i))
        batch = model.sample_batch(g, *batch_triples(triples, slice(starts[i], starts[i] + batch_size)))
        timing["sample"] += time.perf_counter() - t
        return batch

    if inline or model.execution() != "sampled":
        for i in range(first, len(starts)):
            yield make(i)
        return
    pending = collections.deque(_SAMPLER.submit(make, i) for i in range(first, min(first + ahead, len(starts))))
    try:
        for i in range(first, len(starts)):
            if i + ahead < len(starts):
                pending.append(_SAMPLER.submit(make, i + ahead))
            t = time.perf_counter()
            batch = pending.popleft().result()
            timing["wait"] += time.perf_counter() - t
            yield batch
    finally:
        for future in pending:
            future.cancel()
        concurrent.futures.wait(pending)


# ---------------------------------------------------------------------- training
def train(config: Config, out_dir: str, *, resume: bool = False, progress: bool = True,
          max_epochs: int | None = None) -> dict:
    """Train the configured model; write the run folder; return ``metrics.json``'s content.

    The folder's ownership is the caller's (:func:`dgmrec_dgl.run_folder.claimed`, as the CLI and ``fit``
    do); without it a fresh start removes the previous run's training files and ``resume`` without a
    checkpoint starts afresh.

    Args:
        config: the resolved configuration.
        out_dir: run folder (config.yaml, log.jsonl, last.pt, best.pt, metrics.json).
        resume: continue from ``out_dir/last.pt`` when it exists.
        progress: tqdm bars (epochs; steps within a long epoch; long evaluations).
        max_epochs: stop after this many epochs of this call (to test resuming).
    """
    t_start = time.perf_counter()
    s = _setup(config, out_dir)
    _restore(s, resume)
    if s.main:
        _write_finished(s, False)
    setup_seconds = time.perf_counter() - t_start
    tcfg = config.train
    run_epochs = 0
    bar = tqdm(range(s.state.epoch, tcfg.epochs), desc=config.model.name, disable=not (progress and s.main),
               initial=s.state.epoch, total=tcfg.epochs)
    for epoch in bar:
        if s.state.stopped or (max_epochs is not None and run_epochs >= max_epochs):
            break
        record = run_epoch(s, epoch, progress=progress and s.main)
        t = time.perf_counter()
        if (epoch + 1) % tcfg.eval_every == 0:
            # every rank: it may change parameters (DGMRec generates the new items' features)
            record["before_validation"] = s.model.before_validation(epoch, s.g, s.generator)
            if s.main:
                validate_and_keep_best(s, epoch, record, progress=progress)
        record["seconds"]["eval"] = time.perf_counter() - t
        note_peak_rss(record)
        if s.world.size > 1:
            s.state = RunState(**distributed.broadcast_object(asdict(s.state)))   # rank 0 decides early stopping
            record["replicas"] = _check_replicas(s.model, s.generator, epoch)
        s.state.epoch = epoch + 1
        run_epochs += 1
        if s.main:
            bar.set_postfix(loss=f"{sum(record['loss'].values()):.4f}",
                            best=f"{s.state.best_metric:.4f}" if s.state.best_epoch >= 0 else "-")
            _checkpoint(s, record)
    bar.close()
    result = _write_finished(s, s.state.stopped or s.state.epoch >= tcfg.epochs) if s.main else {}
    if s.world.size > 1:
        torch.distributed.barrier()     # rank 0's files are complete when train() returns on any rank
    result["setup_seconds"] = setup_seconds
    result["epochs_run"] = s.state.epoch
    return result


def _setup(config: Config, out_dir: str) -> Session:
    """Threads, seeds, the dataset, the model, its graph and the optimisers of a fresh run."""
    tcfg = config.train
    if tcfg.precision != "fp32" and config.model.name not in BF16_MODELS:
        raise DataError("config", "train.precision", f"{tcfg.precision} is not supported by model "
                        f"{config.model.name!r}", f"use train.precision: fp32, or one of the models "
                        f"{', '.join(BF16_MODELS)}")
    world = distributed.current_world()
    if world.is_main:
        os.makedirs(out_dir, exist_ok=True)
    threads = distributed.rank_threads(tcfg.threads, world.local_size) if world.size > 1 else tcfg.threads
    if threads:
        # Numba's parallel kernels reset the OpenMP thread count, so set both
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.manual_seed(tcfg.seed)
    if tcfg.keep_freed_memory and not _keep_freed_memory():
        raise DataError("config", "train.keep_freed_memory", "needs glibc's mallopt, which this system lacks",
                        "set train.keep_freed_memory: false")
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    if world.size > 1 and tcfg.checkpoint_steps:
        raise DataError("config", "train.checkpoint_steps", f"is {tcfg.checkpoint_steps}: checkpoints inside an "
                        "epoch are written by one process only",
                        "set train.checkpoint_steps: 0, or train with --nproc 1")
    if world.size > 1 and model.execution() == "sampled":
        raise DataError("config", "model.execution", "sampled mode does not run data-parallel on torch.distributed "
                        "(its row-sparse gradients are not all-reduced)",
                        "train sampled mode in one process (--nproc 1), or set model.execution: full")
    g = model.make_graph(dataset)
    optimizer = main_optimizer(model, config)
    return Session(config, out_dir, world, dataset.without_features(),   # the model has its own feature copies
                   model, g, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config)),
                   model.auxiliary_optimizer(), torch.Generator().manual_seed(tcfg.seed),
                   _step_precision(model, tcfg.precision), RunState())


def _restore(s: Session, resume: bool) -> None:
    """Continue from the last checkpoint (``resume``), or start the run folder afresh; replicas start identical."""
    ckpt = _last_checkpoint(s) if s.main and resume else None
    if s.world.size > 1:
        # rank 0's checkpoint, or its fresh model and graph, on every rank: the replicas start identical
        ckpt = distributed.broadcast_object(
            (ckpt or {"model": s.model.state_dict(), "graph_state": s.model.graph_state()}) if s.main else None)
        if "state" not in ckpt:        # a fresh start
            s.model.load_state_dict(ckpt["model"])
            s.g = s.model.load_graph_state(ckpt["graph_state"], s.g)
            ckpt = None
    if ckpt is not None:
        s.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["scheduler"])
        if s.auxiliary is not None:
            s.auxiliary.load_state_dict(ckpt["auxiliary"])
        s.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        s.state = RunState(**ckpt["state"])
        s.g = s.model.load_graph_state(ckpt["graph_state"], s.g)
        if s.main:
            _truncate_log(s.path("log.jsonl"), s.state.epoch)
    elif s.main:
        for stale in TRAINING_FILES:
            if os.path.exists(s.path(stale)):
                os.unlink(s.path(stale))
    if s.main:
        save_config(s.config, s.path("config.yaml"))      # a resumed run records its (extended) epochs


#: what a ``last.pt`` holds (:func:`_checkpoint`)
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "auxiliary", "generator", "torch_rng", "state", "graph_state")


def _last_checkpoint(s: Session) -> dict | None:
    """``last.pt``, or ``last.prev.pt`` (with a warning) when it does not load; None when neither exists.

    A checkpoint that does not load is removed once the previous one has (the next epoch would otherwise
    keep it as the previous checkpoint). DataError naming the file when neither loads.
    """
    paths = [s.path(name) for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT) if os.path.exists(s.path(name))]
    failed: list[tuple[str, str]] = []
    for path in paths:
        try:
            ckpt = _load(path)
            missing = [key for key in CHECKPOINT_KEYS if key not in ckpt] if isinstance(ckpt, dict) else ["a dict"]
            if missing:
                raise ValueError(f"lacks {', '.join(missing)}")
        except Exception as exc:        # truncated, corrupted, not a checkpoint, or objects beyond tensors
            failed.append((path, _first_line(exc)))
            continue
        if failed:
            warnings.warn(f"{failed[0][0]}: does not load ({failed[0][1]}); removed it and resuming from "
                          f"{path} (epoch {ckpt['state']['epoch']})")
            os.unlink(failed[0][0])
        return ckpt
    if failed:
        raise DataError(failed[0][0], "checkpoint", "does not load (" + "; ".join(
            f"{os.path.basename(p)}: {why}" for p, why in failed) + ")",
            "start the run afresh with --overwrite (or restore the checkpoint)")
    return None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _write_finished(s: Session, finished: bool) -> dict:
    """Set ``metrics.json``'s ``finished`` (written even before the first validation); returns its content."""
    path = s.path("metrics.json")
    metrics = {}
    if os.path.exists(path):
        with open(path) as fh:
            metrics = json.load(fh)
    metrics["finished"] = finished
    atomic_write_json(path, metrics)
    return metrics


#: an epoch of at least this many steps gets a progress bar of its own
STEP_BAR_MIN_STEPS = 200


def run_epoch(s: Session, epoch: int, *, progress: bool = False) -> dict:
    """One epoch: the model's per-epoch work, then a step per batch; returns the epoch's log record.

    With ``train.checkpoint_steps: N`` ``last.pt`` is also written after every N-th step. An epoch resumed
    from such a checkpoint (``s.state.step`` steps taken) skips the per-epoch work, whose results (parameters,
    graphs, generator) the checkpoint holds, and the steps taken, and goes on with the record it held:
    summed losses, seconds (``train`` adds up the sittings; ``checkpoint`` is the writing), and
    ``resumed_at_step``.
    """
    tcfg, model = s.config.train, s.model
    model.train()
    first = s.state.step
    if first:
        record, sums, timing = (s.state.partial[k] for k in ("record", "sums", "timing"))
        record["resumed_at_step"] = record.get("resumed_at_step", []) + [first]
    else:
        record, sums, timing = {"epoch": epoch, "execution": model.execution()}, {}, {}
        t0 = time.perf_counter()
        s.g, record["before_epoch"] = model.before_epoch(epoch, s.g, s.generator)
        record["seconds"] = {"train": 0.0, "before_epoch": time.perf_counter() - t0}
    seconds = record["seconds"]
    t1 = time.perf_counter()
    triples = epoch_triples(s.dataset, tcfg.seed, epoch, train_switch(s.config, "negatives"))
    if tcfg.epoch_steps:            # the epoch's first epoch_steps batches only
        triples = tuple(t[:tcfg.epoch_steps * tcfg.batch_size] for t in triples)
    n_batches = math.ceil(len(triples[0]) / tcfg.batch_size)
    record["steps"] = n_batches
    earlier = record.get("history", {"refreshes": 0, "seconds": 0.0})      # the sittings before this one
    refreshed = refresh_totals(model)

    def count_refreshes():          # the refreshes of the historical embeddings, inside the training seconds
        if histories_of(model):
            now = refreshes_since(model, refreshed)
            record["history"] = {"refreshes": earlier["refreshes"] + now["refreshes"],
                                 "seconds": round(earlier["seconds"] + now["seconds"], 3)}

    if s.world.size == 1:
        batches = epoch_batches(model, s.g, triples, tcfg.batch_size, tcfg.seed, epoch, ahead=tcfg.sample_ahead,
                                timing=timing, first=first)
        bar = tqdm(batches, initial=first, total=n_batches, desc=f"epoch {epoch}", leave=False, unit="step",
                   disable=not progress or n_batches < STEP_BAR_MIN_STEPS)
        for step, batch in enumerate(bar, start=first + 1):
            parts = training_step(model, s.g, batch, s.optimizer, s.generator, s.step_precision)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            if tcfg.checkpoint_steps and step % tcfg.checkpoint_steps == 0 and step < n_batches:
                t = time.perf_counter()
                seconds["train"] += t - t1
                count_refreshes()
                note_peak_rss(record)
                s.state.step, s.state.partial = step, {"record": record, "sums": sums, "timing": dict(timing)}
                _save_last(s)
                t1 = time.perf_counter()
                seconds["checkpoint"] = seconds.get("checkpoint", 0.0) + t1 - t
    else:
        _train_epoch_sharded(s, triples, epoch, sums)
    s.scheduler.step()
    seconds["train"] += time.perf_counter() - t1
    s.state.step, s.state.partial = 0, None
    record["loss"] = {k: v / max(n_batches, 1) for k, v in sums.items()}
    record["lr"] = s.optimizer.param_groups[0]["lr"]
    count_refreshes()
    for history in histories_of(model):     # not read again this epoch (the next one starts with a refresh):
        history.invalidate()                # their memory goes to the validation's whole-graph pass
    if model.execution() == "sampled":
        seconds.update({f"train_{k}": v for k, v in timing.items()})
    return record


#: the entries of a ``log.jsonl`` record that measure the run (time, memory), not what it computed: two
#: runs of the same seed differ in these only
MEASUREMENTS = ("seconds", "eval_seconds", "peak_rss_gb")


def peak_rss_gb() -> float:
    """The process's peak resident memory so far, GiB (the kernel's high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20        # KiB on Linux


def note_peak_rss(record: dict) -> None:
    """``record["peak_rss_gb"]``: the process's peak so far, or an earlier sitting's if higher (an epoch resumed
    from a checkpoint inside it carries its record on; the peak is over all its sittings)."""
    record["peak_rss_gb"] = round(max(record.get("peak_rss_gb", 0.0), peak_rss_gb()), 3)


def wall_seconds(record: dict) -> float:
    """The wall-clock seconds a ``log.jsonl`` record accounts for: its ``seconds`` entries but the parts of
    ``train`` (sampled mode's ``train_sample``, the sampler thread's work beside the steps, and ``train_wait``)."""
    return sum(v for k, v in record.get("seconds", {}).items() if not k.startswith("train_"))


def epoch_triples(dataset: Dataset, seed: int, epoch: int,
                  negatives: str = "all") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The BPR triples ``(users, pos, neg)`` of one epoch, ``[n_train]`` each: every train pair once in a
    seeded order, each with one uniform negative outside the user's train items, drawn among
    :func:`~dgmrec_dgl.data.new_items.negative_candidates` (``negatives``: ``all`` items or ``train_items``;
    never a new item in the release's new-items setting). Every execution mode and the data-parallel shards
    train on these.

    Held int32 while the ids fit (an epoch's triples live as long as it does: 354 MB instead of 707 MB at
    30.9M train pairs); :func:`batch_triples` cuts a batch out as int64.
    """
    train_csr = dataset.train_matrix()
    candidates = negative_candidates(dataset, negatives)
    users, pos, neg = bpr_triples(train_csr.indptr, train_csr.indices, dataset.n_items, seed * 100003 + epoch,
                                  candidates)
    del train_csr
    if max(dataset.n_users, dataset.n_items) <= np.iinfo(np.int32).max:
        users = users.astype(np.int32)      # one at a time: each int64 array is freed once its copy exists
        pos = pos.astype(np.int32)
        neg = neg.astype(np.int32)
    return torch.from_numpy(users), torch.from_numpy(pos), torch.from_numpy(neg)


def batch_triples(triples, rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of :func:`epoch_triples`, int64 ``(users, pos, neg)``: the batch a step trains on."""
    return tuple(t[rows].long() for t in triples)


def train_switch(config: Config, name: str):
    """The value of the train section's :data:`~dgmrec_dgl.config.FIDELITY` switch ``name`` under the
    model's ``fidelity`` (``paper`` for models without one)."""
    return getattr(resolve_fidelity(config.train, getattr(config.model, "fidelity", "paper")), name)


def validate_and_keep_best(s: Session, epoch: int, record: dict, *, progress: bool = False,
                           embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                           model_state: dict | None = None) -> None:
    """Valid metrics into ``record``; on a better one, test, ``best.pt`` and ``metrics.json``; early stopping.

    ``embeddings`` (user, item) are what the ranking scores by inner product (default: the model's forward
    on its scoring graph); ``model_state`` what ``best.pt`` holds (default: ``model.state_dict()``).
    Distributed training passes both, computed over the partitions.
    """
    config, model, state = s.config, s.model, s.state
    t = time.perf_counter()
    if embeddings is None:
        embeddings = model_embeddings(model, model.scoring_graph(s.g))
    timing = record["eval_seconds"] = {"embeddings": time.perf_counter() - t}     # parts of seconds.eval
    t = time.perf_counter()
    valid = evaluate_embeddings(*embeddings, s.dataset, "valid", config, user_sample=config.eval.user_sample,
                                progress=progress)
    timing["valid"] = time.perf_counter() - t
    record["valid"] = valid
    metric = valid[config.eval.select_metric]
    if metric > state.best_metric:
        state.best_metric, state.best_epoch, state.bad_validations = metric, epoch, 0
        t = time.perf_counter()
        test = evaluate_embeddings(*embeddings, s.dataset, "test", config, by_missing_level=True, progress=progress)
        timing["test"] = time.perf_counter() - t
        record["test"] = test
        _save(s.path("best.pt"), model=model.state_dict() if model_state is None else model_state, epoch=epoch,
              graph_state=model.graph_state())
        atomic_write_json(s.path("metrics.json"),
                          {"best_epoch": epoch, "valid": valid, "test": test, "execution": model.execution(),
                           "data": {"imputation": s.dataset.imputation, "reduction": s.dataset.reduction},
                           **s.notes, "finished": False})
    else:
        state.bad_validations += 1
        # reach patience (ours), or exceed it as the release's early_stopping does (train.patience_rule)
        rule = train_switch(config, "patience_rule")
        state.stopped = state.bad_validations >= config.train.patience + (rule == "exceed")


def _checkpoint(s: Session, record: dict) -> None:
    """Append the epoch's record to ``log.jsonl`` and write ``last.pt`` (atomically; the previous one kept)."""
    with open(s.path("log.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    _save_last(s)


def _save_last(s: Session) -> None:
    """``last.pt``: everything a run resumes from (:data:`CHECKPOINT_KEYS`), atomically; the previous one kept."""
    _save(s.path(LAST_CHECKPOINT), keep_previous=s.path(PREVIOUS_CHECKPOINT),
          model=s.model.state_dict(), optimizer=s.optimizer.state_dict(),
          scheduler=s.scheduler.state_dict(),
          auxiliary=s.auxiliary.state_dict() if s.auxiliary is not None else None,
          generator=s.generator.get_state(), torch_rng=torch.get_rng_state(), state=asdict(s.state),
          graph_state=s.model.graph_state())


def main_optimizer(model: Recommender, config: Config) -> RowSparseAdam:
    """The optimiser of ``model.main_parameters()``: Adam (fused) that also steps row-sparse gradients.

    Row-sparse gradients get dense Adam's maths, except in sampled mode, where the lazy update touches
    only the rows a step read (:mod:`dgmrec_dgl.optim`).
    """
    return RowSparseAdam(model.main_parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay,
                         lazy=model.execution() == "sampled")


def _keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (``train.keep_freed_memory``); False without glibc.

    By default glibc maps every allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap``
    and unmaps it on free, so each training step page-faults and zero-fills its large tensors anew (the
    decoder output and its gradient, ``[n_items, d_m]`` each): at Baby size ``fill_`` was 13-26% of the
    step's CPU time. ``M_MMAP_MAX = 0`` serves every allocation from the heap and a 2 GB
    ``M_TRIM_THRESHOLD`` keeps freed heap memory in the process, so the next step reuses warm pages.
    The setting is process-wide and cannot be undone; the process keeps its peak heap.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4          # glibc's <malloc.h> parameter numbers
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


#: models whose training step was checked under bf16 autocast (CI2MG's optimal-transport autograd Function
#: is not autocast-aware: its backward multiplies a bfloat16 plan by a float32 gradient)
BF16_MODELS = ("dgmrec", "lightgcn", "mfbpr")


def _step_precision(model: Recommender, precision: str):
    """The context a training step's forward + loss runs in (``train.precision``); a no-argument factory.

    ``fp32``: no context, the reference's maths. ``bf16``: ``torch.autocast("cpu", torch.bfloat16)``, so
    matrix products (every ``nn.Linear``: the encoders over all items' raw features, the decoder, the
    generators; the InfoNCE similarity products) run in bfloat16, while parameters, their gradients, the
    optimiser state and the raw feature tables stay float32. Everything outside the step (CLUB steps,
    generation, refinement, evaluation) runs in float32.

    Under autocast a Linear layer returns bfloat16, which DGL's weighted SpMM refuses next to the float32
    edge weights (``u_mul_e``: "node features' data type ... doesn't match edge features'") and which would
    put the element-wise maths (sigmoid, tanh, propagation sums, BPR's logsigmoid, norms) in bfloat16 as well.
    So a forward hook casts every bfloat16 output of a leaf module back to float32: only the products are
    bfloat16, the message passing and the losses are float32 (cross-entropy and MSE are float32 under
    torch's CPU autocast policy anyway; logsigmoid and norm are not). The hooks are inactive outside autocast.
    """
    if precision == "fp32":
        return contextlib.nullcontext

    def to_fp32(module, args, output):
        if isinstance(output, torch.Tensor) and output.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
            return output.float()
        return output

    for module in model.modules():
        if next(module.children(), None) is None:
            module.register_forward_hook(to_fp32)
    return lambda: torch.autocast("cpu", dtype=torch.bfloat16)


def _train_epoch_sharded(s: Session, triples, epoch: int, sums: dict[str, float]) -> None:
    """One epoch of data-parallel steps (see :mod:`dgmrec_dgl.distributed`).

    Adds to ``sums`` the loss parts as full-batch values: each rank's parts weighted by its share of the
    batch, summed over ranks.
    """
    users = triples[0]
    model, world, batch_size = s.model, s.world, s.config.train.batch_size
    generator = distributed.rank_generator(s.config.train.seed, epoch, world.rank)
    params = [p for p in model.main_parameters() if p.requires_grad]

    def sync():
        distributed.average_gradients(params, world.size)

    local: dict[str, float] = {}
    for start in range(0, len(users), batch_size):
        n = min(batch_size, len(users) - start)
        lo, hi = distributed.shard_bounds(n, world.rank, world.size)
        if hi == lo:                    # a batch smaller than the world leaves some shards empty
            s.optimizer.zero_grad(set_to_none=True)
            sync()
            s.optimizer.step()
            continue
        batch = model.sample_batch(s.g, *batch_triples(triples, slice(start + lo, start + hi)))
        parts = training_step(model, s.g, batch, s.optimizer, generator, s.step_precision,
                              loss_weight=distributed.shard_weight(hi - lo, n, world.size), sync=sync)
        for k, v in parts.items():
            local[k] = local.get(k, 0.0) + v * (hi - lo) / n
    for part in distributed.gather_objects(local):
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v


def _check_replicas(model: Recommender, generator: torch.Generator, epoch: int) -> list[str]:
    """Every rank's hash of parameters, buffers, graph state and shared RNG; an error if they differ."""
    prints = distributed.gather_objects(
        distributed.fingerprint(model.state_dict(), model.graph_state(), generator.get_state()))
    if len(set(prints)) > 1:
        raise RuntimeError(f"epoch {epoch}: the ranks' models diverged (fingerprints {prints}); "
                           "before_epoch must be deterministic given the parameters and the generator")
    return prints


def evaluate_model(model: Recommender, g, dataset: Dataset, split: str, config: Config,
                   by_missing_level: bool = False, *, user_sample: int = 0, progress: bool = False) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``split`` (:func:`evaluate_embeddings` of :func:`model_embeddings`)."""
    return evaluate_embeddings(*model_embeddings(model, g), dataset, split, config, by_missing_level,
                               user_sample=user_sample, progress=progress)


def model_embeddings(model: Recommender, g) -> tuple[torch.Tensor, torch.Tensor]:
    """``(user [n_users, d'], item [n_items, d'])`` whose inner products are the model's scores (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        user, item = model.embeddings(g)
    model.train()
    return user, item


def evaluate_embeddings(user: torch.Tensor, item: torch.Tensor, dataset: Dataset, split: str, config: Config,
                        by_missing_level: bool = False, *, user_sample: int = 0,
                        progress: bool = False) -> dict[str, float]:
    """Full-ranking metrics on ``split`` of the scores ``user @ item.T`` (rows in the dataset's ids).

    With ``by_missing_level`` (and a mask), adds ``<metric>/group=g``: the metric over held-out items
    missing g modalities (the paper's Fig. 3 breakdown). ``user_sample > 0`` ranks for that many users of
    the split only, drawn with ``config.train.seed`` (the same users at every validation).
    """
    groups = dataset.mask.n_missing() if by_missing_level and dataset.mask is not None else None
    return evaluate(None, dataset, split, config.eval.ks, factors=(user, item),      # evaluate runs without grad
                    budget_bytes=config.eval.budget_mb << 20, item_groups=groups, user_sample=user_sample,
                    seed=config.train.seed, masks_valid=config.eval.test_masks_valid, progress=progress)


def load_run(run_dir: str):
    """``(config, dataset, model, graph)`` of a run folder's best checkpoint, ready to score."""
    config_path, best_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "best.pt")
    for path in (config_path, best_path):
        if not os.path.exists(path):
            raise DataError(path, "file", "does not exist",
                            "pass a run folder written by `dgmrec-dgl train` that reached a validation")
    config = load_config(config_path)
    dataset = load_dataset(config)
    try:
        ckpt = _load(best_path)
    except Exception as exc:            # truncated, corrupted, or objects beyond tensors and plain values
        raise DataError(best_path, "checkpoint", f"does not load ({_first_line(exc)})",
                        "train the run again (dgmrec-dgl train --overwrite)") from None
    model = build_model(config, dataset)
    model.load_state_dict(ckpt["model"])
    model.eval()
    g = model.load_graph_state(ckpt["graph_state"], model.make_graph(dataset))
    return config, dataset, model, model.scoring_graph(g)


def _truncate_log(path: str, n_epochs: int) -> None:
    """Keep the first ``n_epochs`` lines of a log (an interrupted epoch may have logged past the checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()[:n_epochs]
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.writelines(lines)
