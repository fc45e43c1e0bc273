"""DGMRec: Disentangling and Generating Modalities for Recommendation in missing-modality scenarios.

Kim, Kang, Kim, Kim and Park, SIGIR 2025. This module wires the paper's parts together:

1. ID branch: LightGCN over the user–item graph (Eq. 18's E_id).
2. Per modality m: trainable raw features X_m → general / specific encoders (Eq. 1) → preference filter
   (Eq. 2–3) → propagation on the kNN graph S^m (Eq. 4–5) → user features (Eq. 6).
3. Fusion (Eq. 17–19): ``e = E_id + (mean_m ḡ_m + Σ_m s̄_m) / (M + 1)``, score ``⟨e_u, e_i⟩``.
4. Losses (Eq. 7–14, 20–24) in :meth:`DGMRec.loss`, every weight from :class:`~dgmrec_dgl.config.DGMRecConfig`.
5. Once per epoch (:meth:`DGMRec.before_epoch`): CLUB estimator steps, generation of missing raw features
   (Eq. 12–15, :meth:`DGMRec.generate_features`) and, every ``refresh_every`` epochs, the refinement of the
   kNN rows of items missing a modality (Eq. 16, FAISS + Numba through :mod:`dgmrec_dgl.graphs.refine`).
6. The release's new-items setting (:mod:`dgmrec_dgl.data.new_items`): training runs on kNN graphs in
   which the new items are masked (a self-loop row, in no other row); scores use separate inference graphs
   (the usual missing-modality graphs), on which the new items' missing features are generated and their
   rows refined before each validation (:meth:`DGMRec.before_validation`).

A training step gets its representations from :meth:`DGMRec.batch_forward`. With ``execution: full`` that
is :meth:`DGMRec.forward` on the whole graph; with ``blocks`` the modality branch runs only where the batch
can see it, on exact full-neighbour DGL blocks (:mod:`dgmrec_dgl.graphs.blocks`), and gives the batch's rows
the same values; with ``sampled`` (or ``auto`` on a large catalog) every part of the step runs on blocks
drawn by DGL's neighbour samplers (:meth:`DGMRec.sample_batch`), an approximation (see
:meth:`DGMRec.batch_forward` for what is computed and what changes).

Where the authors' release and the paper differ, a switch of :class:`~dgmrec_dgl.config.DGMRecConfig` picks
one or the other (``model.fidelity`` sets them all; :data:`~dgmrec_dgl.config.FIDELITY` lists them); the model
reads its config resolved by :func:`~dgmrec_dgl.config.resolve_fidelity`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...config import DGMRecConfig, drawn_fanouts, resolve_execution, resolve_fidelity
from ...graphs.blocks import item_user_block, knn_blocks, src_ids
from ...graphs.hetero import IU, UI, build_heterograph, mean_aggregate, replace_knn_relation
from ...graphs.knn import KnnGraph, modality_knn_graphs
from ...graphs.refine import refine_knn
from ...graphs.sampling import sample_one_hop
from ..base import Batch, Recommender, gather_rows, scalar_parts, sparse_rows
from ..lightgcn import lightgcn
from ..history import Histories, drop_due, with_history
from ..lightgcn_rec import sampled_id_branch, sampled_seeds
from .club import CLUBEstimator
from .encoders import GeneralEncoder, SpecificEncoder, encode
from .generators import ModalityDecoder, ModalityGenerator, perturb
from .losses import bpr_loss, emb_loss, info_nce
from .preference import PreferenceFilter, filtered_features
from .propagation import (propagate_modality, propagate_modality_blocks, propagate_modality_history,
                          user_modality_features)

#: rows decoded at a time by :meth:`DGMRec.generated_features` (65,536 x 4,096 float32 = 1 GiB)
DECODE_CHUNK = 65_536
#: items encoded and filtered at a time by the whole-catalog passes without autograd (:meth:`DGMRec._filtered_table`:
#: the refreshes of the modality histories, the ranking embeddings)
REFRESH_CHUNK = 65_536
#: feature columns per pass of a modality's propagation and Eq. 6 in :meth:`DGMRec.embeddings` (at 1M items and
#: 2M users a modality's whole [n, 2d] layers are 1.5 GB beside the 1.5 GB of sums; 32 of 128 columns, 0.35 GB)
EMBEDDING_COLUMNS = 32
#: prefix of the inference graphs' keys in :meth:`DGMRec.graph_state` (the release's new-items setting)
INFERENCE = "inference_"


def term(name: str):
    """A ``torch.profiler`` range ``dgmrec.<name>`` around one term of the training step; a no-op context
    when no profiler runs (one C call). ``bench/step_profile.py`` splits a step's time by these ranges."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(f"dgmrec.{name}")
    return contextlib.nullcontext()


def generation_targets(present: dict[str, np.ndarray], multi_missing: bool) -> dict[str, np.ndarray]:
    """Modality → int64 ids of the items whose raw rows generation writes: those missing exactly that modality
    (the release's), or with ``multi_missing`` every item missing it. ``present``: modality → bool ``[n_items]``."""
    out = {}
    for m, has in present.items():
        keep = ~np.asarray(has, dtype=bool)
        if not multi_missing:
            for other, other_has in present.items():
                if other != m:
                    keep &= np.asarray(other_has, dtype=bool)
        out[m] = np.flatnonzero(keep)
    return out


