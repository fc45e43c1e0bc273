"""An independent float64 oracle of DGMRec, and one case per release-vs-paper switch.

The oracle below is written from the equations of ``DGMRec_SPEC.md`` (§2 forward pass, §3 losses, §4
generation and refinement) with plain torch ops on dense float64 matrices: it calls nothing of
``dgmrec_dgl.models`` and reads only the model's parameters (``state_dict``), its raw feature tables and, for
the scores after a refinement, its refined graph. On a tiny example (7 users, 12 items, two or three
modalities, one missing pattern) it is compared term by term with the model: the initial kNN graphs, the
generation targets and refined rows, every loss term, the scores, the generated features, the support of the
refined graph rows, the scores on the scoring graph and the epochs that refine.

Then every switch of :data:`dgmrec_dgl.config.FIDELITY` is flipped in its own case: the model must still match
the oracle given the same switch, and the quantities the switch is about must change. A switch the model
silently ignored (or an oracle that did not follow it) fails its case.

Randomness: the noise of ``perturb`` is fixed to a constant ``u = 1`` before normalisation and CLUB's
permutation to a shift by one row (``torch.rand`` / ``torch.randperm`` patched during the compared calls); the
oracle uses the same two definitions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from itertools import combinations
from unittest import mock

import numpy as np
import pytest
import torch

from dgmrec_dgl.config import FIDELITY, DGMRecConfig, load_config, resolve_fidelity
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.masks import MissingMask
from dgmrec_dgl.models.dgmrec.model import DGMRec
from dgmrec_dgl.train import train

from conftest import CONFIGS, tiny_lightgcn_config

N_USERS, N_ITEMS = 7, 12
DIMS = {"image": 6, "text": 5, "audio": 4}
#: one missing pattern per modality count (mask keys: t text only, v image only, a audio only, ..., all)
MASKS = {2: {"v": [1, 4], "t": [2, 8], "all": [6]},
         3: {"v": [1], "t": [2, 11], "a": [4], "tv": [8], "ta": [9], "va": [10], "all": [6]}}
#: every loss weight non-zero and different, every temperature different
BASE = dict(embedding_dim=8, n_ui_layers=2, n_mm_layers=2, knn_k=3, reg_id=0.05, reg=0.1, recon=0.3, additive=0.7,
            sampler=0.2, inter_modal=0.4, inter_modal_temp=0.5, intra_modal=0.3, intra_modal_temp=0.3, align_bm=0.2,
            align_bm_temp=0.7, avg_lambda=0.6, refresh_every=3, perturb_eps=0.5, club_hidden=4, club_steps=1,
            club_batch=8, execution="full", knn_index="exact")
#: a batch (users, positives, negatives) with a repeated positive and negatives that have every modality
BATCH = (torch.tensor([0, 1, 2, 3, 4, 5, 6, 0]), None, torch.tensor([0, 3, 5, 7, 9, 10, 11, 3]))
REFINE_EPOCHS = range(8)       # before_epoch runs for these epochs; refresh_every 3


@functools.lru_cache(maxsize=None)
def tiny(n_modalities: int) -> Dataset:
    """7 users with 4 train items each, 12 items, ``n_modalities`` modalities, MASKS' items lacking some."""
    rng = np.random.default_rng(5)
    train_pairs = np.array([(u, i) for u in range(N_USERS) for i in rng.choice(N_ITEMS, 4, replace=False)], np.int64)
    modalities = tuple(DIMS)[:n_modalities]
    # offset features: the mean-imputed rows resemble every item, as with CNN image features
    features = {m: (rng.normal(size=(N_ITEMS, DIMS[m])) + 0.8).astype(np.float32) for m in modalities}
    empty = np.zeros((0, 2), np.int64)
    ds = Dataset("tiny", "<memory>", N_USERS, N_ITEMS, train_pairs, empty, empty, modalities, features,
                 {m: np.ones(N_ITEMS, bool) for m in modalities})
    return ds.with_mask(MissingMask(N_ITEMS, modalities, MASKS[n_modalities]))


def batch(ds: Dataset):
    """``BATCH`` with each user's first train item as the positive (user 0's twice)."""
    users, _, neg = BATCH
    first = {}
    for u, i in ds.train:
        first.setdefault(int(u), int(i))
    return users, torch.tensor([first[int(u)] for u in users]), neg


