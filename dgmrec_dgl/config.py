"""Run configuration: one typed object built from YAML and passed down (no globals).

A YAML file has up to four sections, each optional, each checked key by key::

    data:   {dir, inter, mask, missing_ratio, mask_seed, imputation, new_items, new_items_protocol, ...}
    train:  {epochs, batch_size, lr, weight_decay, lr_decay, lr_decay_every, eval_every, patience, seed, ...}
    model:  {name, embedding_dim, n_ui_layers, ...}   # the model's own hyper-parameters
    eval:   {ks, budget_mb, select_metric, user_sample, test_masks_valid}

Defaults are the reference's (``../shared/docs/DGMRec_SPEC.md`` §1, §5). An unknown key, a value of the
wrong type or a value outside its range (:data:`RULES`: positive sizes, finite positive rates, probabilities
in [0, 1], enum choices, a ``select_metric`` the evaluator computes) is a
:class:`~dgmrec_dgl.errors.DataError` naming the file, the key, the bad value and the fix, raised before any
data is read. ``extends:`` names another YAML file (relative to this one) whose values this file overrides.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Callable

import yaml

from .data.dataset import IMPUTATIONS
from .data.io import FEATURE_DTYPES
from .data.new_items import PROTOCOLS as NEW_ITEMS_PROTOCOLS
from .errors import DataError
from .inject import INJECTIONS
from .io_utils import atomic_write_text


@dataclass
class DataConfig:
    dir: str = ""
    inter: str | None = None
    mask: str | None = None            # a mask file; else generated with missing_ratio / mask_seed
    missing_ratio: float | None = None
    mask_seed: int = 2024
    imputation: str = "mean"           # mean (reference), zero, nn
    new_items: bool = False            # the new-items setting (20% stratified, seed 1111)
    new_items_seed: int = 1111
    # release: the authors' protocol (shipped *_del.inter split or their draw; every test row + the new items'
    # removed train rows; negatives never new; DGMRec's inference graphs); test_new_only: this package's
    # protocol before issue 19 (dgmrec_dgl.data.new_items)
    new_items_protocol: str = "release"
    allow_pickle: bool = False
    inject: str = "none"               # feature injection after masking: none, mean, nn (dgmrec_dgl.inject)
    # Memory-bounded features (dgmrec_dgl.data.io / .reduce). float32 and float16 files are memory-mapped as
    # they are; feature_dtype is the dtype of matrices the data path creates (float64 files' conversion,
    # reduced features): float32 or float16.
    feature_dtype: str = "float32"
    # PCA: every modality wider than this is projected to this width, or a mapping modality -> width
    # ({image: 256}: only the image, the 1M preset's widths; the other modalities stay as they are)
    reduce_dims: int | dict[str, int] | None = None
    reduce_sample: int = 50_000        # rows (items having the modality) the PCA is fitted on
    reduce_seed: int = 0               # seed of the PCA sample and random projection


@dataclass
class TrainConfig:
    epochs: int = 500
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 0.96             # lr × lr_decay^(epoch / lr_decay_every)
    lr_decay_every: int = 50
    eval_every: int = 3
    patience: int = 30                 # validations without a better valid Recall@20
    # Stop once the validations without improvement reach `patience` (ours) or exceed it (the release's
    # early_stopping: `cur_step > stopping_step`, one validation more). None: model.fidelity's choice.
    patience_rule: str | None = None
    # BPR negatives drawn among every item (ours) or among the items with train rows (the release's
    # sampler, in every setting: its train loader draws from the train file's items). None: model.fidelity's.
    negatives: str | None = None
    seed: int = 999
    device: str = "cpu"
    threads: int = 0                   # torch threads; 0 = torch's default
    # Arithmetic of the training steps' forward + loss: fp32 (the reference's maths) or bf16 (CPU autocast
    # to bfloat16 for matrix products; weights, optimiser state and raw feature tables stay float32;
    # evaluation, generation and refinement stay float32). See dgmrec_dgl.train.
    precision: str = "fp32"
    # glibc only: serve every allocation from the heap and keep freed memory for reuse, instead of
    # mapping large tensors afresh (and zero-filling new pages) on every step. Faster steps, higher RSS
    # (DGMRec, baby-shaped data: 43.4-44.4 -> 37.2-38.4 s/epoch, peak 2.24 -> 2.78 GB). See dgmrec_dgl.train.
    keep_freed_memory: bool = False
    # Sampled mode: batches drawn ahead of the step by a background thread (0: draw each batch after the
    # previous step, no overlap). See dgmrec_dgl.train.epoch_batches.
    sample_ahead: int = 2
    # Stop every epoch after this many steps (0: every batch): smoke runs and benchmarks of catalogs whose
    # epochs are long (bench/dist_scale.py); the log records the steps each epoch ran.
    epoch_steps: int = 0
    # Also write last.pt after every this many steps inside an epoch (0: at the end of each epoch only), so
    # a killed run of long epochs resumes at the last such step, to the same metrics. One process only; with
    # model.history_every a multiple of it (a resumed epoch refreshes its histories where the run did).
    checkpoint_steps: int = 0

    def __setattr__(self, name, value):
        if name == "precision":
            check_value("config", "train", name, value, TrainConfig)
        super().__setattr__(name, value)


PRECISIONS = ("fp32", "bf16")


@dataclass
class EvalConfig:
    ks: tuple[int, ...] = (10, 20, 50)
    budget_mb: int = 256               # memory for one chunk of scores
    select_metric: str = "recall@20"
    # validations during training rank for a seeded sample of this many valid users (0: all of them); the
    # test of the best model always ranks every test user
    user_sample: int = 0
    # the test ranking masks each user's train items (false: the release's and MMRec's protocol, which the
    # published numbers use) or train and valid items (true: this package's protocol before issue 19)
    test_masks_valid: bool = False



EXECUTIONS = ("full", "blocks", "sampled", "auto")
#: ``execution: auto`` picks ``full`` below ``blocks_min_items`` items, ``blocks`` from there (DGMRec; the other
#: models' blocks mode is their full step) and ``sampled`` from ``sampled_min_items`` items on. One DGMRec
#: training step (batch 2048, image 4096-d + text 384-d, 2/3 missing, n_mm_layers 1, 2 threads; median of
#: 5-8 steps, two runs each), seconds full -> blocks, peak RSS during the steps in GB:
#:     7,066 items (baby preset)      0.64-0.67 -> 0.64-0.72   2.2 -> 2.2
#:    18,553 items (sports preset)    1.39-1.45 -> 1.24-1.29   3.8 -> 3.6
#:    50,000 items (100K users)       4.35-4.45 -> 3.92-3.98   7.7-8.0 -> 7.4
#:   200,000 items (image 256-d)      9.40-9.79 -> 4.05-4.07   7.3 -> 6.3
#: Blocks mode breaks even between 7K and 19K items; the threshold sits above the largest reference catalog
#: (Clothing, 23,033 items), so `auto` keeps the all-item reconstruction loss on every reference-sized dataset.
BLOCKS_MIN_ITEMS = 25_000
#: Sampled mode pays once a step's sampled receptive field is a small part of the graph. At 50K items (100K
#: users, 1.5M train interactions) three fanout-10 hops from a 2,048-triple batch reached 97% of the users
#: and every item, and LightGCN's sampled step took 0.61 s against 0.28 s for the full-graph step (loaded
#: machine); at 1M items (2M users, 30.9M interactions) 5.6 s against 13.0 s. Measured between those two
#: sizes is still to do; until then `auto` samples from 200,000 items on.
SAMPLED_MIN_ITEMS = 200_000


class _ChecksExecution:
    """Base of the model configs with ``execution``: the sampled-mode keys are checked on assignment."""

    def __setattr__(self, name, value):
        if name in ("execution", "blocks_min_items", "sampled_min_items", "fanouts", "user_items_sample",
                    "item_users_sample", "history_every"):
            check_value("config", "model", name, value, type(self))
        super().__setattr__(name, value)


def resolve_execution(config, n_items: int) -> str:
    """``full``, ``blocks`` or ``sampled``: the mode ``config.execution`` selects for ``n_items`` items."""
    if config.execution == "auto":
        if n_items >= config.sampled_min_items:
            return "sampled"
        return "blocks" if n_items >= config.blocks_min_items else "full"
    return config.execution


#: fanout of every user-item layer when ``model.fanouts`` is left empty
DEFAULT_FANOUT = 10


def _layers_key(config) -> str:
    """The key holding a model config's user–item layer count (DGMRec: ``n_ui_layers``; LightGCN: ``n_layers``)."""
    return "n_ui_layers" if hasattr(config, "n_ui_layers") else "n_layers"