def refines_before(epoch: int, every: int, count_from: int) -> bool:
    """Whether the kNN rows are refined before (0-based) ``epoch``: every ``every`` epochs, counting epochs
    from ``count_from`` (0: before epochs r, 2r, ...; 1, the release's epoch counter: before r−1, 2r−1, ...)."""
    counted = epoch + count_from
    return counted > 0 and counted % every == 0


def refined_rows(present: dict[str, np.ndarray], rule: str) -> dict[str, np.ndarray]:
    """Modality → int64 ids of the items whose kNN rows Eq. 16 refines: those lacking the modality
    (``missing``), or those lacking it alone (``missing_alone``: the release's 3-modality code)."""
    lacks = {m: ~np.asarray(p, dtype=bool) for m, p in present.items()}
    if rule == "missing":
        return {m: np.flatnonzero(lack) for m, lack in lacks.items()}
    if rule == "missing_alone":
        return {m: np.flatnonzero(lack & ~np.any([lacks[o] for o in lacks if o != m], axis=0))
                if len(lacks) > 1 else np.flatnonzero(lack) for m, lack in lacks.items()}
    raise ValueError(f"refine_rows must be 'missing' or 'missing_alone', got {rule!r}")


@dataclass
class ModalityViews:
    """One modality's features of the items / users a :class:`Representations` covers (``[n, d]`` each)."""

    general: torch.Tensor        # E^g_m, encoder output before filtering
    specific: torch.Tensor       # E^s_m
    preference: torch.Tensor     # p_{i,m}
    item_general: torch.Tensor   # ḡ_m (filtered, propagated)
    item_specific: torch.Tensor  # s̄_m
    user_general: torch.Tensor   # f̄^g_{u,m}
    user_specific: torch.Tensor  # f̄^s_{u,m}


@dataclass
class Representations:
    """Representations of every user and item (:meth:`DGMRec.forward`) or of a batch's rows (blocks mode).

    Row r of the user tensors belongs to user ``user_ids[r]`` and row r of the item tensors to item
    ``item_ids[r]``; ``None`` (full mode) means row r is user / item r. ``item_raw[m]`` holds the raw
    features X_m of the covered items (blocks mode; ``None``: all of ``DGMRec.raw``).
    """

    user_id: torch.Tensor        # E_u from LightGCN [n_users or len(user_ids), d]
    item_id: torch.Tensor        # E_i [n_items or len(item_ids), d]
    modalities: dict[str, ModalityViews]
    user_ids: torch.Tensor | None = None
    item_ids: torch.Tensor | None = None
    item_raw: dict[str, torch.Tensor] | None = None

    def global_items(self, rows: torch.Tensor) -> torch.Tensor:
        """Global item ids of the item rows ``rows`` [n]."""
        return rows if self.item_ids is None else self.item_ids[rows]

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 17–18: final user and item representations."""
        views = list(self.modalities.values())
        return (fuse(self.user_id, [v.user_general for v in views], [v.user_specific for v in views]),
                fuse(self.item_id, [v.item_general for v in views], [v.item_specific for v in views]))


def fuse(id_rows: torch.Tensor, general: list[torch.Tensor], specific: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 17–18 for one node type: ``E + (mean_m ḡ_m + Σ_m s̄_m) / (M + 1)`` from the ID rows ``[n, d]`` and
    the M modalities' general and specific rows (``[n, d]`` each)."""
    return id_rows + modality_part(sum(general), sum(specific), len(general))


def modality_part(general_sum: torch.Tensor, specific_sum: torch.Tensor, n_modalities: int) -> torch.Tensor:
    """The modalities' share of Eq. 17–18, ``(Σ_m ḡ_m / M + Σ_m s̄_m) / (M + 1)``, from the sums over the
    modalities (``[n, d]`` each, added up in the modalities' order: the mean as the sum over M gives the same bits
    as ``torch.stack(...).mean(0)``). Written over ``general_sum``, which is returned: the sums are consumed."""
    return general_sum.div_(n_modalities).add_(specific_sum).div_(n_modalities + 1)


