"""Training any :class:`~dgmrec_dgl.models.base.Recommender`: one readable loop, timing and logging inline.

Per epoch (the reference schedule, DGMRec_SPEC §1 and §4):

1. ``model.before_epoch``: for DGMRec the CLUB estimator steps, the generation of the raw-feature rows of
   items missing a modality and, every ``refresh_every`` epochs, the refinement of their kNN rows (Eq. 16).
2. BPR triples (one uniform negative per train interaction, Numba sampler), mini-batches, Adam with the
   lr multiplied by ``lr_decay^(epoch / lr_decay_every)``; each step's loss reads
   ``model.batch_forward`` (the whole graph, or DGMRec's exact blocks with ``model.execution: blocks``).
3. Every ``eval_every`` epochs: valid Recall@20 (full ranking); the best model is checkpointed atomically
   and tested; training stops after ``patience`` validations without improvement.

Each epoch appends one JSON line to ``log.jsonl`` (losses; seconds in training, generation/refinement and
evaluation). ``last.pt`` is written atomically after every epoch, so ``resume=True`` continues a killed
run to the same result as an uninterrupted one.

Called inside an initialised ``torch.distributed`` group of more than one process, the same loop trains
data-parallel (:mod:`dgmrec_dgl.distributed`: each rank takes a shard of every batch, gradients are
averaged; rank 0 alone evaluates and writes the run folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numba
import torch
from tqdm.auto import tqdm

from kernels.sampling import bpr_triples

from . import distributed
from .config import Config, load_config, save_config
from .data.dataset import Dataset
from .data.masks import MissingMask
from .data.new_items import new_items_split
from .errors import DataError
from .evaluate import evaluate
from .inject import apply_injection
from .io_utils import atomic_path, atomic_write_json
from .models import build_model
from .models.base import Recommender
from .optim import RowSparseAdam


def load_dataset(config: Config, *, prepare_features: bool = True) -> Dataset:
    """The dataset of ``config.data``: loaded, new-items split if asked, reduced if asked, masked, imputed.

    The PCA reduction (``data.reduce_dims``) is fitted on the items the mask leaves with each modality
    and applied before imputation, so the imputed rows are written only at the reduced width. With
    ``prepare_features=False`` it stops after the split (for what needs only the interactions): the
    features stay as read, without mask, reduction, imputation or injection.
    """
    cfg = config.data
    dataset = Dataset.load(cfg.dir, inter=cfg.inter, require_features=True, feature_dtype=cfg.feature_dtype)
    if cfg.new_items:
        dataset = new_items_split(dataset, seed=cfg.new_items_seed)
    if not prepare_features:
        return dataset
    mask = None
    if cfg.mask:
        mask = MissingMask.load(cfg.mask, dataset.n_items, dataset.modalities or None, allow_pickle=cfg.allow_pickle)
    elif cfg.missing_ratio is not None:
        mask = MissingMask.generate(dataset.n_items, dataset.modalities, cfg.missing_ratio, cfg.mask_seed)
    dataset = dataset.reduced(cfg.reduce_dims, sample=cfg.reduce_sample, seed=cfg.reduce_seed,
                              dtype=cfg.feature_dtype, mask=mask)
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


def _save(path, **payload):
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)


def _lr_factor(config: Config):
    t = config.train
    return lambda epoch: t.lr_decay ** (epoch / t.lr_decay_every)


# ---------------------------------------------------------------------- training
def train(config: Config, out_dir: str, *, resume: bool = False, progress: bool = True,
          max_epochs: int | None = None) -> dict:
    """Train the configured model; write the run folder; return ``metrics.json``'s content.

    Args:
        config: the resolved configuration.
        out_dir: run folder (config.yaml, log.jsonl, last.pt, best.pt, metrics.json).
        resume: continue from ``out_dir/last.pt`` when it exists.
        progress: tqdm bar.
        max_epochs: stop after this many epochs of this call (to test resuming).
    """
    tcfg = config.train
    if tcfg.precision != "fp32" and config.model.name not in BF16_MODELS:
        raise DataError("config", "train.precision", f"{tcfg.precision} is not supported by model "
                        f"{config.model.name!r}", f"use train.precision: fp32, or one of the models "
                        f"{', '.join(BF16_MODELS)}")
    world = distributed.current_world()
    main = world.is_main                # only rank 0 writes
    if main:
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

    t_start = time.perf_counter()
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    dataset = dataset.without_features()   # the model has its own copies; training reads the interactions
    step_precision = _step_precision(model, tcfg.precision)
    optimizer = main_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    auxiliary = model.auxiliary_optimizer()
    generator = torch.Generator().manual_seed(tcfg.seed)
    state = RunState()

    last_path, log_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "log.jsonl")
    ckpt = torch.load(last_path, weights_only=False) if main and resume and os.path.exists(last_path) else None
    if world.size > 1:
        # rank 0's checkpoint, or its fresh model and graph, on every rank: the replicas start identical
        ckpt = distributed.broadcast_object(
            (ckpt or {"model": model.state_dict(), "graph_state": model.graph_state()}) if main else None)
        if "state" not in ckpt:        # a fresh start
            model.load_state_dict(ckpt["model"])
            g = model.load_graph_state(ckpt["graph_state"], g)
            ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if auxiliary is not None:
            auxiliary.load_state_dict(ckpt["auxiliary"])
        generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = RunState(**ckpt["state"])
        g = model.load_graph_state(ckpt["graph_state"], g)
        if main:
            _truncate_log(log_path, state.epoch)
    elif main:
        save_config(config, os.path.join(out_dir, "config.yaml"))
        for stale in (log_path, last_path, os.path.join(out_dir, "metrics.json")):
            if os.path.exists(stale):
                os.unlink(stale)
    train_csr = dataset.train_matrix()
    setup_seconds = time.perf_counter() - t_start

    run_epochs = 0
    bar = tqdm(range(state.epoch, tcfg.epochs), desc=config.model.name, disable=not (progress and main),
               initial=state.epoch, total=tcfg.epochs)
    for epoch in bar:
        if state.stopped or (max_epochs is not None and run_epochs >= max_epochs):
            break
        record: dict = {"epoch": epoch}
        model.train()
        t0 = time.perf_counter()
        g, record["before_epoch"] = model.before_epoch(epoch, g, generator)
        t1 = time.perf_counter()

        users, pos, neg = (torch.from_numpy(a) for a in bpr_triples(
            train_csr.indptr, train_csr.indices, dataset.n_items, tcfg.seed * 100003 + epoch))
        sums: dict[str, float] = {}
        n_batches = 0
        if world.size == 1:
            for start in range(0, len(users), tcfg.batch_size):
                sl = slice(start, start + tcfg.batch_size)
                with step_precision():
                    loss, parts = model.loss(*model.batch_forward(g, users[sl], pos[sl], neg[sl]), generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                n_batches += 1
        else:
            n_batches = _train_epoch_sharded(model, g, optimizer, (users, pos, neg), tcfg.batch_size, world,
                                             distributed.rank_generator(tcfg.seed, epoch, world.rank), sums,
                                             step_precision)
        scheduler.step()
        t2 = time.perf_counter()
        record["loss"] = {k: v / max(n_batches, 1) for k, v in sums.items()}
        record["lr"] = optimizer.param_groups[0]["lr"]

        if main and (epoch + 1) % tcfg.eval_every == 0:
            g_score = model.scoring_graph(g)
            valid = evaluate_model(model, g_score, dataset, "valid", config)
            record["valid"] = valid
            metric = valid[config.eval.select_metric]
            if metric > state.best_metric:
                state.best_metric, state.best_epoch, state.bad_validations = metric, epoch, 0
                test = evaluate_model(model, g_score, dataset, "test", config, by_missing_level=True)
                record["test"] = test
                _save(os.path.join(out_dir, "best.pt"), model=model.state_dict(), epoch=epoch,
                      graph_state=model.graph_state())
                atomic_write_json(os.path.join(out_dir, "metrics.json"),
                                  {"best_epoch": epoch, "valid": valid, "test": test,
                                   "data": {"imputation": dataset.imputation, "reduction": dataset.reduction}})
            else:
                state.bad_validations += 1
                state.stopped = state.bad_validations >= tcfg.patience
        t3 = time.perf_counter()
        record["seconds"] = {"train": t2 - t1, "before_epoch": t1 - t0, "eval": t3 - t2}
        if world.size > 1:
            state = RunState(**distributed.broadcast_object(asdict(state)))   # rank 0 decides early stopping
            record["replicas"] = _check_replicas(model, generator, epoch)
        state.epoch = epoch + 1
        run_epochs += 1
        if not main:
            continue
        bar.set_postfix(loss=f"{sum(record['loss'].values()):.4f}",
                        best=f"{state.best_metric:.4f}" if state.best_epoch >= 0 else "-")
        with open(log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        _save(last_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
              scheduler=scheduler.state_dict(),
              auxiliary=auxiliary.state_dict() if auxiliary is not None else None,
              generator=generator.get_state(), torch_rng=torch.get_rng_state(), state=asdict(state),
              graph_state=model.graph_state())
    bar.close()
    if world.size > 1:
        torch.distributed.barrier()     # rank 0's files are complete when train() returns on any rank
    metrics_path = os.path.join(out_dir, "metrics.json")
    result = {}
    if main and os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            result = json.load(fh)
    result["setup_seconds"] = setup_seconds
    result["epochs_run"] = state.epoch
    return result


def main_optimizer(model: Recommender, config: Config) -> RowSparseAdam:
    """The optimiser of ``model.main_parameters()``: Adam (fused) that also steps row-sparse gradients."""
    return RowSparseAdam(model.main_parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


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


def _train_epoch_sharded(model: Recommender, g, optimizer, triples, batch_size: int, world, generator,
                         sums: dict[str, float], step_precision=contextlib.nullcontext) -> int:
    """One epoch of data-parallel steps (see :mod:`dgmrec_dgl.distributed`); returns the number of batches.

    Adds to ``sums`` the loss parts as full-batch values: each rank's parts weighted by its share of the
    batch, summed over ranks.
    """
    users, pos, neg = triples
    params = [p for p in model.main_parameters() if p.requires_grad]
    local: dict[str, float] = {}
    n_batches = 0
    for start in range(0, len(users), batch_size):
        n = min(batch_size, len(users) - start)
        lo, hi = distributed.shard_bounds(n, world.rank, world.size)
        optimizer.zero_grad(set_to_none=True)
        if hi > lo:                     # a batch smaller than the world leaves some shards empty
            sl = slice(start + lo, start + hi)
            with step_precision():
                loss, parts = model.loss(*model.batch_forward(g, users[sl], pos[sl], neg[sl]), generator)
            (loss * distributed.shard_weight(hi - lo, n, world.size)).backward()
            for k, v in parts.items():
                local[k] = local.get(k, 0.0) + v * (hi - lo) / n
        distributed.average_gradients(params, world.size)
        optimizer.step()
        n_batches += 1
    for part in distributed.gather_objects(local):
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
    return n_batches


def _check_replicas(model: Recommender, generator: torch.Generator, epoch: int) -> list[str]:
    """Every rank's hash of parameters, buffers, graph state and shared RNG; an error if they differ."""
    prints = distributed.gather_objects(
        distributed.fingerprint(model.state_dict(), model.graph_state(), generator.get_state()))
    if len(set(prints)) > 1:
        raise RuntimeError(f"epoch {epoch}: the ranks' models diverged (fingerprints {prints}); "
                           "before_epoch must be deterministic given the parameters and the generator")
    return prints


def evaluate_model(model: Recommender, g, dataset: Dataset, split: str, config: Config,
                   by_missing_level: bool = False) -> dict[str, float]:
    """Full-ranking metrics of ``model`` on ``split``.

    With ``by_missing_level`` (and a mask), adds ``<metric>/group=g``: the metric over held-out items
    missing g modalities (the paper's Fig. 3 breakdown).
    """
    groups = dataset.mask.n_missing() if by_missing_level and dataset.mask is not None else None
    model.eval()
    with torch.no_grad():
        user, item = model.fused(model(g))
        result = evaluate(lambda users: user[users] @ item.T, dataset, split, config.eval.ks,
                          budget_bytes=config.eval.budget_mb << 20, item_groups=groups)
    model.train()
    return result


def load_run(run_dir: str):
    """``(config, dataset, model, graph)`` of a run folder's best checkpoint, ready to score."""
    config_path, best_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "best.pt")
    for path in (config_path, best_path):
        if not os.path.exists(path):
            raise DataError(path, "file", "does not exist",
                            "pass a run folder written by `dgmrec-dgl train` that reached a validation")
    config = load_config(config_path)
    dataset = load_dataset(config)
    ckpt = torch.load(best_path, weights_only=False)
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