def layer_fanouts(config) -> list[int]:
    """The fanout of each user–item layer (input layer first): ``config.fanouts``, or 10 for every layer."""
    return list(config.fanouts) or [DEFAULT_FANOUT] * getattr(config, _layers_key(config))


def drawn_fanouts(config) -> list[int]:
    """The fanouts a sampled step draws: every layer's, or with historical embeddings the seeds' layer only."""
    fanouts = layer_fanouts(config)
    return fanouts[-1:] if config.history_every else fanouts


def _check_fanouts(source: str, model) -> None:
    """``model.fanouts``, when given, must have one entry per propagation layer."""
    if not getattr(model, "fanouts", ()):
        return
    key = _layers_key(model)
    n_layers = getattr(model, key)
    if len(model.fanouts) != n_layers:
        raise DataError(source, "model.fanouts", f"has {len(model.fanouts)} entries but model.{key} is {n_layers}",
                        f"give one fanout per layer (input layer first), e.g. fanouts: {[10] * n_layers}")


def _check_checkpoint_steps(source: str, config) -> None:
    """With historical embeddings, ``train.checkpoint_steps`` must be a multiple of ``model.history_every``:
    a resumed epoch then starts on a step where the uninterrupted run refreshed its tables too."""
    every, history = config.train.checkpoint_steps, getattr(config.model, "history_every", 0)
    if every and history and every % history:
        raise DataError(source, "train.checkpoint_steps", f"{every} is not a multiple of model.history_every "
                        f"({history}): a run resumed there would refresh its histories where the uninterrupted "
                        f"run did not",
                        f"use a multiple of {history}, e.g. checkpoint_steps: {history * max(1, round(every / history))}")