# ---------------------------------------------------------------------- fixed randomness
def shift_permutation(n: int) -> torch.Tensor:
    """CLUB's permutation π in the compared calls: π(r) = r + 1 (mod n)."""
    return (torch.arange(n) + 1) % n


@contextlib.contextmanager
def fixed_noise():
    """``torch.rand`` → ones (perturb's noise before normalisation), ``torch.randperm`` → :func:`shift_permutation`."""
    def rand(size, *args, generator=None, device=None, dtype=None, **kw):
        return torch.ones(size, dtype=dtype or torch.float32)

    def randperm(n, *args, generator=None, device=None, **kw):
        return shift_permutation(int(n))

    with mock.patch.object(torch, "rand", rand), mock.patch.object(torch, "randperm", randperm):
        yield


# ---------------------------------------------------------------------- the oracle (DGMRec_SPEC §2-4)
def linear(P, name, x):
    """``x W^T + b`` with the weight (and bias, if any) ``name`` of the parameters ``P``."""
    out = x @ P[f"{name}.weight"].T
    return out + P[f"{name}.bias"] if f"{name}.bias" in P else out


def mlp(P, name, x):
    """The two-layer generator shape of §3: Linear, tanh, Linear."""
    return linear(P, f"{name}.net.2", torch.tanh(linear(P, f"{name}.net.0", x)))


def perturb(x, eps):
    """§3: x + sign(x) ⊙ normalize(u) · ε, here with u = 1 (so normalize(u) = 1/√width in every entry)."""
    return x + torch.sign(x) * eps / math.sqrt(x.shape[1])


def perturbed(parts, eps, over):
    """perturb on each part, or on their concatenation (the release's)."""
    if over == "parts":
        return [perturb(p, eps) for p in parts]
    return list(perturb(torch.cat(parts, 1), eps).split([p.shape[1] for p in parts], 1))


def info_nce(a, b, tau):
    """mean_r −log( exp(cos(a_r, b_r)/τ) / Σ_c exp(cos(a_r, b_c)/τ) )."""
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = torch.exp(a @ b.T / tau)
    return -torch.log(sim.diagonal() / sim.sum(1)).mean()


def mse(a, b):
    return ((a - b) ** 2).mean()


def top_k(scores, k):
    """Ids of the k largest ``scores``; ties (identical mean-imputed rows) to the smaller id."""
    return torch.argsort(-scores, stable=True)[:k]