class DGMRec(Recommender):
    """The DGMRec model.

    Args:
        n_users, n_items: table sizes.
        features: modality → float32 ``[n_items, d_m]`` imputed raw features (they become trainable tables).
        present: modality → bool ``[n_items]``, False where the item lacks the modality.
        config: hyper-parameters (switches left None follow ``config.fidelity``).
        knn: modality → normalised kNN graph S^m (items missing m: a self-loop row).
        targets: modality → item ids whose raw rows are generated every epoch (default: none).
        inference_knn: the release's new-items setting: modality → the graph scores use (``knn`` is then the
            training graph, new items masked); default none (scores use ``knn``).
        new_items: int64 ids of the new items (with ``inference_knn``): their rows are refined in the
            inference graphs only.
        new_item_targets: modality → new items whose raw rows are generated before each validation.

    Example::

        model = DGMRec(ds.n_users, ds.n_items, ds.features, ds.present, DGMRecConfig(), knn, targets)
        g = model.make_graph(ds)
        reps = model(g)
        loss, parts = model.loss(reps, users, pos, neg)
    """

    def __init__(self, n_users: int, n_items: int, features: dict[str, np.ndarray],
                 present: dict[str, np.ndarray], config: DGMRecConfig, knn: dict[str, KnnGraph],
                 targets: dict[str, np.ndarray] | None = None, *, inference_knn: dict[str, KnnGraph] | None = None,
                 new_items: np.ndarray | None = None, new_item_targets: dict[str, np.ndarray] | None = None):
        super().__init__()
        if not features:
            raise ValueError("DGMRec needs at least one modality with features")
        if set(knn) != set(features):
            raise ValueError(f"need one kNN graph per modality {sorted(features)}, got {sorted(knn)}")
        self.config = config = resolve_fidelity(config, config.fidelity, len(features))
        self.knn = dict(knn)                   # current (refined) S^m
        self.initial_knn = dict(knn)           # S^m at build time (the journal release scores with it)
        self.targets = {m: torch.as_tensor(np.asarray((targets or {}).get(m, []), dtype=np.int64))
                        for m in features}
        self.refine_rows = refined_rows(present, config.refine_rows)
        # the release's new-items setting: the new items' rows live in the inference graphs only
        self.inference_knn = dict(inference_knn or {})
        self.new_item_targets = {m: torch.as_tensor(np.asarray((new_item_targets or {}).get(m, []), dtype=np.int64))
                                 for m in features}
        self.inference_refine_rows = {m: np.empty(0, np.int64) for m in features}
        if self.inference_knn and new_items is not None:
            is_new = np.zeros(n_items, dtype=bool)
            is_new[new_items] = True
            self.inference_refine_rows = {m: rows[is_new[rows]] for m, rows in self.refine_rows.items()}
            self.refine_rows = {m: rows[~is_new[rows]] for m, rows in self.refine_rows.items()}
        self.modalities = tuple(features)
        d, bias = config.embedding_dim, config.linear_bias_init
        dims = {m: int(f.shape[1]) for m, f in features.items()}
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.raw = nn.ParameterDict({m: nn.Parameter(torch.from_numpy(np.array(f, np.float32)))
                                     for m, f in features.items()})
        self.general = GeneralEncoder(dims, d, bias)
        self.specific = nn.ModuleDict({m: SpecificEncoder(dm, d, bias) for m, dm in dims.items()})
        self.preference = nn.ModuleDict({m: PreferenceFilter(d) for m in self.modalities})
        self.decoders = nn.ModuleDict({m: ModalityDecoder(d, dm, bias) for m, dm in dims.items()})
        n_other = len(self.modalities) - 1
        self.general_generators = nn.ModuleDict(
            {m: ModalityGenerator(n_other * d, d, bias) for m in self.modalities} if n_other else {})
        self.specific_generators = nn.ModuleDict({m: ModalityGenerator(d, d, bias) for m in self.modalities})
        # The CLUB estimators are trained by their own optimiser (see auxiliary_optimizer()).
        self.club = nn.ModuleDict({m: CLUBEstimator(d, config.club_hidden) for m in self.modalities})
        for m, mask in present.items():
            self.register_buffer(f"present_{m}", torch.from_numpy(np.asarray(mask, dtype=bool)))
        self._club_optimizer = torch.optim.Adam(self.club.parameters(), lr=config.club_lr, fused=True)
        # sampled mode with history_every > 0 (dgmrec_dgl.models.history): the ID branch's and the modalities'
        self.history = Histories(config.history_every)
        self.modality_history = Histories(config.history_every)

    @classmethod
    def from_dataset(cls, dataset, config: DGMRecConfig, seed: int = 0) -> DGMRec:
        """Build the kNN graphs (FAISS) and generation targets of ``dataset`` and the model on them.

        Generation targets are the items missing exactly one modality (release behaviour) or, with
        ``generate_multi_missing``, every item missing it; new items are left out in the new-items setting.
        The graphs rank among the items that have the modality, or (``knn_candidates: all``, the release)
        among all items, mean-imputed rows included, before the columns of missing items are dropped.
        In the release's new-items setting (``dataset.new_items_protocol == "release"``) the training graphs
        mask the new items instead of the items missing the modality, as the release builds them (with
        ``zero`` imputation, whose rows have no cosine, the missing items stay masked too); the usual
        graphs become the inference graphs, and the new items missing a modality are generated there.
        """
        config = resolve_fidelity(config, config.fidelity, len(dataset.modalities))

        def graphs(keep: dict[str, np.ndarray]) -> dict[str, KnnGraph]:
            return modality_knn_graphs({m: dataset.features[m] for m in dataset.modalities}, keep, config.knn_k,
                                       candidates=config.knn_candidates, index=config.knn_index, seed=seed)

        knn = graphs(dataset.present)
        generated = ({m: np.empty(0, np.int64) for m in dataset.modalities} if dataset.mask is None
                     else generation_targets(dataset.present, config.generate_multi_missing))
        targets, extra = dict(generated), {}
        if dataset.new_items is not None:
            targets = {m: np.setdiff1d(rows, dataset.new_items) for m, rows in generated.items()}
        if dataset.new_items is not None and dataset.new_items_protocol == "release":
            old = np.ones(dataset.n_items, dtype=bool)
            old[dataset.new_items] = False
            new_targets = {m: np.intersect1d(rows, dataset.new_items) for m, rows in generated.items()}
            extra = {"inference_knn": knn, "new_items": dataset.new_items, "new_item_targets": new_targets}
            knn = graphs({m: old & dataset.present[m] if dataset.imputation == "zero" else old
                          for m in dataset.modalities})
        return cls(dataset.n_users, dataset.n_items, dataset.features, dataset.present, config, knn, targets,
                   **extra)

    # ------------------------------------------------------------------ Recommender hooks
    def main_parameters(self):
        club = {id(p) for p in self.club.parameters()}
        return [p for p in self.parameters() if id(p) not in club]

    def auxiliary_optimizer(self):
        return self._club_optimizer

    def row_tables(self) -> dict[str, str]:
        """The ID tables and the trainable raw modality tables X_m (DistDGL partitions hold them as rows)."""
        return {"user_emb": "user", "item_emb": "item", **{f"raw.{m}": "item" for m in self.modalities}}

    def make_graph(self, dataset):
        """The heterograph: user–item relations plus ``knn_<m>`` for every modality."""
        return build_heterograph(dataset, self.knn)

    def scoring_graph(self, g):
        """The graph scores are computed on: the refined one, or (release behaviour) the initial one; in the
        release's new-items setting the inference graphs (whatever ``score_with_refined_graph`` says)."""
        if self.inference_knn:
            for m, knn in self.inference_knn.items():
                g = replace_knn_relation(g, m, knn)
            return g
        if self.config.score_with_refined_graph:
            return g
        for m, knn in self.initial_knn.items():
            g = replace_knn_relation(g, m, knn)
        return g

    def graph_state(self) -> dict:
        graphs = {**self.knn, **{INFERENCE + m: k for m, k in self.inference_knn.items()}}
        return {m: tuple(torch.from_numpy(a) for a in (k.indptr, k.indices, k.weights)) for m, k in graphs.items()}

    def load_graph_state(self, state: dict, g):
        for key, tensors in state.items():
            graph = KnnGraph(*(t.numpy() for t in tensors))
            if key.startswith(INFERENCE):
                self.inference_knn[key[len(INFERENCE):]] = graph
            else:
                self.knn[key] = graph
                g = replace_knn_relation(g, key, graph)
        return g

    def before_epoch(self, epoch: int, g, generator: torch.Generator | None = None):
        """CLUB steps, generation of missing raw rows, and (every ``refresh_every`` epochs) kNN refinement."""
        cfg = self.config
        log: dict = {}
        self.history.invalidate()
        self.modality_history.invalidate()
        if cfg.sampler:
            for _ in range(cfg.club_steps):
                log["club_nll"] = self.club_step(self._club_optimizer, cfg.club_batch, generator)
        if not cfg.generate:
            return g, log
        log["generated_rows"] = self.generate_features(g, self.targets, generator)
        if refines_before(epoch, cfg.refresh_every, cfg.refine_count_from):
            g = self.refine_graphs(g)
            log["refined_rows"] = {m: int(len(r)) for m, r in self.refine_rows.items()}
            log["knn_edges"] = {m: int(graph.indptr[-1]) for m, graph in self.knn.items()}
        return g, log

    def refine_graphs(self, g):
        """Eq. 16 on the rows of items missing each modality, from the current raw features."""
        for m, rows in self.refine_rows.items():
            if len(rows) == 0:
                continue
            self.knn[m] = self._refined(self.knn[m], m, rows)
            g = replace_knn_relation(g, m, self.knn[m])
        return g

    def _refined(self, graph: KnnGraph, m: str, rows: np.ndarray) -> KnnGraph:
        """``graph`` with its ``rows`` refined by Eq. 16 from the current raw features of modality ``m``."""
        cfg = self.config
        return refine_knn(graph, self.raw[m].detach().numpy(), rows, alpha=1.0 - cfg.avg_lambda, k=cfg.knn_k,
                          sources=cfg.refine_sources, tolerance=cfg.refine_tolerance,
                          present=self.present(m).numpy(), index=cfg.knn_index, progress=False)

    def before_validation(self, epoch: int, g, generator: torch.Generator | None = None) -> dict:
        """The release's new-items setting, before each validation (its ``generate_missing_modal_infer`` and,
        with ``infer_adj_update``, ``update_adj_infer``): overwrite the raw rows of the new items that miss a
        modality with features generated on the inference graphs (Eq. 12–15) and, when ``epoch + 1`` is a
        multiple of ``refresh_every``, refine their rows of the inference graphs (Eq. 16). Nothing otherwise
        (nor with ``generate: false``)."""
        cfg = self.config
        if not self.inference_knn or not cfg.generate:
            return {}
        log: dict = {"generated_new_rows": self.generate_features(self.scoring_graph(g), self.new_item_targets,
                                                                  generator)}
        if (epoch + 1) % cfg.refresh_every == 0:
            for m, rows in self.inference_refine_rows.items():
                if len(rows):
                    self.inference_knn[m] = self._refined(self.inference_knn[m], m, rows)
            log["refined_new_rows"] = {m: int(len(r)) for m, r in self.inference_refine_rows.items()}
        return log

    def present(self, modality: str) -> torch.Tensor:
        return getattr(self, f"present_{modality}")

    # ------------------------------------------------------------------ forward
    def forward(self, g) -> Representations:
        """All representations on graph ``g`` (user–item relations and one ``knn_<m>`` per modality)."""
        cfg = self.config
        with term("id_propagation"):
            user_id, item_id = lightgcn(g, self.user_emb, self.item_emb, cfg.n_ui_layers)
        views = {}
        for m in self.modalities:
            general, specific, pref, filtered = self._filtered_features(g, m)
            with term("modality_propagation"):
                h = propagate_modality(g, m, filtered, cfg.n_mm_layers)
            with term("user_features"):
                hu = user_modality_features(g, h)
            views[m] = ModalityViews(general, specific, pref, *h.chunk(2, dim=1), *hu.chunk(2, dim=1))
        return Representations(user_id, item_id, views)

    def _filtered_features(self, g, m: str):
        """Eq. 1–3 on every item: ``(E^g_m, E^s_m, p_m, Ẽ_m = [p ⊙ E^g, p ⊙ E^s])``, ``[n_items, d]`` x 3 and ``[n_items, 2d]``."""
        with term("encoders"):
            general, specific = encode(self.general, self.specific[m], m, self.raw[m])
        with term("preference"):
            pref = self.preference[m](g, self.user_emb)
            return general, specific, pref, filtered_features(pref, general, specific)

    def _filtered_table(self, g, m: str) -> torch.Tensor:
        """Ẽ_m of every item ``[n_items, 2d]`` (Eq. 1–3), without autograd, encoded and filtered ``REFRESH_CHUNK``
        items at a time: E^g_m, E^s_m and their products exist for one slice of rows only (whole, at 1M items,
        they were 1.3 GB on top of the table). Below ``REFRESH_CHUNK`` items, :meth:`_filtered_features`'s
        operations on the same rows."""
        pref = self.preference[m](g, self.user_emb)                             # [n_items, d]
        filtered = pref.new_empty(len(pref), 2 * pref.shape[1])
        for start in range(0, len(pref), REFRESH_CHUNK):
            rows = slice(start, start + REFRESH_CHUNK)
            general, specific = encode(self.general, self.specific[m], m, self.raw[m][rows])
            filtered_features(pref[rows], general, specific, out=filtered[rows])
        return filtered

    def _modality_layers(self, g) -> dict[str, list[torch.Tensor]]:
        """Modality → ``[Ẽ_m, Ē^(1)_m, ..., Ē^(L)_m]`` on the whole graph: the modality branch's histories."""
        layers = {}
        for m in self.modalities:
            layers[m] = [self._filtered_table(g, m)]
            for _ in range(self.config.n_mm_layers):
                layers[m].append(propagate_modality(g, m, layers[m][-1], 1))
        return layers

    def embeddings(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused(forward(g))`` for ranking (without autograd), in a fraction of :meth:`forward`'s memory.

        Each modality is propagated and averaged over the users' items (Eq. 6) ``EMBEDDING_COLUMNS`` columns
        at a time, straight into the sums of Eq. 17–18; the sums are folded into :func:`modality_part` before
        the ID branch runs, and the ID rows take that part in place. The same operations on the same elements
        in the same order as :func:`fuse`, so the same bits. What only the losses read (the encoders'
        outputs, the preferences) is not kept. At 1M items and 2M users forward's views of two modalities are
        4.6 GB, the sums here 1.5 GB, and the ID branch runs beside their 0.75 GB fold.
        """
        cfg = self.config
        user_sum = item_sum = None                          # [Σ general | Σ specific], [n, 2d]
        for m in self.modalities:
            filtered = self._filtered_table(g, m)
            first = item_sum is None
            if first:
                item_sum = torch.empty_like(filtered)
                user_sum = filtered.new_empty(g.num_nodes("user"), filtered.shape[1])
            for start in range(0, filtered.shape[1], EMBEDDING_COLUMNS):
                columns = slice(start, start + EMBEDDING_COLUMNS)
                item = propagate_modality(g, m, filtered[:, columns].contiguous(), cfg.n_mm_layers)
                user = user_modality_features(g, item)
                if first:
                    item_sum[:, columns], user_sum[:, columns] = item, user
                else:
                    item_sum[:, columns].add_(item)
                    user_sum[:, columns].add_(user)
            del filtered
        n = len(self.modalities)
        user_part = modality_part(*user_sum.chunk(2, dim=1), n).contiguous()
        del user_sum
        item_part = modality_part(*item_sum.chunk(2, dim=1), n).contiguous()
        del item_sum
        user_id, item_id = lightgcn(g, self.user_emb, self.item_emb, cfg.n_ui_layers)
        return user_id.add_(user_part), item_id.add_(item_part)

    def execution(self) -> str:
        """``full``, ``blocks`` or ``sampled``: what ``config.execution`` selects for this catalog."""
        return resolve_execution(self.config, self.item_emb.shape[0])

    def sample_batch(self, g, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Batch:
        """The blocks a step of the blocks or sampled mode reads (full mode: none); see :meth:`batch_forward`.

        Drawn: the batch users ``U = unique(users)``; the ``interacted_by`` block onto U (every train item in
        blocks mode, at most ``user_items_sample`` drawn by DGL's sampler in sampled mode); the item set
        ``T = unique(pos ∪ neg ∪ the block's items)`` (with historical embeddings ``unique(pos ∪ neg)``, and
        one kNN block and one user–item hop); per modality the ``n_mm_layers`` full-neighbour kNN
        blocks seeded by T (k is small; refinement grows a row to at most a few times k) and, sampled mode
        only, the ``interacts`` block onto their input items with at most ``item_users_sample`` users each
        (Eq. 2); sampled mode also draws the ID branch's L user–item blocks onto U and ``pos ∪ neg``.
        """
        mode = self.execution()
        if mode == "full":
            return Batch(users, pos, neg)
        cfg = self.config
        sampled = mode == "sampled"
        historical = sampled and cfg.history_every > 0
        batch_users = torch.unique(users)
        to_users = sample_one_hop(g, IU, batch_users, cfg.user_items_sample) if sampled else item_user_block(g, batch_users)
        their_items = src_ids(to_users, "item")
        items = torch.unique(torch.cat([pos, neg] if historical else [their_items, pos, neg]))
        drawn = {"users": batch_users, "items": items, "to_users": to_users, "knn": {}, "preference": {},
                 "rows": tuple(torch.searchsorted(seeds, ids.contiguous())
                               for seeds, ids in ((batch_users, users), (items, pos), (items, neg))),
                 "their_items": their_items, "historical": historical}
        for m in self.modalities:
            # with histories: one kNN hop onto T, applied n_mm_layers times (its outside rows from the history)
            blocks = knn_blocks(g, m, items, min(cfg.n_mm_layers, 1) if historical else cfg.n_mm_layers)
            drawn["knn"][m] = blocks
            if sampled:
                inputs = src_ids(blocks[0], "item") if blocks and not historical else items
                drawn["preference"][m] = sample_one_hop(g, UI, inputs, cfg.item_users_sample)
        if sampled:
            drawn["id"] = sampled_seeds(g, users, pos, neg, drawn_fanouts(cfg))
        return Batch(users, pos, neg, drawn)

    def batch_forward(self, g, batch: Batch):
        """Representations for one training batch, and the batch's ids as rows of them.

        Full mode: ``(self(g), users, pos, neg)``. Blocks mode computes only what :meth:`loss` reads, with
        the values the full forward gives those rows:

        1. Whole-graph passes, rows taken afterwards: the ID branch (LightGCN: three hops from a 2,048-triple
           batch reach every node, so its block would be the whole graph) and the item preferences of Eq. 2–3
           (one ``d``-wide aggregate: the ``interacts`` block onto the items I_m below held 99.98% of the users
           at 50K items and 99.5% at 200K, and building it took 30–80 ms and 110–320 ms, against 14–16 ms and
           80–170 ms for the whole-graph aggregate).
        2. The batch users ``U = unique(users)`` and the item set ``T = unique(pos ∪ neg ∪ train items of U)``
           (the user features of Eq. 6 average ē over every train item of the user).
        3. Per modality m: the ``n_mm_layers`` kNN blocks seeded by T give the input items I_m; the encoders
           (Eq. 1) run on ``raw[m][I_m]`` only, the features filtered by the preferences of I_m are propagated
           through the blocks to T (Eq. 4–5), and the ``interacted_by`` block onto U averages them into the
           user features (Eq. 6).

        Every neighbourhood is complete, so ḡ, s̄, the user features and the fused scores of the batch
        equal the full-graph ones up to floating-point summation order; so does every loss term but the
        reconstruction (Eq. 10–11), which :meth:`loss` then averages over T instead of over all items.

        Sampled mode runs the same steps on sampled blocks (:meth:`sample_batch`), so nothing is a
        whole-graph pass: the ID branch propagates over L neighbour-sampled user–item blocks (unbiased layer
        estimates, :mod:`dgmrec_dgl.graphs.sampling`), a user's features average at most
        ``user_items_sample`` of their train items and an item's preference at most ``item_users_sample`` of
        its users. With fanouts and sample sizes at least the largest degrees it equals blocks mode. The ID
        tables are read through sparse embeddings (row-sparse gradients for the lazy Adam); only the
        ``pos ∪ neg`` rows of the ID branch are computed (the other rows of T get zeros there, which no
        loss term reads).

        Sampled mode with ``history_every: R`` (historical embeddings, :mod:`dgmrec_dgl.models.history`):
        T is ``pos ∪ neg`` alone; the ID branch runs one sampled hop with layers 2..L from its history; per
        modality the encoders and the preference filter run on T only, each kNN layer reads T's rows as just
        computed and every other neighbour's from the history of the layer below, and a user's features
        average the drawn train items, T's fresh and the others' from the history of the last layer. The
        histories are recomputed over the whole graph every R steps and at every epoch start.

        Args:
            g: the heterograph.
            batch: from :meth:`sample_batch`.

        Returns:
            ``(reps, users, pos, neg)``; in blocks and sampled mode ``reps`` has ``len(U)`` user rows and
            ``len(T)`` item rows (``reps.user_ids = U``, ``reps.item_ids = T``, both sorted) and the ids are
            those rows.
        """
        if not batch.drawn:
            return self(g), batch.users, batch.pos, batch.neg
        cfg = self.config
        drawn = batch.drawn
        batch_users, items = drawn["users"], drawn["items"]
        if drawn["historical"]:
            drop_due(self.history, self.modality_history)
        with term("id_propagation"):
            if "id" in drawn:        # sampled: the ID branch on its blocks, only at U and pos ∪ neg
                _, _, (user_id, item_seed) = sampled_id_branch(self.user_emb, self.item_emb, g, drawn["id"],
                                                               self.history, cfg.n_ui_layers)
                item_id = item_seed.new_zeros(len(items), item_seed.shape[1]).index_copy(
                    0, torch.searchsorted(items, drawn["id"]["items"]), item_seed)
            else:
                user_id, item_id = lightgcn(g, self.user_emb, self.item_emb, cfg.n_ui_layers)
                user_id, item_id = torch.index_select(user_id, 0, batch_users), torch.index_select(item_id, 0, items)
        history = self.modality_history.read(lambda: self._modality_layers(g)) if drawn["historical"] else None
        views, item_raw = {}, {}
        for m in self.modalities:
            blocks = drawn["knn"][m]
            # I_m, whose first len(T) are T; with histories T alone (the other inputs come from the history)
            inputs = src_ids(blocks[0], "item") if blocks and history is None else items
            with term("preference"):
                if m in drawn["preference"]:                                 # sampled: Eq. 2 on drawn users
                    to_items = drawn["preference"][m]
                    user_rows = sparse_rows(self.user_emb, src_ids(to_items, "user"))
                    pref = mean_aggregate(to_items, "interacts", self.preference[m].user_preferences(user_rows))
                else:                                                        # blocks: whole graph (1.)
                    pref = torch.index_select(self.preference[m](g, self.user_emb), 0, inputs)
            with term("encoders"):
                # a sparse gradient of only I_m's rows, not a dense [n_items, d_m] one (dgmrec_dgl.optim)
                x = sparse_rows(self.raw[m], inputs)
                general, specific = encode(self.general, self.specific[m], m, x)
            with term("modality_propagation"):
                h = filtered_features(pref, general, specific)
                if history is None:
                    h = propagate_modality_blocks(blocks, m, h)
                    their = torch.index_select(h, 0, torch.searchsorted(items, drawn["their_items"]))
                else:
                    h = propagate_modality_history(blocks, m, h, history[m])
                    their = with_history(h, items, history[m][-1], drawn["their_items"])
            with term("user_features"):
                hu = user_modality_features(drawn["to_users"], their)
            n = len(items)
            views[m] = ModalityViews(general[:n], specific[:n], pref[:n], *h.chunk(2, dim=1), *hu.chunk(2, dim=1))
            item_raw[m] = x[:n]
        reps = Representations(user_id, item_id, views, user_ids=batch_users, item_ids=items, item_raw=item_raw)
        return (reps, *drawn["rows"])

    def fused(self, reps: Representations) -> tuple[torch.Tensor, torch.Tensor]:
        return reps.fused()

    # ------------------------------------------------------------------ losses
    def loss(self, reps: Representations, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 24 on a batch of triples (users, pos, neg) [B]; returns the total and its parts.

        The ids are rows of ``reps`` (global ids for :meth:`forward`'s, local rows for blocks mode's, see
        :meth:`batch_forward`). The reconstruction term is the MSE over the items ``reps`` covers: all items
        in full mode; the batch's item set T in blocks mode, a mini-batch estimate of the all-item mean that
        weights each item by how often batches touch it (popular items more), so not an unbiased one; so is
        the CLUB term under ``club_items: all`` (the release's: every item in full mode).
        """
        cfg = self.config
        views = reps.modalities
        at_users, at_pos = partial(gather_rows, index=users), partial(gather_rows, index=pos)
        with term("fusion"):
            user_all, item_all = reps.fused()
        batch = len(users)
        with term("bpr"):
            u, i, j = at_users(user_all), at_pos(item_all), gather_rows(item_all, neg)
            parts: dict[str, torch.Tensor] = {"bpr": bpr_loss(u, i, j)}

        with term("reg"):
            e_u, e_i, e_j = at_users(reps.user_id), at_pos(reps.item_id), gather_rows(reps.item_id, neg)
            reg = cfg.reg_id * emb_loss(e_u, e_i, e_j)
            reg = reg + cfg.reg * sum((at_pos(v.item_general) + at_pos(v.item_specific)).norm()
                                      for v in views.values()) / batch
            parts["reg"] = reg

        with term("ui_align"):   # also the general sums bm_align reads
            general_u = sum(at_users(v.user_general) for v in views.values())
            general_i = sum(at_pos(v.item_general) for v in views.values())
            if cfg.intra_modal:   # UI-align, Eq. 21
                intra = info_nce(e_u, e_i, cfg.intra_modal_temp) + info_nce(general_u, general_i, cfg.inter_modal_temp)
                for m, v in views.items():
                    if m == "audio" and cfg.ui_align_audio == "general":    # the release's 3-modality code
                        user_side, item_side = v.user_general, v.item_general
                    else:
                        user_side, item_side = v.user_specific, v.item_specific
                    intra = intra + info_nce(at_users(user_side), at_pos(item_side), cfg.intra_modal_temp)
                parts["ui_align"] = cfg.intra_modal * intra
        if cfg.align_bm:      # BM-align, Eq. 20
            with term("bm_align"):
                parts["bm_align"] = cfg.align_bm * (info_nce(e_i, general_i, cfg.align_bm_temp)
                                                    + info_nce(e_u, general_u, cfg.align_bm_temp))
        # the in-batch items of Eq. 8 and 12-14: unique(pos), or the release's unique(pos ∪ neg)
        batch_items = torch.unique(pos if cfg.loss_items == "positives" else torch.cat([pos, neg]))
        if cfg.inter_modal and len(views) > 1:   # InfoNCE across modalities' general features, Eq. 8
            with term("inter_modal"):
                inter = 0.0
                item_ids = reps.global_items(batch_items)
                for a, b in combinations(self.modalities, 2):
                    both = batch_items[self.present(a)[item_ids] & self.present(b)[item_ids]]
                    if len(both) > 1:
                        inter = inter + info_nce(views[a].general[both], views[b].general[both], cfg.inter_modal_temp)
                    inter = inter + info_nce(at_users(views[a].user_general), at_users(views[b].user_general),
                                             cfg.inter_modal_temp)
                parts["inter_modal"] = cfg.inter_modal * inter
        if cfg.sampler:       # CLUB, Eq. 7 (estimator evaluated only)
            with term("club"):
                parts["club"] = cfg.sampler * sum(
                    self.club[m](*((v.item_specific, v.item_general) if cfg.club_items == "all"    # every row of reps
                                   else (at_pos(v.item_specific), at_pos(v.item_general))), generator)
                    for m, v in views.items())
        if cfg.recon:         # Eq. 10–11 over the items reps covers; decoder input detached
            with term("recon"):
                parts["recon"] = cfg.recon * sum(
                    self.decoders[m].reconstruction_loss(
                        *self._perturbed([v.item_general.detach(), v.item_specific.detach()], generator),
                        self.raw[m] if reps.item_raw is None else reps.item_raw[m])
                    for m, v in views.items())
        if cfg.additive:      # Eq. 12–14 on in-batch items that have the modality
            with term("gen"):
                parts["gen"] = cfg.additive * self._generation_loss(views, batch_items, reps.global_items(batch_items),
                                                                    generator)
        total = sum(parts.values())
        with term("host_sync"):
            return total, scalar_parts(parts)

    def _perturbed(self, parts: list[torch.Tensor], generator) -> list[torch.Tensor]:
        """:func:`perturb` on each of ``parts`` ([n, w_i] each), or (``perturb_over: concat``, the release) on
        their concatenation, so the noise of a row has norm ``perturb_eps`` over all parts together."""
        eps = self.config.perturb_eps
        if self.config.perturb_over == "parts":
            return [perturb(p, eps, generator) for p in parts]
        return list(perturb(torch.cat(parts, dim=1), eps, generator).split([p.shape[1] for p in parts], dim=1))

    def _generation_loss(self, views, items, item_ids, generator):
        """Eq. 12–14 on the item rows ``items`` [n] (global ids ``item_ids`` [n])."""
        eps = self.config.perturb_eps
        loss = 0.0
        for m, v in views.items():
            has = items[self.present(m)[item_ids]]
            if len(has):
                fake = self.specific_generators[m](perturb(v.preference[has], eps, generator))
                loss = loss + F.mse_loss(fake, v.specific[has])
            if m in self.general_generators:
                others = [o for o in self.modalities if o != m]
                keep = self.present(m)[item_ids]
                for o in others:
                    keep = keep & self.present(o)[item_ids]
                full = items[keep]
                if len(full):
                    source = torch.cat(self._perturbed([views[o].item_general[full] for o in others], generator), 1)
                    loss = loss + F.mse_loss(self.general_generators[m](source), v.item_general[full])
        return loss

    # ------------------------------------------------------------------ CLUB estimator steps
    def club_step(self, optimizer: torch.optim.Optimizer, n_samples: int,
                  generator: torch.Generator | None = None) -> float:
        """One maximum-likelihood step of every estimator on random items (encoder outputs, no filtering)."""
        n_items = self.item_emb.shape[0]
        idx = torch.randperm(n_items, generator=generator)[:n_samples]
        with torch.no_grad():
            pairs = {m: (self.specific[m](self.raw[m][idx]), self.general(m, self.raw[m][idx]))
                     for m in self.modalities}
        optimizer.zero_grad(set_to_none=True)
        nll = -sum(self.club[m].log_likelihood(s, gen) for m, (s, gen) in pairs.items())
        nll.backward()
        optimizer.step()
        return float(nll.detach())

    # ------------------------------------------------------------------ generation (Eq. 12–15)
    @torch.no_grad()
    def generated_features(self, g, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                           reps: Representations | None = None,
                           chunk: int = DECODE_CHUNK) -> dict[str, torch.Tensor]:
        """Generated raw features X̂_m of the items ``rows[m]`` (Eq. 12–15), written nowhere.

        General features come from the other modalities' ḡ through G^g_m (Eq. 12; ``generation_input:
        encoder``, the release: their encoder outputs E^g), specific ones from the item preference through
        G^s_m (Eq. 13); both are propagated on S^m, perturbed and decoded (Eq. 15). With one modality the
        general part is the modality's own ḡ (or E^g). Decoding runs ``chunk`` rows at a time (the noise is
        drawn for all rows first, so the result does not depend on ``chunk``).

        Returns:
            modality → float32 ``[len(rows[m]), d_m]``.
        """
        out: dict[str, list[torch.Tensor]] = {m: [] for m in rows}
        for m, _, decoded in self._decoded_chunks(g, rows, generator, reps, chunk):
            out[m].append(decoded)
        return {m: torch.cat(parts) for m, parts in out.items()}

    def _decoded_chunks(self, g, rows, generator, reps, chunk):
        """Yield ``(m, start, X̂_m of rows[m][start:start + chunk])``; its callers run it under no_grad."""
        cfg = self.config
        reps = self(g) if reps is None else reps
        for m, ids in rows.items():
            v = reps.modalities[m]
            others = [o for o in self.modalities if o != m]
            # the translators read ḡ (filtered, propagated) or, as the release does, E^g (encoder output)
            source = "item_general" if cfg.generation_input == "propagated" else "general"
            if others:
                general = self.general_generators[m](torch.cat([getattr(reps.modalities[o], source) for o in others], 1))
            else:
                general = getattr(v, source)
            specific = self.specific_generators[m](v.preference)
            h = propagate_modality(g, m, torch.cat([general, specific], dim=1), cfg.n_mm_layers)
            gen_hat, spec_hat = h[ids].chunk(2, dim=1)
            gen_hat, spec_hat = self._perturbed([gen_hat, spec_hat], generator)   # [len(ids), d]: small, drawn whole
            for start in range(0, max(len(ids), 1), chunk):
                yield m, start, self.decoders[m](gen_hat[start:start + chunk], spec_hat[start:start + chunk])

    @torch.no_grad()
    def generate_features(self, g, targets: dict[str, torch.Tensor],
                          generator: torch.Generator | None = None, chunk: int = DECODE_CHUNK) -> dict[str, int]:
        """Overwrite the raw-feature rows ``targets[m]`` with :meth:`generated_features`, ``chunk`` rows at a time.

        Returns:
            rows written per modality.
        """
        targets = {m: rows for m, rows in targets.items() if len(rows)}
        written = {m: 0 for m in self.modalities}
        for m, start, decoded in self._decoded_chunks(g, targets, generator, None, chunk):
            self.raw[m].data[targets[m][start:start + chunk]] = decoded
            written[m] += len(decoded)
        return written