@dataclass
class DGMRecConfig(_ChecksExecution):
    """DGMRec hyper-parameters; defaults are the reference's `default` column."""

    name: str = "dgmrec"
    embedding_dim: int = 64
    n_ui_layers: int = 3
    n_mm_layers: int = 1
    knn_k: int = 10
    reg_id: float = 1e-5               # L2 on the batch's ID embeddings
    reg: float = 0.1                   # L2 on the modality representations of positives
    recon: float = 0.1
    additive: float = 1.0              # generation loss weight
    sampler: float = 0.01              # CLUB weight
    inter_modal: float = 0.01
    inter_modal_temp: float = 0.4
    intra_modal: float = 0.01
    intra_modal_temp: float = 0.1
    align_bm: float = 0.01
    align_bm_temp: float = 0.2
    avg_lambda: float = 0.8            # weight of the REBUILT graph rows (the paper's α = 1 − avg_lambda)
    refresh_every: int = 5             # epochs between kNN refinements
    perturb_eps: float = 0.1
    club_hidden: int = 32
    club_lr: float = 1e-4
    club_steps: int = 5
    club_batch: int = 2048
    generate: bool = True                  # False: no generation and no refinement (Table 4 "w/o Generation")
    generate_multi_missing: bool = False   # also overwrite rows of items missing several modalities
    # Where the authors' release and the paper differ (README, "Where the release and the paper differ";
    # FIDELITY below): one switch per difference. A switch left None follows `fidelity` (paper: our
    # default, the paper's maths; release: what ptkjw1997/DGMRec's code does), resolved by
    # resolve_fidelity(); a value given explicitly wins. Values: paper | release.
    fidelity: str = "paper"
    knn_candidates: str | None = None      # top-k among present items | all items, then missing columns dropped
    generation_input: str | None = None    # general translators read ḡ (filtered, propagated) | E^g (encoder output)
    loss_items: str | None = None          # rows of the Eq. 8 / 12-14 item terms: unique(pos) | unique(pos ∪ neg)
    club_items: str | None = None          # rows of the CLUB term (Eq. 7) in the loss: positives | all items
    refine_count_from: int | None = None   # epochs counted from 0 (refine before epoch 5, 10, ...) | 1 (4, 9, ...)
    perturb_over: str | None = None        # noise of norm perturb_eps on each of [ḡ, s̄] | on their concatenation
    linear_bias_init: str | None = None    # biases of encoders, decoders, generators: zero | uniform (PyTorch's)
    ui_align_audio: str | None = None      # UI-align's audio term on s̄_a | ḡ_a (release, 3 modalities)
    refine_rows: str | None = None         # rows refined: items lacking m | lacking m alone (release, 3 modalities)
    score_with_refined_graph: bool | None = None  # scores on the refined graph | the initial one (journal release)
    refine_sources: str | None = None      # new edges of refined rows from items having m | all items
    # Eq. 16 blends by union, so a refined row gains up to knn_k columns per refinement and never loses
    # one. A refined entry below refine_tolerance x its row's largest is dropped; 0 keeps the paper's maths.
    refine_tolerance: float = 0.0
    knn_index: str = "auto"
    # How a training step computes what its loss reads (README, "Large catalogs: model.execution"): full
    # (the whole graph every step), blocks (the modality branch only for the batch's items, on exact DGL
    # blocks; recon over those items), sampled (everything on blocks drawn by DGL's neighbour samplers; an
    # approximation) or auto (full below blocks_min_items items, blocks from there, sampled from
    # sampled_min_items on).
    execution: str = "auto"
    blocks_min_items: int = BLOCKS_MIN_ITEMS
    sampled_min_items: int = SAMPLED_MIN_ITEMS
    # Sampled mode only. fanouts: neighbours drawn per node and user-item layer (DGL's order: input layer
    # first; -1 = all), one per n_ui_layers (empty: 10 each). user_items_sample: train items per batch user averaged in the
    # user features (Eq. 6); item_users_sample: users per item averaged in its preference (Eq. 2).
    fanouts: tuple[int, ...] = ()
    user_items_sample: int = 20
    item_users_sample: int = 20
    # Sampled mode only: 0 = every step propagates through its sampled L hops; R > 0 = one hop around the
    # batch, the rest read from historical embeddings recomputed over the whole graph every R steps and at
    # every epoch start (dgmrec_dgl.models.history; the seeds' layer fanout, fanouts[-1], is drawn).
    history_every: int = 0

    def __setattr__(self, name, value):
        if name == "refine_tolerance":
            check_value("config", "model", name, value, DGMRecConfig)
        super().__setattr__(name, value)