def oracle_knn(x, present, k, candidates):
    """§2.5: cosine top-k (the item itself included) of every item having the modality, among the items having it
    (``present``) or among all items before the columns of missing items are zeroed (``all``); a missing item's
    row is a self-loop 1; then D^-1/2 S D^-1/2 with D the row sums. Dense [n, n]."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    present = torch.as_tensor(present)
    unit = x / x.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    allowed = present if candidates == "present" else torch.ones_like(present)
    S = torch.zeros_like(cos)
    for i in range(len(x)):
        if present[i]:
            top = top_k(torch.where(allowed, cos[i], -torch.inf), k)
            S[i, top] = cos[i, top]
            S[i, ~present] = 0.0
        else:
            S[i, i] = 1.0
    d = S.sum(1)
    return S / torch.sqrt(d[:, None] * d[None, :])


def oracle_forward(ds, cfg, P, S):
    """§2: every representation on the dense graphs ``S`` (modality → [n, n]) with the parameters ``P``."""
    U, I, M = ds.n_users, ds.n_items, len(ds.modalities)
    pairs = np.unique(ds.train, axis=0)
    R = torch.zeros(U, I, dtype=torch.float64)
    R[pairs[:, 0], pairs[:, 1]] = 1.0
    A = torch.zeros(U + I, U + I, dtype=torch.float64)
    A[:U, U:], A[U:, :U] = R, R.T
    deg = A.sum(1) + 1e-7
    A_hat = A / torch.sqrt(deg[:, None] * deg[None, :])
    layers = [torch.cat([P["user_emb"], P["item_emb"]])]
    for _ in range(cfg.n_ui_layers):
        layers.append(A_hat @ layers[-1])
    E = torch.stack(layers).mean(0)
    out = {"E_u": E[:U], "E_i": E[U:], "m": {}}
    item_mean = R.T / R.sum(0).clamp(min=1)[:, None]          # [I, U]: mean over an item's train users
    user_mean = R / R.sum(1).clamp(min=1)[:, None]            # [U, I]: mean over a user's train items
    for m in ds.modalities:
        x = P[f"raw.{m}"]
        g = torch.sigmoid(linear(P, "general.shared", torch.tanh(linear(P, f"general.project.{m}", x))))
        s = torch.sigmoid(linear(P, f"specific.{m}.encode", x))
        p = item_mean @ torch.tanh(P["user_emb"] @ P[f"preference.{m}.user_to_pref.weight"].T)
        h = torch.cat([p * g, p * s], 1)
        for _ in range(cfg.n_mm_layers):
            h = S[m] @ h
        gbar, sbar = h.chunk(2, 1)
        out["m"][m] = dict(g=g, s=s, p=p, gbar=gbar, sbar=sbar, gu=user_mean @ gbar, su=user_mean @ sbar)
    v = out["m"].values()
    out["e_i"] = out["E_i"] + (torch.stack([w["gbar"] for w in v]).mean(0) + sum(w["sbar"] for w in v)) / (M + 1)
    out["e_u"] = out["E_u"] + (torch.stack([w["gu"] for w in v]).mean(0) + sum(w["su"] for w in v)) / (M + 1)
    return out


def club_bound(P, name, s, g):
    """§3 CLUB: mean_r [Σ −(μ_r − g_r)²/e^{lv_r} − Σ −(μ_r − g_π(r))²/e^{lv_r}] / 2, μ and lv two MLPs of s."""
    mu = linear(P, f"{name}.mu.2", torch.relu(linear(P, f"{name}.mu.0", s)))
    lv = torch.tanh(linear(P, f"{name}.logvar.2", torch.relu(linear(P, f"{name}.logvar.0", s))))
    g_perm = g[shift_permutation(len(g))]
    positive = -((mu - g) ** 2 / torch.exp(lv)).sum(1)
    negative = -((mu - g_perm) ** 2 / torch.exp(lv)).sum(1)
    return (positive - negative).mean() / 2


def oracle_losses(ds, cfg, P, F, users, pos, neg):
    """§3: every term of the loss (weights included) on the batch, from the representations ``F``."""
    B, mods, present = len(users), ds.modalities, ds.present
    views = F["m"]
    E_u, E_i = F["E_u"][users], F["E_i"][pos]
    gen_u, gen_i = sum(views[m]["gu"][users] for m in mods), sum(views[m]["gbar"][pos] for m in mods)
    t = {"bpr": -torch.log(torch.sigmoid((F["e_u"][users] * (F["e_i"][pos] - F["e_i"][neg])).sum(1))).mean()}
    t["reg"] = (cfg.reg_id * (E_u.norm() + E_i.norm() + F["E_i"][neg].norm()) / B
                + cfg.reg * sum((views[m]["gbar"][pos] + views[m]["sbar"][pos]).norm() for m in mods) / B)
    ui = info_nce(E_u, E_i, cfg.intra_modal_temp) + info_nce(gen_u, gen_i, cfg.inter_modal_temp)
    for m in mods:
        side = "g" if m == "audio" and cfg.ui_align_audio == "general" else "s"
        ui = ui + info_nce(views[m][f"{side}u"][users], views[m][f"{side}bar"][pos], cfg.intra_modal_temp)
    t["ui_align"] = cfg.intra_modal * ui
    t["bm_align"] = cfg.align_bm * (info_nce(E_i, gen_i, cfg.align_bm_temp) + info_nce(E_u, gen_u, cfg.align_bm_temp))
    rows = np.unique((pos if cfg.loss_items == "positives" else torch.cat([pos, neg])).numpy())
    if len(mods) > 1:
        inter = 0.0
        for a, b in combinations(mods, 2):
            both = rows[present[a][rows] & present[b][rows]]
            if len(both) > 1:
                inter = inter + info_nce(views[a]["g"][both], views[b]["g"][both], cfg.inter_modal_temp)
            inter = inter + info_nce(views[a]["gu"][users], views[b]["gu"][users], cfg.inter_modal_temp)
        t["inter_modal"] = cfg.inter_modal * inter
    club_rows = torch.arange(ds.n_items) if cfg.club_items == "all" else pos
    t["club"] = cfg.sampler * sum(club_bound(P, f"club.{m}", views[m]["sbar"][club_rows], views[m]["gbar"][club_rows])
                                  for m in mods)
    t["recon"] = cfg.recon * sum(
        mse(linear(P, f"decoders.{m}.decode",
                   torch.cat(perturbed([views[m]["gbar"], views[m]["sbar"]], cfg.perturb_eps, cfg.perturb_over), 1)),
            P[f"raw.{m}"]) for m in mods)
    complete = rows[np.all([present[m][rows] for m in mods], axis=0)]
    gen = 0.0
    for m in mods:
        has = rows[present[m][rows]]
        gen = gen + mse(mlp(P, f"specific_generators.{m}", perturb(views[m]["p"][has], cfg.perturb_eps)),
                        views[m]["s"][has])
        if len(mods) > 1 and len(complete):
            source = perturbed([views[o]["gbar"][complete] for o in mods if o != m], cfg.perturb_eps, cfg.perturb_over)
            gen = gen + mse(mlp(P, f"general_generators.{m}", torch.cat(source, 1)), views[m]["gbar"][complete])
    t["gen"] = cfg.additive * gen
    return t


def oracle_generated(ds, cfg, P, F, S, rows):
    """§4, Eq. 12-15: X̂_m of the items ``rows[m]``: G^g_m on the other modalities' ḡ (or E^g), G^s_m on p_m,
    both propagated on S^m, perturbed, decoded."""
    out = {}
    views = F["m"]
    source = "gbar" if cfg.generation_input == "propagated" else "g"
    for m, ids in rows.items():
        others = [o for o in ds.modalities if o != m]
        general = (mlp(P, f"general_generators.{m}", torch.cat([views[o][source] for o in others], 1)) if others
                   else views[m][source])
        h = torch.cat([general, mlp(P, f"specific_generators.{m}", views[m]["p"])], 1)
        for _ in range(cfg.n_mm_layers):
            h = S[m] @ h
        parts = perturbed(list(h[ids].chunk(2, 1)), cfg.perturb_eps, cfg.perturb_over)
        out[m] = linear(P, f"decoders.{m}.decode", torch.cat(parts, 1))
    return out


def oracle_targets(ds, cfg):
    """§4: generated rows: items lacking exactly that modality (release), or every item lacking it."""
    lacks = {m: ~ds.present[m] for m in ds.modalities}
    alone = {m: lacks[m] & ~np.any([lacks[o] for o in lacks if o != m], axis=0) for m in lacks}
    return {m: np.flatnonzero(lacks[m] if cfg.generate_multi_missing else alone[m]) for m in lacks}


def oracle_refine_rows(ds, cfg):
    """§4: rows refined: every item lacking the modality, or (release, 3 modalities) those lacking it alone."""
    lacks = {m: ~ds.present[m] for m in ds.modalities}
    if cfg.refine_rows == "missing":
        return {m: np.flatnonzero(lack) for m, lack in lacks.items()}
    return {m: np.flatnonzero(lacks[m] & ~np.any([lacks[o] for o in lacks if o != m], axis=0)) for m in lacks}


def oracle_refined_support(ds, cfg, initial, raw, rows):
    """§4, Eq. 16 with tolerance 0: a refined row holds its old entries and the top-k of the item's current raw
    features among the sources (items having the modality, or every item, itself included)."""
    out = {}
    for m in ds.modalities:
        support = initial[m] != 0          # the initial graph stores no zero weight
        x = raw[m] / raw[m].norm(dim=1, keepdim=True)
        allowed = torch.as_tensor(ds.present[m]) if cfg.refine_sources == "present" else torch.ones(ds.n_items, dtype=bool)
        for i in rows[m]:
            cos = torch.where(allowed, x @ x[i], -torch.inf)
            top = top_k(cos, cfg.knn_k)
            assert cos[top].sum() > 0, "the example must keep positive degrees (a row summing to <= 0 adds no entry)"
            support[i, top] = True
        out[m] = support
    return out


def oracle_refine_epochs(cfg):
    """Refinement every ``refresh_every`` epochs: before epochs r, 2r, ... (0-based), or as the release's epoch
    counter starting at 1 has it, before epochs r − 1, 2r − 1, ..."""
    r = cfg.refresh_every
    return [e for e in REFINE_EPOCHS if (e + 1 if cfg.refine_count_from == 1 else e) % r == 0
            and (e > 0 or cfg.refine_count_from == 1)]


# ---------------------------------------------------------------------- model vs oracle
def dense(knn) -> torch.Tensor:
    return torch.as_tensor(knn.to_scipy().toarray(), dtype=torch.float64)


def pattern(knn) -> torch.Tensor:
    """bool [n, n]: the entries a graph stores (an entry of weight 0 included)."""
    out = torch.zeros(knn.n_items, knn.n_items, dtype=torch.bool)
    out[torch.from_numpy(np.repeat(np.arange(knn.n_items), np.diff(knn.indptr))), torch.from_numpy(knn.indices)] = True
    return out


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64).clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def randomize(model) -> None:
    """Parameters (but the raw tables) drawn N(0, 0.5²), the same in every case: terms of order 0.1-1. The
    decoders get small weights and the features' offset as bias, so that generated rows resemble real ones
    (a decoder that had learnt) and every refined row's cosine top-k sums to a positive degree."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("decoders."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.8 if name.endswith(".bias") else 0.0))
            elif not name.startswith("raw."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def biases(model) -> dict[str, torch.Tensor]:
    """The biases of every Linear layer of the encoders, decoders and generators."""
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if name.endswith(".bias") and name.split(".")[0] in
            ("general", "specific", "decoders", "general_generators", "specific_generators")}


