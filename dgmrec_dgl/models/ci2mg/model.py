r"""CI2MG: Contrastive Intra- and Inter-Modality Generation (Lin et al., MM 2023), as a Recommender.

The data flow for a batch, every step over the list of modalities:

1. ID branch: LightGCN over the user–item graph, 3 layers, layer mean → E_u, E_i. The release normalises
   with D^-1 A (``ui_norm="mean"``, a mean over neighbours); ``"sym"`` uses D^-1/2 A D^-1/2.
2. Eq. 1: the frozen raw features X_m are projected, P_m = Linear_m(X_m) [I, d]; users get the mean over
   their train items, F^{U,m} = D_U^-1 R P_m, and items the mean over their users of that,
   F^{V,m} = D_V^-1 R^T F^{U,m} (a two-hop item → user → item smoothing).
3. Eq. 3–5 (:mod:`.hypergraph`): Q_m = L sigmoid layers of the prototype hypergraph on F^{V,m}.
4. Eq. 6–9 (:mod:`.transport`): Q̂_m = mean over m' ≠ m of the block-wise Sinkhorn barycentric projection
   of Q_{m'} onto Q_m (one modality: Q̂_m = Q_m).
5. Eq. 11 (:mod:`.generation`): Z_m = BN(Linear([Q_m, Q̂_m])), the generated modality representation; one
   BN shared by the modalities (``shared_norm``, the release) or one each.
6. Eq. 13: item modality representation C_m = Z_m for items *missing* m and P_m for items that have it
   (``generated_for="missing"``, the generate-the-missing reading; ``"all"`` uses Z_m for every item as the
   release does). user = [E_u, ‖F^{U,m}‖-normalised ...], item = [E_i, ‖C_m‖-normalised ...];
   score = ⟨user, item⟩.
7. Loss (Eq. 15): rec_weight·L_rec (Eq. 12) + cl_weight·L_s (Eq. 10) + bpr_weight·L_BPR (Eq. 14)
   + reg·(‖E_u‖ + ‖E_i+‖ + ‖E_i−‖)/B on the layer-0 ID embeddings (λ3; 0 in the release).

The OT block assignment is a permutation of the items held in a buffer (so checkpoints carry it) and
redrawn before every epoch from the trainer's generator; with ``ot_block >= n_items`` there is one block,
the release's full I×I problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...config import CI2MGConfig
from ...graphs.hetero import mean_aggregate, propagate
from ..base import Recommender, gather_rows, scalar_parts
from ..dgmrec.losses import bpr_loss, emb_loss
from ..lightgcn import lightgcn
from .contrastive import modality_contrastive
from .generation import TaskGuidedGenerator, reconstruction_loss
from .hypergraph import PrototypeHypergraph
from .transport import SOLVERS, block_transport, item_blocks

UI_NORMS = ("mean", "sym")
GENERATED_FOR = ("missing", "all")
CONTRASTIVE = ("paper", "release")


def _step(g, etype: str, h: torch.Tensor, norm: str) -> torch.Tensor:
    """One hop along ``etype``: mean over neighbours (D^-1 A) or the LightGCN-weighted sum."""
    return mean_aggregate(g, etype, h) if norm == "mean" else propagate(g, etype, h)


def id_propagation(g, user: torch.Tensor, item: torch.Tensor, n_layers: int,
                   norm: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-mean LightGCN embeddings ``([U, d], [I, d])`` with either normalisation."""
    if norm == "sym":
        return lightgcn(g, user, item, n_layers)
    users, items = [user], [item]
    for _ in range(n_layers):
        u, i = users[-1], items[-1]
        items.append(_step(g, "interacts", u, norm))
        users.append(_step(g, "interacted_by", i, norm))
    return torch.stack(users).mean(dim=0), torch.stack(items).mean(dim=0)


@dataclass
class CI2MGViews:
    """One modality's tensors for all items / users."""

    projected: torch.Tensor      # P_m = Linear(X_m)                 [I, d]
    user: torch.Tensor           # F^{U,m}                            [U, d]
    intra: torch.Tensor          # Q_m (Eq. 5)                        [I, d]
    inter: torch.Tensor          # Q̂_m (Eq. 9)                        [I, d]
    generated: torch.Tensor      # Z_m (Eq. 11)                       [I, d]
    completed: torch.Tensor      # C_m: Z_m where missing, else P_m   [I, d]