@dataclass
class MFBPRConfig(_ChecksExecution):
    """MF-BPR (Rendle et al. 2009) as in MMRec: ID tables scored by inner product."""

    name: str = "mfbpr"
    embedding_dim: int = 64
    reg: float = 1e-4                  # L2 on the batch's embeddings: reg · (‖e_u‖ + ‖e_i+‖ + ‖e_i−‖) / B
    # sampled: a step reads and updates only its rows (row-sparse gradients, lazy Adam); auto: sampled
    # from sampled_min_items items on; blocks is full here. No graph, so the gradients are the full mode's.
    execution: str = "auto"
    blocks_min_items: int = BLOCKS_MIN_ITEMS
    sampled_min_items: int = SAMPLED_MIN_ITEMS


@dataclass
class LightGCNConfig(_ChecksExecution):
    """LightGCN (He et al. 2020) as in MMRec: 3 layers, layer-mean readout."""

    name: str = "lightgcn"
    embedding_dim: int = 64
    n_layers: int = 3
    reg: float = 1e-4                  # L2 on the batch's layer-0 embeddings, as reg_weight in MMRec
    # full (and blocks, which is the same here: a 3-hop block from a 2,048-triple batch already spans the
    # whole graph, see dgmrec_dgl.models.lightgcn_rec), sampled (DGL neighbour-sampled blocks, fanouts per
    # layer, input layer first, -1 = all; empty: 10 each) or auto (sampled from sampled_min_items items on).
    execution: str = "auto"
    blocks_min_items: int = BLOCKS_MIN_ITEMS
    sampled_min_items: int = SAMPLED_MIN_ITEMS
    fanouts: tuple[int, ...] = ()
    history_every: int = 0             # as DGMRecConfig.history_every