def measure(n_modalities: int, **switches):
    """``(got, want, cfg)``: the model's and the oracle's quantities under ``switches`` (float64 numpy each)."""
    ds = tiny(n_modalities)
    config = DGMRecConfig(**BASE, **switches)
    cfg = resolve_fidelity(config, config.fidelity, n_modalities)
    torch.manual_seed(0)
    model = DGMRec.from_dataset(ds, config)
    got, want = {}, {}
    got["biases"] = torch.cat(list(biases(model).values()))
    want["biases"] = got["biases"] if cfg.linear_bias_init == "uniform" else torch.zeros_like(got["biases"])
    S = {m: oracle_knn(ds.features[m], ds.present[m], cfg.knn_k, cfg.knn_candidates) for m in ds.modalities}
    for m in ds.modalities:
        got[f"knn/{m}"], want[f"knn/{m}"] = dense(model.initial_knn[m]), S[m]
        got[f"targets/{m}"], want[f"targets/{m}"] = model.targets[m].numpy(), oracle_targets(ds, cfg)[m]
        got[f"refine_rows/{m}"], want[f"refine_rows/{m}"] = model.refine_rows[m], oracle_refine_rows(ds, cfg)[m]

    randomize(model)
    P = params(model)
    users, pos, neg = batch(ds)
    g = model.make_graph(ds)
    with fixed_noise():
        reps = model(g)
        _, parts = model.loss(reps, users, pos, neg)
        user, item = model.fused(reps)
        generated = model.generated_features(g, model.targets)
    F = oracle_forward(ds, cfg, P, S)
    for name, value in oracle_losses(ds, cfg, P, F, users, pos, neg).items():
        got[f"loss/{name}"], want[f"loss/{name}"] = parts[name], value
    got["scores"], want["scores"] = user @ item.T, F["e_u"] @ F["e_i"].T
    rows = {m: ids.numpy() for m, ids in model.targets.items()}
    for m, value in oracle_generated(ds, cfg, P, F, S, rows).items():
        got[f"generated/{m}"], want[f"generated/{m}"] = generated[m], value

    # Eq. 16 once, then the scores on the scoring graph (the refined one, or the initial one)
    model.generate_features(g, model.targets)
    g_refined = model.refine_graphs(g)
    raw = {m: model.raw[m].detach().to(torch.float64) for m in ds.modalities}
    support = oracle_refined_support(ds, cfg, S, raw, oracle_refine_rows(ds, cfg))
    for m in ds.modalities:
        got[f"refined_support/{m}"], want[f"refined_support/{m}"] = pattern(model.knn[m]), support[m]
    with torch.no_grad():
        user, item = model.fused(model(model.scoring_graph(g_refined)))
    scoring = {m: dense(model.knn[m] if cfg.score_with_refined_graph else model.initial_knn[m]) for m in ds.modalities}
    F2 = oracle_forward(ds, cfg, {**P, **{f"raw.{m}": raw[m] for m in raw}}, scoring)
    got["refined_scores"], want["refined_scores"] = user @ item.T, F2["e_u"] @ F2["e_i"].T

    torch.manual_seed(0)
    fresh = DGMRec.from_dataset(ds, config)
    g = fresh.make_graph(ds)
    epochs = []
    for epoch in REFINE_EPOCHS:
        g, log = fresh.before_epoch(epoch, g, torch.Generator().manual_seed(epoch))
        if "refined_rows" in log:
            epochs.append(epoch)
    got["refine_epochs"], want["refine_epochs"] = np.array(epochs), np.array(oracle_refine_epochs(cfg))
    as_numpy = lambda d: {k: np.asarray(v.detach().double() if torch.is_tensor(v) else v, dtype=np.float64)
                          for k, v in d.items()}
    return as_numpy(got), as_numpy(want), cfg