@dataclass
class CI2MGRepresentations:
    user_id: torch.Tensor        # E_u [U, d]
    item_id: torch.Tensor        # E_i [I, d]
    modalities: dict[str, CI2MGViews]

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 13: ``([U, (M+1)d], [I, (M+1)d])``."""
        views = list(self.modalities.values())
        user = torch.cat([self.user_id] + [F.normalize(v.user, dim=1) for v in views], dim=1)
        item = torch.cat([self.item_id] + [F.normalize(v.completed, dim=1) for v in views], dim=1)
        return user, item


class CI2MG(Recommender):
    """The CI2MG model.

    Args:
        n_users, n_items: table sizes.
        features: modality → float32 ``[n_items, d_m]`` imputed raw features (frozen buffers).
        present: modality → bool ``[n_items]``, False where the item lacks the modality.
        config: hyper-parameters (:class:`~dgmrec_dgl.config.CI2MGConfig`).
        seed: seed of the initial OT block permutation.

    Example::

        model = CI2MG.from_dataset(ds, CI2MGConfig())
        g = model.make_graph(ds)
        loss, parts = model.loss(model(g), users, pos, neg)
    """

    def __init__(self, n_users: int, n_items: int, features: dict[str, np.ndarray],
                 present: dict[str, np.ndarray], config: CI2MGConfig, seed: int = 0):
        super().__init__()
        if not features:
            raise ValueError("CI2MG needs at least one modality with features")
        for key, allowed in (("ui_norm", UI_NORMS), ("generated_for", GENERATED_FOR),
                             ("contrastive", CONTRASTIVE), ("ot_solver", SOLVERS)):
            if getattr(config, key) not in allowed:
                raise ValueError(f"CI2MGConfig.{key} must be one of {allowed}, got {getattr(config, key)!r}")
        self.config = config
        self.modalities = tuple(features)
        d = config.embedding_dim
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users, d)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_items, d)))
        self.project = nn.ModuleDict()
        for m, x in features.items():
            layer = nn.Linear(int(x.shape[1]), d)
            nn.init.xavier_uniform_(layer.weight)
            self.project[m] = layer
            self.register_buffer(f"raw_{m}", torch.from_numpy(np.array(x, dtype=np.float32)))
            self.register_buffer(f"present_{m}", torch.from_numpy(np.asarray(present[m], dtype=bool)))
        self.hypergraph = nn.ModuleDict({m: PrototypeHypergraph(d, config.n_prototypes, config.n_hyper_layers,
                                                                config.incidence) for m in self.modalities})
        shared = nn.BatchNorm1d(d) if config.shared_norm else None
        self.generate = nn.ModuleDict({m: TaskGuidedGenerator(d, config.task_activation, norm=shared)
                                       for m in self.modalities})
        if config.ot_delta and len(self.modalities) > 1:
            self.delta = nn.ParameterDict({m: nn.Parameter(torch.zeros(n_items)) for m in self.modalities})
        else:
            self.delta = None
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("ot_order", order)

    @classmethod
    def from_dataset(cls, dataset, config: CI2MGConfig, seed: int = 0) -> CI2MG:
        return cls(dataset.n_users, dataset.n_items, dataset.features, dataset.present, config, seed=seed)

    def present(self, modality: str) -> torch.Tensor:
        return getattr(self, f"present_{modality}")

    # ------------------------------------------------------------------ Recommender hooks
    def before_epoch(self, epoch: int, g, generator: torch.Generator | None = None):
        """Redraw the OT block assignment (only matters when there is more than one block)."""
        n_items = self.item_emb.shape[0]
        if self.config.ot_block < n_items and len(self.modalities) > 1:
            self.ot_order.copy_(torch.randperm(n_items, generator=generator))
            return g, {"ot_blocks": len(item_blocks(self.ot_order, self.config.ot_block))}
        return g, {}

    # ------------------------------------------------------------------ forward
    def forward(self, g) -> CI2MGRepresentations:
        cfg = self.config
        user_id, item_id = id_propagation(g, self.user_emb, self.item_emb, cfg.n_ui_layers, cfg.ui_norm)
        projected, users, intra = {}, {}, {}
        for m in self.modalities:
            p = self.project[m](getattr(self, f"raw_{m}"))
            u = _step(g, "interacted_by", p, cfg.ui_norm)                     # Eq. 1, items → users
            seed = _step(g, "interacts", u, cfg.ui_norm)                      # Eq. 1, users → items
            projected[m], users[m], intra[m] = p, u, self.hypergraph[m](seed)  # Eq. 3–5
        inter = self._inter_modality(intra)
        views = {}
        for m in self.modalities:
            z = self.generate[m](intra[m], inter[m])                          # Eq. 11
            if cfg.generated_for == "missing":
                completed = torch.where(self.present(m)[:, None], projected[m], z)
            else:
                completed = z
            views[m] = CI2MGViews(projected[m], users[m], intra[m], inter[m], z, completed)
        return CI2MGRepresentations(user_id, item_id, views)

    def _inter_modality(self, intra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 9: Q̂_m, the mean over the other modalities of their OT projection onto Q_m."""
        cfg = self.config
        if len(self.modalities) == 1:
            return dict(intra)
        blocks = item_blocks(self.ot_order, cfg.ot_block)
        out = {}
        for m in self.modalities:
            delta = self.delta[m] if self.delta is not None else None
            moved = [block_transport(intra[o], intra[m], blocks, epsilon=cfg.ot_epsilon,
                                     n_iters=cfg.ot_iterations, method=cfg.ot_solver, delta=delta)
                     for o in self.modalities if o != m]
            out[m] = torch.stack(moved).mean(dim=0)
        return out

    def fused(self, reps: CI2MGRepresentations) -> tuple[torch.Tensor, torch.Tensor]:
        return reps.fused()

    # ------------------------------------------------------------------ loss
    def loss(self, reps: CI2MGRepresentations, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 15 on a batch of triples (users, pos, neg) [B]; returns the total and its parts."""
        cfg = self.config
        user_all, item_all = reps.fused()
        bpr = bpr_loss(gather_rows(user_all, users), gather_rows(item_all, pos), gather_rows(item_all, neg))
        parts: dict[str, torch.Tensor] = {"bpr": cfg.bpr_weight * bpr}
        unique_pos = torch.unique(pos)
        rec, cl = 0.0, 0.0
        for m, v in reps.modalities.items():
            has = unique_pos[self.present(m)[unique_pos]]
            rec = rec + reconstruction_loss(v.generated, v.projected, has)
            if len(self.modalities) > 1:
                cl = cl + modality_contrastive(v.intra[has], v.inter[has], cfg.temperature,
                                               release=cfg.contrastive == "release")
        parts["rec"] = cfg.rec_weight * rec
        if len(self.modalities) > 1:
            parts["cl"] = cfg.cl_weight * cl
        if cfg.reg:
            parts["reg"] = cfg.reg * emb_loss(gather_rows(self.user_emb, users), gather_rows(self.item_emb, pos),
                                              gather_rows(self.item_emb, neg))
        return sum(parts.values()), scalar_parts(parts)