@dataclass
class CI2MGConfig:
    """CI2MG (Lin et al., MM 2023) hyper-parameters; defaults are the release's (DGMRec_SPEC §6)."""

    name: str = "ci2mg"
    embedding_dim: int = 64
    n_ui_layers: int = 3
    ui_norm: str = "mean"              # D^-1 A as the release (paper Eq. 1); "sym" = D^-1/2 A D^-1/2
    n_prototypes: int = 64             # K hyperedges per modality
    n_hyper_layers: int = 2            # L of Eq. 5
    incidence: str = "cosine"          # Eq. 4 as released; "positive" clamps negative similarities to 0
    ot_epsilon: float = 5.0            # entropic regulariser of Eq. 7
    ot_iterations: int = 10
    ot_block: int = 2048               # items per OT block; >= n_items solves the release's full I x I problem
    ot_solver: str = "stabilized"      # Sinkhorn in the log domain: stabilized (fast) or log (all logsumexp)
    ot_delta: bool = False             # learnable offset Delta T of Eq. 9 (release: a zero, never trained)
    contrastive: str = "paper"         # Eq. 10 with in-batch negatives; "release" = the constant log 2
    temperature: float = 1.0           # tau of Eq. 10
    task_activation: str = "none"      # sigma of Eq. 11: none (release) or sigmoid (paper)
    generated_for: str = "missing"     # items whose modality representation is the generated Z: missing|all
    shared_norm: bool = False          # one BatchNorm for every modality's generator (Eq. 11), as the release
    cl_weight: float = 1.0             # lambda_1 (release lamb_1) on L_s
    rec_weight: float = 1.0            # weight of L_rec (fixed at 1 in the release)
    bpr_weight: float = 1.0            # release lamb_2 on L_BPR
    reg: float = 0.0                   # lambda_3 of Eq. 15 on the batch's ID embeddings (release: none)
    # full only: the hypergraph (Eq. 4-5) and the optimal-transport plan (Eq. 7) couple every item with every
    # prototype and every other item in each step, so neither restricts to a sampled batch
    execution: str = "full"

    def __setattr__(self, name, value):
        if name == "execution" and value != "full":
            raise DataError("config", "model.execution", f"ci2mg trains only in full mode, got {value!r} (its "
                            "hypergraph and transport plan couple every item in each step)",
                            "remove model.execution or set it to full; for large catalogs use dgmrec or lightgcn")
        super().__setattr__(name, value)


#: Every difference between the paper (our default) and the authors' release: switch -> (paper value, release
#: value). The switches are DGMRecConfig keys but ``patience_rule`` (TrainConfig). README, "Where the release
#: and the paper differ", says where each acts. generate_multi_missing is not here: its default is the release's.
FIDELITY: dict[str, tuple[object, object]] = {
    "knn_candidates": ("present", "all"),
    "generation_input": ("propagated", "encoder"),
    "loss_items": ("positives", "batch_items"),
    "club_items": ("positives", "all"),
    "refine_count_from": (0, 1),
    "perturb_over": ("parts", "concat"),
    "linear_bias_init": ("zero", "uniform"),
    "ui_align_audio": ("specific", "general"),
    "refine_rows": ("missing", "missing_alone"),
    "score_with_refined_graph": (True, False),
    "refine_sources": ("present", "all"),
    "patience_rule": ("reach", "exceed"),
    "negatives": ("all", "train_items"),
}
FIDELITIES = ("paper", "release")
#: switches whose release value is that of the release's separate 3-modality code (TikTok); with fewer
#: modalities the release runs its 2-modality code, which agrees with the paper here
THREE_MODALITY_SWITCHES = ("ui_align_audio", "refine_rows")


def resolve_fidelity(section, fidelity: str, n_modalities: int | None = None):
    """``section`` (a :class:`DGMRecConfig` or :class:`TrainConfig`) with every :data:`FIDELITY` switch left
    None set to its value under ``fidelity`` (``paper`` or ``release``); explicit values are kept.

    ``n_modalities`` decides the :data:`THREE_MODALITY_SWITCHES` under ``release`` (needed when one is None).
    Returns a new object; ``section`` is not modified. Resolving twice changes nothing.
    """
    if fidelity not in FIDELITIES:
        raise ValueError(f"fidelity must be one of {FIDELITIES}, got {fidelity!r}")
    values = {}
    for f in dataclasses.fields(section):
        if f.name not in FIDELITY or getattr(section, f.name) is not None:
            continue
        paper, release = FIDELITY[f.name]
        if fidelity == "release" and f.name in THREE_MODALITY_SWITCHES:
            if n_modalities is None:
                raise ValueError(f"resolving {f.name} under fidelity 'release' needs the number of modalities")
            release = release if n_modalities >= 3 else paper
        values[f.name] = release if fidelity == "release" else paper
    return dataclasses.replace(section, **values)