def assert_matches(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for key in got:
        assert got[key].shape == want[key].shape, (what, key, got[key], want[key])
        np.testing.assert_allclose(got[key], want[key], rtol=2e-4, atol=2e-6, err_msg=f"{what}: {key}")


def changed(a: dict, b: dict) -> set[str]:
    """Keys whose values differ by five times the model-oracle tolerance or more."""
    return {k for k in a if a[k].shape != b[k].shape or not np.allclose(a[k], b[k], rtol=1e-3, atol=1e-5)}


@functools.lru_cache(maxsize=None)
def default_run(n_modalities: int):
    return measure(n_modalities)


@pytest.mark.parametrize("n_modalities", [2, 3])
def test_the_model_matches_the_oracle_under_the_defaults(n_modalities):
    got, want, cfg = default_run(n_modalities)
    assert cfg.fidelity == "paper" and all(getattr(cfg, k) == FIDELITY[k][0] for k in FIDELITY if hasattr(cfg, k))
    assert_matches(got, want, "defaults")
    # the example exercises what the switches act on
    assert set(want["refine_epochs"]) == {3, 6} and all(len(want[f"targets/{m}"]) for m in tiny(n_modalities).modalities)
    assert all(abs(want[f"loss/{t}"]) > 1e-3 for t in ("bpr", "ui_align", "bm_align", "inter_modal", "club", "recon",
                                                       "gen"))


#: (switch, flipped value, modalities, quantities that must change); "fidelity: release" flips them all at once
SWITCH_CASES = [
    ("knn_candidates", "all", 2, {"knn/image", "knn/text", "loss/ui_align", "scores"}),
    ("generation_input", "encoder", 2, {"generated/image", "generated/text"}),
    ("loss_items", "batch_items", 2, {"loss/inter_modal", "loss/gen"}),
    ("club_items", "all", 2, {"loss/club"}),
    ("refine_count_from", 1, 2, {"refine_epochs"}),
    ("perturb_over", "concat", 2, {"loss/recon", "generated/image", "generated/text"}),
    ("perturb_over", "concat", 3, {"loss/recon", "loss/gen"}),
    ("linear_bias_init", "uniform", 2, {"biases"}),
    ("ui_align_audio", "general", 3, {"loss/ui_align"}),
    ("refine_rows", "missing_alone", 3, {"refine_rows/image", "refined_support/image", "refined_scores"}),
    ("score_with_refined_graph", False, 2, {"refined_scores"}),
    ("refine_sources", "all", 2, {"refined_support/image", "refined_support/text"}),
    ("generate_multi_missing", True, 2, {"targets/image", "generated/image"}),
    ("fidelity", "release", 2, {"knn/image", "loss/club", "generated/text", "refine_epochs", "biases"}),
    ("fidelity", "release", 3, {"knn/audio", "loss/ui_align", "refine_rows/text", "refine_epochs"}),
]


@pytest.mark.parametrize("key, value, n_modalities, moves", SWITCH_CASES,
                         ids=[f"{c[0]}={c[1]}-{c[2]}mod" for c in SWITCH_CASES])
def test_each_switch_flipped_still_matches_the_oracle_and_moves_its_terms(key, value, n_modalities, moves):
    got, want, cfg = measure(n_modalities, **{key: value})
    assert getattr(cfg, key) == value
    assert_matches(got, want, f"{key}={value}")
    default, _, _ = default_run(n_modalities)
    moved = changed(default, got)
    assert moves <= moved, f"{key}={value} left {sorted(moves - moved)} unchanged (changed: {sorted(moved)})"


def test_biases_start_at_zero_or_at_pytorchs_uniform_draw():
    ds = tiny(2)
    for rule in ("zero", "uniform"):
        torch.manual_seed(0)
        model = DGMRec.from_dataset(ds, DGMRecConfig(**BASE, linear_bias_init=rule))
        modules = dict(model.named_modules())
        for name, bias in biases(model).items():
            bound = 1 / math.sqrt(modules[name.rsplit(".", 1)[0]].in_features)
            assert (bias == 0).all() if rule == "zero" else (bias.abs() <= bound).all() and (bias != 0).all(), name


# ---------------------------------------------------------------------- fidelity resolution, presets, early stopping
def test_fidelity_sets_the_switches_left_none_and_explicit_values_win():
    paper = resolve_fidelity(DGMRecConfig(), "paper", 3)
    release2 = resolve_fidelity(DGMRecConfig(fidelity="release"), "release", 2)
    release3 = resolve_fidelity(DGMRecConfig(fidelity="release"), "release", 3)
    for key, (ours, theirs) in FIDELITY.items():
        if key in ("patience_rule", "negatives"):         # TrainConfig switches, below
            continue
        assert getattr(paper, key) == ours and getattr(release3, key) == theirs, key
        # the 3-modality choices are the release's only where it runs its 3-modality code
        assert getattr(release2, key) == (ours if key in ("ui_align_audio", "refine_rows") else theirs), key
    explicit = resolve_fidelity(DGMRecConfig(fidelity="release", knn_candidates="present"), "release", 2)
    assert explicit.knn_candidates == "present" and explicit.club_items == "all"
    assert resolve_fidelity(release3, "paper", 3) == release3          # resolving again changes nothing
    from dgmrec_dgl.config import TrainConfig
    assert resolve_fidelity(TrainConfig(), "release").patience_rule == "exceed"
    assert resolve_fidelity(TrainConfig(patience_rule="reach"), "release").patience_rule == "reach"
    assert resolve_fidelity(TrainConfig(), "release").negatives == "train_items"
    assert resolve_fidelity(TrainConfig(), "paper").negatives == "all"
    # the model reads its config resolved: fidelity alone is enough
    torch.manual_seed(0)
    model = DGMRec.from_dataset(tiny(3), DGMRecConfig(**BASE, fidelity="release"))
    assert model.config.refine_rows == "missing_alone" and model.config.knn_candidates == "all"


@pytest.mark.parametrize("dataset", ["baby", "sports", "clothing", "tiktok"])
def test_release_presets_extend_the_dataset_config_with_the_release_choices(dataset):
    ours, release = load_config(CONFIGS / "dgmrec" / f"{dataset}.yaml"), load_config(
        CONFIGS / "dgmrec" / f"{dataset}_release.yaml")
    assert ours.model.fidelity == "paper" and release.model.fidelity == "release"
    assert release.train.patience == (20 if dataset == "tiktok" else 25)       # the release's stopping_step
    assert release.train.eval_every == (1 if dataset == "tiktok" else 3)       # its eval_step
    differing = {k for k in ("n_mm_layers", "avg_lambda", "additive", "batch_size")
                 if getattr(ours.model, k, None) != getattr(release.model, k, None)}
    assert not differing and ours.train.batch_size == release.train.batch_size and ours.data == release.data


def oracle_stop_epoch(valid: list[float], patience: int, rule: str) -> int | None:
    """The epoch (index into ``valid``, one validation per epoch) after which training stops: the count of
    validations without a better metric reaches ``patience`` (ours) or exceeds it (the release's)."""
    best, bad = -math.inf, 0
    for epoch, metric in enumerate(valid):
        if metric > best:
            best, bad = metric, 0
        else:
            bad += 1
            if (bad >= patience) if rule == "reach" else (bad > patience):
                return epoch
    return None


def test_patience_rule_stops_one_validation_later_under_the_release_rule(tiny_dir, tmp_path):
    """LightGCN with a learning rate too small to move a float32 weight: every validation after the first one is
    no better, so the rules differ by exactly one epoch."""
    config_file = tiny_lightgcn_config(tmp_path, eval_every=1)
    stopped = {}
    for rule in ("reach", "exceed"):
        config = load_config(config_file, {"data": {"dir": str(tiny_dir)},
                                           "train": {"epochs": 8, "patience": 2, "patience_rule": rule, "lr": 1e-12}})
        result = train(config, str(tmp_path / rule), progress=False)
        valid = [line["valid"]["recall@20"] for line in map(json.loads, open(tmp_path / rule / "log.jsonl"))]
        expected = oracle_stop_epoch(valid, 2, rule)
        assert expected is not None and result["epochs_run"] == expected + 1 == len(valid), (rule, valid)
        stopped[rule] = result["epochs_run"]
    assert stopped == {"reach": 3, "exceed": 4}