MODEL_CONFIGS = {"dgmrec": DGMRecConfig, "mfbpr": MFBPRConfig, "lightgcn": LightGCNConfig,
                 "ci2mg": CI2MGConfig}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: DGMRecConfig = field(default_factory=DGMRecConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- value rules
@dataclass(frozen=True)
class Rule:
    """What one config value may be: ``ok(value)`` is True for an allowed value; ``want`` says it in words.

    ``None`` of an optional field is always allowed and never reaches ``ok``. Values from YAML are of the
    field's type (``_coerce``); the ``__setattr__`` hooks pass values as given, so ``ok`` checks the type too.
    """

    want: str
    ok: Callable[[object], bool]


def at_least(low: int) -> Rule:
    """An integer count or size, ``>= low``."""
    return Rule(f"an integer >= {low}", lambda v: _is_int(v) and v >= low)


def number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A finite float in the interval from ``low`` to ``high`` (closed ends unless ``*_open``)."""
    if high == math.inf:
        want = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        want = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def ok(v) -> bool:
        return ((_is_int(v) or isinstance(v, float)) and math.isfinite(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))

    return Rule(want, ok)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def one_of(*choices: str) -> Rule:
    return Rule("one of: " + ", ".join(choices), lambda v: v in choices)


#: Largest seed: every seed feeds numpy's and torch's generators, which take 0 .. 2**32 - 1 alike.
SEED_MAX = 2**32 - 1
SEED = Rule(f"an integer in [0, {SEED_MAX}]", lambda v: _is_int(v) and 0 <= v <= SEED_MAX)
POSITIVE = number(0.0, low_open=True)          # learning rates, temperatures, epsilons
WEIGHT = number(0.0)                           # loss weights and L2 coefficients
FRACTION = number(0.0, 1.0)
ANY = Rule("any value of the key's type", lambda v: True)     # paths, flags: the type check is all
#: ``eval.select_metric`` and metric names elsewhere: what :func:`dgmrec_dgl.evaluate.ranking_metrics` computes.
METRIC_RE = re.compile(r"(recall|ndcg)@([1-9][0-9]*)")

#: Section → key → :class:`Rule`. Every key of every dataclass above has an entry (a test checks it);
#: the ``model`` rules are shared by the model configs (a key means the same in each). Checked by
#: :func:`check_value` when a YAML layer sets the key, and for the keys with ``__setattr__`` hooks on
#: every assignment.
RULES: dict[str, dict[str, Rule]] = {
    "data": {
        "dir": ANY, "inter": ANY, "mask": ANY, "new_items": ANY, "allow_pickle": ANY,
        "missing_ratio": FRACTION,
        "mask_seed": SEED, "new_items_seed": SEED, "reduce_seed": SEED,
        "imputation": one_of(*IMPUTATIONS),
        "new_items_protocol": one_of(*NEW_ITEMS_PROTOCOLS),
        "inject": one_of(*INJECTIONS),
        "feature_dtype": one_of(*FEATURE_DTYPES),
        "reduce_dims": Rule("an integer >= 1, or a mapping of modality names to integers >= 1 ({image: 256})",
                            lambda v: (_is_int(v) and v >= 1) or (isinstance(v, dict) and len(v) > 0 and all(
                                isinstance(m, str) and _is_int(d) and d >= 1 for m, d in v.items()))),
        "reduce_sample": at_least(1),
    },
    "train": {
        "epochs": at_least(1), "batch_size": at_least(1),
        "lr": POSITIVE, "weight_decay": WEIGHT,
        "lr_decay": number(0.0, 1.0, low_open=True),      # lr x lr_decay^(epoch / lr_decay_every); 1 = constant
        "lr_decay_every": at_least(1),
        "eval_every": at_least(1), "patience": at_least(1),
        "seed": SEED,
        "device": one_of("cpu"),
        "threads": at_least(0),                           # 0: torch's default
        "precision": one_of(*PRECISIONS),
        "patience_rule": one_of(*FIDELITY["patience_rule"]),      # reach (ours) | exceed (release)
        "negatives": one_of(*FIDELITY["negatives"]),              # all (ours) | train_items (release)
        "keep_freed_memory": ANY,
        "sample_ahead": at_least(0),                      # 0: no overlap of sampling and compute
        "epoch_steps": at_least(0),                       # 0: every batch of the epoch
        "checkpoint_steps": at_least(0),                  # 0: last.pt at epoch ends only
    },
    "eval": {
        "ks": Rule("a non-empty list of integers >= 1", lambda v: len(v) > 0 and all(k >= 1 for k in v)),
        "budget_mb": at_least(1),
        "select_metric": Rule("recall@K or ndcg@K with K in eval.ks", lambda v: METRIC_RE.fullmatch(v) is not None),
        "user_sample": at_least(0),                       # 0: every valid user
        "test_masks_valid": ANY,
    },
    "model": {
        "name": one_of(*MODEL_CONFIGS),
        "embedding_dim": at_least(1),
        # 0 propagation layers is a valid ablation: the layer-0 embeddings (models/lightgcn.py, propagation.py)
        "n_ui_layers": at_least(0), "n_mm_layers": at_least(0), "n_layers": at_least(0),
        "n_hyper_layers": at_least(0),
        "knn_k": at_least(1),
        "reg_id": WEIGHT, "reg": WEIGHT, "recon": WEIGHT, "additive": WEIGHT, "sampler": WEIGHT,
        "inter_modal": WEIGHT, "intra_modal": WEIGHT, "align_bm": WEIGHT,
        "cl_weight": WEIGHT, "rec_weight": WEIGHT, "bpr_weight": WEIGHT,
        "inter_modal_temp": POSITIVE, "intra_modal_temp": POSITIVE, "align_bm_temp": POSITIVE,
        "temperature": POSITIVE,
        "avg_lambda": FRACTION,                           # the old graph keeps 1 - avg_lambda, in [0, 1]
        "refresh_every": at_least(1),                     # epoch % refresh_every
        "perturb_eps": WEIGHT,
        "club_hidden": at_least(1), "club_lr": POSITIVE, "club_steps": at_least(0), "club_batch": at_least(1),
        "generate": ANY, "generate_multi_missing": ANY, "score_with_refined_graph": ANY, "ot_delta": ANY,
        "shared_norm": ANY,
        "refine_sources": one_of("present", "all"),       # graphs/refine.py
        # the release-vs-paper switches (FIDELITY): each one of its two values
        "fidelity": one_of(*FIDELITIES),
        "knn_candidates": one_of("present", "all"),       # graphs/knn.py build_knn(candidates=)
        "generation_input": one_of(*FIDELITY["generation_input"]),
        "loss_items": one_of(*FIDELITY["loss_items"]),
        "club_items": one_of(*FIDELITY["club_items"]),
        "refine_count_from": Rule("0 or 1", lambda v: _is_int(v) and v in (0, 1)),
        "perturb_over": one_of(*FIDELITY["perturb_over"]),
        "linear_bias_init": one_of(*FIDELITY["linear_bias_init"]),
        "ui_align_audio": one_of(*FIDELITY["ui_align_audio"]),
        "refine_rows": one_of(*FIDELITY["refine_rows"]),
        "refine_tolerance": number(0.0, 1.0, high_open=True),
        "knn_index": one_of("auto", "exact", "ivf", "hnsw"),  # graphs/knn.py
        "execution": one_of(*EXECUTIONS),
        "blocks_min_items": at_least(0), "sampled_min_items": at_least(0),
        "fanouts": Rule("a list of integers >= 1 (or -1 for every neighbour), one per user-item layer",
                        lambda v: isinstance(v, (list, tuple)) and all(_is_int(f) and (f >= 1 or f == -1) for f in v)),
        "user_items_sample": Rule("an integer >= 1 (or -1 for all)", lambda v: _is_int(v) and (v >= 1 or v == -1)),
        "item_users_sample": Rule("an integer >= 1 (or -1 for all)", lambda v: _is_int(v) and (v >= 1 or v == -1)),
        "history_every": at_least(0),                     # steps between refreshes of the histories; 0 = off

        # CI2MG (models/ci2mg): the choices are the modules' UI_NORMS, INCIDENCES, SOLVERS, ... (a test checks)
        "ui_norm": one_of("mean", "sym"),
        "n_prototypes": at_least(1),
        "incidence": one_of("cosine", "positive"),
        "ot_epsilon": POSITIVE,
        "ot_iterations": at_least(0),                     # 0: the zero potentials (transport.sinkhorn)
        "ot_block": at_least(1),
        "ot_solver": one_of("stabilized", "log"),
        "contrastive": one_of("paper", "release"),
        "task_activation": one_of("none", "sigmoid"),
        "generated_for": one_of("missing", "all"),
    },
}


def check_value(path: str, section: str, key: str, value, owner: type) -> None:
    """Raise :class:`DataError` naming ``path`` and ``section.key`` unless ``value`` obeys the key's rule.

    ``owner`` is the dataclass holding the key; its default is given as an example in the fix.
    """
    rule = RULES[section][key]
    if value is None or rule.ok(value):
        return
    default = next(f for f in dataclasses.fields(owner) if f.name == key).default
    example = f" (default {_yaml_value(default)})" if default not in (None, dataclasses.MISSING) else ""
    raise DataError(path, f"{section}.{key}", f"{_yaml_value(value)} is not {rule.want}",
                    f"use {rule.want}{example}")


def _yaml_value(value) -> str:
    """``value`` as the YAML would spell it (``.nan``, ``[0, 20]``, ``'median'``) for messages."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ("-.inf" if value < 0 else ".inf")
    return repr(value)


def _check_select_metric(path: str, config: Config) -> None:
    """``eval.select_metric`` must be one of the metrics the evaluator reports for ``eval.ks``."""
    metric = config.eval.select_metric
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in config.eval.ks]
    if metric not in names:
        k = METRIC_RE.fullmatch(metric).group(2)
        raise DataError(path, "eval.select_metric", f"{metric!r} is not computed: K = {k} is not in eval.ks "
                        f"{_yaml_value(config.eval.ks)}", f"use one of: {', '.join(names)}, or add {k} to eval.ks")


def _coerce(path: str, key: str, value, kind):
    """Check ``value`` against the dataclass field type ``kind``; ints are accepted for floats."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1:              # int | dict (data.reduce_dims): its rule checks the value
            return value
        kind = kinds[0]
        origin = typing.get_origin(kind)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise DataError(path, key, f"expected a list, got {value!r}", f"write {key}: [10, 20, 50]")
        return tuple(_coerce(path, key, v, typing.get_args(kind)[0]) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise DataError(path, key, f"expected {getattr(kind, '__name__', kind)}, got {value!r}",
                    f"give {key} a value of type {getattr(kind, '__name__', kind)}")


def _update(path: str, section: str, target, values: dict):
    if not isinstance(values, dict):
        raise DataError(path, section, "is not a mapping", f"write `{section}:` followed by indented keys")
    hints = typing.get_type_hints(type(target))
    names = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        if key not in names:
            raise DataError(path, f"{section}.{key}", "unknown key",
                            f"use one of: {', '.join(sorted(names))}")
        value = _coerce(path, f"{section}.{key}", value, hints[key])
        check_value(path, section, key, value, type(target))
        setattr(target, key, value)


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise DataError(path, "file", "does not exist", "pass an existing YAML config") from None
    except yaml.YAMLError as exc:
        raise DataError(path, "file", f"is not valid YAML ({str(exc).splitlines()[0]})",
                        "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise DataError(path, "file", "is not a mapping of sections", "write data:, train:, model: sections")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: dict | None = None) -> Config:
    """Build a :class:`Config` from defaults, then ``extends:`` chains, then ``path``, then ``overrides``.

    ``overrides`` uses the same nesting as the YAML (``{"train": {"seed": 42}}``).
    """
    layers: list[tuple[str, dict]] = []
    seen = set()
    current = os.fspath(path) if path is not None else None
    while current is not None:
        if current in seen:
            raise DataError(current, "extends", "forms a cycle", "remove the circular extends:")
        seen.add(current)
        raw = _read_yaml(current)
        layers.insert(0, (current, raw))
        parent = raw.get("extends")
        current = os.path.join(os.path.dirname(current), parent) if parent else None
    if overrides:
        layers.append(("<command line>", overrides))
    config = Config()
    metric_source = "<defaults>"       # the last layer that set eval.ks or eval.select_metric
    for source, raw in layers:
        model_section = raw.get("model") or {}
        name = model_section.get("name", config.model.name) if isinstance(model_section, dict) else None
        if name not in MODEL_CONFIGS:
            raise DataError(source, "model.name", f"unknown model {name!r}",
                            f"use one of: {', '.join(MODEL_CONFIGS)}")
        if not isinstance(config.model, MODEL_CONFIGS[name]):
            config.model = MODEL_CONFIGS[name]()
        for key, value in raw.items():
            if key == "extends":
                continue
            if key not in ("data", "train", "eval", "model"):
                raise DataError(source, key, "unknown section", "use the sections data, train, eval, model")
            _update(source, key, getattr(config, key), value or {})
            if key == "eval" and {"ks", "select_metric"} & set(value or {}):
                metric_source = source
    _check_select_metric(metric_source, config)
    _check_fanouts(layers[-1][0] if layers else "config", config.model)
    _check_checkpoint_steps(layers[-1][0] if layers else "config", config)
    return config


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    def plain(value):       # YAML's safe dumper takes lists, not tuples (eval.ks, model.fanouts)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    data = plain(config.to_dict())
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
