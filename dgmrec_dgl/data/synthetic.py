r"""Synthetic multimodal recommendation datasets: the package's embedded default data.

:func:`generate` writes a dataset in the MMRec layout that :mod:`dgmrec_dgl.data.dataset` reads, plus
the ground truth it was drawn from::

    OUT/<name>.inter      userID  itemID  x_label   (TSV; 0-based ids; 0 train, 1 valid, 2 test)
    OUT/<m>_feat.npy      float32 [n_items, d_m]    one file per modality (image, text, optional audio);
                          float16 with ``feature_dtype="float16"`` (the float32 values rounded)
    OUT/latents.npz       user [n_users, r_user], item_shared [n_items, r_shared],
                          item_specific_<m> [n_items, r_specific] per modality (float32)
    OUT/synthetic.json    the configuration, the fixed model constants and the counts

Rows of ``latents.npz`` and of the feature files follow the ids of the ``.inter`` file.

Generative model (every random draw comes from a ``SeedSequence(seed)`` stream keyed by what it is for,
so a config fully determines the files):

1. Latents, i.i.d. standard normal: item shared :math:`s_i \in R^{r_s}`, item specific
   :math:`z^m_i \in R^{r_z}` per modality :math:`m`, user :math:`u \in R^{r_s + M r_z}` (``M``
   modalities, taken in name order wherever an order matters, so the order of ``dims`` does not).
2. Popularity: items get a random rank :math:`\rho_i \in \{1, \dots, N\}` and weight
   :math:`\pi_i \approx (\rho_i + 1/2)^{-\alpha}` (Zipf, :math:`\alpha` = ``pop_exponent``). Activity:
   user :math:`u` draws :math:`k_u = c + \lfloor (\bar k - c) X_u \rfloor` items (at most
   :math:`N / 4`), :math:`X_u` log-normal with mean 1 and log-std ``activity_sigma``
   (:math:`c` = ``core``, :math:`\bar k` = ``mean_interactions``).
3. Interactions: user :math:`u` draws :math:`4 k_u` candidates from :math:`\pi` (with replacement, then
   de-duplicated) and keeps the top :math:`k_u` (all of them if fewer are distinct) by the
   Gumbel-perturbed affinity

   .. math:: \beta \, \langle u, [s_i; z^1_i; \dots; z^M_i] \rangle / \sqrt{r_s + M r_z} + G_{ui},
             \qquad G_{ui} \sim \mathrm{Gumbel}(0, 1),

   :math:`\beta` = ``affinity_scale``; so the shared and every specific latent matter (the modalities
   are informative and complementary). No users x items matrix is formed: users are processed in
   chunks of about 2^17 candidates.
4. ``core``-core filtering (default 5, repeated until every user and item has at least ``core``
   interactions), then users and items are re-indexed contiguously in their original order.
5. Split: each user's kept items are put in a random order, the order they were "drawn" (their
   timestamps); the last ``round(0.1 n)`` are test, the ``round(0.1 n)`` before them valid, the rest
   (at least one) train. The ``.inter`` rows are grouped by user, in that order.
6. Features, only for the kept items, in the new order: for modality :math:`m`

   .. math:: x^m_i = W^m_2 \, [\tanh(A^m s_i + a^m); \tanh(B^m z^m_i + b^m)] + \sigma \epsilon^m_i,

   with fixed random weights per modality (``HIDDEN`` units per block; scaled so the signal has about
   unit variance per dimension, half from the shared latent and half from the specific one),
   :math:`\sigma` = ``noise``, :math:`\epsilon^m_i \sim N(0, I)`. Features are streamed to the
   ``.npy`` files in item chunks; the output does not depend on the chunk size.

Everything is written into a hidden temporary folder next to ``OUT`` and renamed into place at the end,
so a crash never leaves a half-written dataset under ``OUT``.

Example::

    >>> from dgmrec_dgl.data.synthetic import generate, preset
    >>> summary = generate("data/toy", preset("toy"), progress=False)  # doctest: +SKIP
    >>> summary["n_users"], summary["n_items"], summary["n_interactions"]  # doctest: +SKIP
    (600, 399, 11459)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

__all__ = ["PRESETS", "SynthConfig", "generate", "k_core", "preset"]

#: Hidden width of each random feature map (per latent block).
HIDDEN = 64
#: Standard deviation of the first-layer pre-activations (tanh is clearly nonlinear at this gain).
PRE_ACTIVATION_STD = 1.5
#: Candidates drawn from the popularity distribution per item a user keeps.
CANDIDATES_PER_PICK = 4
#: Upper bound on candidates per interaction chunk (bounds the memory of step 3).
CANDIDATE_BUDGET = 1 << 17
#: Feature noise is drawn per block of this many items (keyed by block), so chunking cannot change it.
NOISE_BLOCK = 1024
#: Target size of one feature chunk's float64 work arrays.
FEATURE_CHUNK_BYTES = 64 << 20
#: Fraction of each user's interactions in valid and in test.
EVAL_FRACTION = 0.1

# Stream tags of the seed sequence (never reorder: it would change every dataset).
_T_USER, _T_SHARED, _T_SPECIFIC, _T_POPULARITY, _T_ACTIVITY, _T_DRAW, _T_WEIGHTS, _T_NOISE = range(8)

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MODALITY_RE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class SynthConfig:
    """Parameters of one synthetic dataset (sizes are *before* core filtering).

    Attributes:
        name: dataset name; the interactions go to ``<name>.inter``.
        n_users, n_items: users and items drawn before filtering (filtering removes some).
        dims: modality -> feature dimension; each modality gets ``<modality>_feat.npy``.
        rank_shared: dimension of the item latent shared by all modalities.
        rank_specific: dimension of each modality-specific item latent.
        noise: standard deviation of the Gaussian feature noise (the signal has roughly unit variance).
        pop_exponent: Zipf exponent of item popularity (0 = uniform; larger = longer tail).
        mean_interactions: mean items drawn per user before de-duplication and filtering.
        activity_sigma: log-std of the log-normal user activity (larger = longer-tailed user counts).
        affinity_scale: weight of the latent affinity against the Gumbel noise when users choose.
        candidates_per_pick: popularity-drawn candidates per kept item; more candidates let the latent
            affinity, rather than popularity, decide (stronger personal signal).
        core: k of the k-core filter (MMRec uses 5); 1 keeps every drawn interaction.
        seed: master seed.
        feature_dtype: ``float32`` or ``float16``, the dtype of the feature files (float16 halves them; its
            values are the float32 ones rounded, so the other files are the same).
    """

    name: str = "toy"
    n_users: int = 600
    n_items: int = 400
    dims: dict[str, int] = field(default_factory=lambda: {"image": 256, "text": 64})
    rank_shared: int = 16
    rank_specific: int = 8
    noise: float = 0.5
    pop_exponent: float = 0.8
    mean_interactions: float = 20.0
    activity_sigma: float = 1.0
    affinity_scale: float = 2.0
    candidates_per_pick: int = CANDIDATES_PER_PICK
    core: int = 5
    seed: int = 0
    feature_dtype: str = "float32"

    def __post_init__(self):
        self.dims = {str(m): int(d) for m, d in dict(self.dims).items()}
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"SynthConfig.name={self.name!r}: use letters, digits, '_', '.', '-' "
                             "(it becomes the file name <name>.inter)")
        for key in ("n_users", "n_items", "rank_shared", "rank_specific", "core", "candidates_per_pick"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"SynthConfig.{key}={getattr(self, key)!r}: must be >= 1")
            setattr(self, key, int(getattr(self, key)))
        if not self.dims:
            raise ValueError("SynthConfig.dims is empty: give at least one modality, e.g. {'text': 384}")
        for modality, dim in self.dims.items():
            if not _MODALITY_RE.fullmatch(modality):
                raise ValueError(f"SynthConfig.dims: modality name {modality!r} must match "
                                 "[a-z][a-z0-9_]* (it becomes <modality>_feat.npy)")
            if dim < 1:
                raise ValueError(f"SynthConfig.dims[{modality!r}]={dim}: must be >= 1")
        for key in ("noise", "pop_exponent", "activity_sigma", "affinity_scale"):
            value = float(getattr(self, key))
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"SynthConfig.{key}={getattr(self, key)!r}: must be finite and >= 0")
            setattr(self, key, value)
        self.mean_interactions = float(self.mean_interactions)
        if not self.mean_interactions >= self.core:
            raise ValueError(f"SynthConfig.mean_interactions={self.mean_interactions}: must be >= "
                             f"core={self.core} (every user draws at least `core` items)")
        if self.core > self.n_items:
            raise ValueError(f"SynthConfig.core={self.core} exceeds n_items={self.n_items}")
        self.seed = int(self.seed)
        if self.seed < 0:
            raise ValueError(f"SynthConfig.seed={self.seed}: must be >= 0")
        if self.feature_dtype not in ("float32", "float16"):
            raise ValueError(f"SynthConfig.feature_dtype={self.feature_dtype!r}: use float32 or float16")

    @property
    def modalities(self) -> list[str]:
        """Modality names in ``dims`` order."""
        return list(self.dims)

    @property
    def rank_user(self) -> int:
        """Dimension of the user latent: ``rank_shared + n_modalities * rank_specific``."""
        return self.rank_shared + len(self.dims) * self.rank_specific

    def to_dict(self) -> dict:
        """Plain-JSON form (the ``config`` entry of ``synthetic.json``)."""
        return dataclasses.asdict(self)


_MMREC_DIMS = {"image": 4096, "text": 384}

#: Named configurations. ``toy`` (tests, demo notebooks; < 1 s) and ``demo`` (< 1 s) are small.
#: The real-dataset presets have their pre-filter sizes calibrated so that after 5-core filtering users,
#: items and interactions land within a few percent of the published MMRec statistics (baby 19,445 /
#: 7,050 / 160,792; sports 35,598 / 18,357 / 296,337; clothing 39,387 / 23,033 / 278,677; tiktok
#: 9,308 / 6,710 / ~68.7K); they use a flatter popularity (``pop_exponent=0.5``) because those
#: datasets are so sparse that a steeper tail would be filtered away.
#: ``large`` is a scale test: 200,000 users x 1,000,000 items (~20M interactions), with **384-dim image
#: and 384-dim text** features (a 4096-dim image matrix for 1M items alone would be 16 GB; 8 GB with
#: ``feature_dtype="float16"``).
PRESETS: dict[str, SynthConfig] = {
    # toy and demo: choices driven by the latents more than by popularity (32 candidates per pick),
    # so a model that reads the modalities can beat a popularity ranker.
    "toy": SynthConfig(name="toy", n_users=600, n_items=400, dims={"image": 256, "text": 64},
                       mean_interactions=20.0, candidates_per_pick=32, affinity_scale=4.0),
    "demo": SynthConfig(name="demo", n_users=3000, n_items=2000, dims={"image": 512, "text": 128},
                        mean_interactions=20.0, candidates_per_pick=32, affinity_scale=4.0),
    "baby": SynthConfig(name="baby", n_users=19453, n_items=7076, dims=_MMREC_DIMS,
                        mean_interactions=8.87, pop_exponent=0.5),
    "sports": SynthConfig(name="sports", n_users=35988, n_items=19112, dims=_MMREC_DIMS,
                          mean_interactions=8.99, pop_exponent=0.5),
    "clothing": SynthConfig(name="clothing", n_users=42316, n_items=26886, dims=_MMREC_DIMS,
                            mean_interactions=7.7, pop_exponent=0.5),
    "tiktok": SynthConfig(name="tiktok", n_users=10911, n_items=9317,
                          dims={"image": 128, "text": 768, "audio": 128}, mean_interactions=8.16,
                          pop_exponent=0.5),
    "large": SynthConfig(name="large", n_users=200_000, n_items=1_000_000,
                         dims={"image": 384, "text": 384}, mean_interactions=100.0, pop_exponent=0.5),
}


def preset(name: str, **overrides) -> SynthConfig:
    """A copy of ``PRESETS[name]`` with ``overrides`` applied (e.g. ``preset("baby", seed=3)``).

    Raises:
        ValueError: unknown preset or unknown field; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown synthetic preset {name!r}; known presets: {', '.join(PRESETS)}")
    fields = [f.name for f in dataclasses.fields(SynthConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown SynthConfig field(s) {', '.join(unknown)}; fields: {', '.join(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------------------------------
# Random streams


def _modality_key(modality: str) -> int:
    # Keyed by name (not position), so adding a modality leaves the others' weights and noise unchanged.
    return zlib.crc32(modality.encode("utf-8"))


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ----------------------------------------------------------------------------------------------------
# Interactions


def _latents(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """User ``[n_users, r_user]``, item shared ``[n_items, r_s]``, item specific ``{m: [n_items, r_z]}``."""
    users = _rng(cfg.seed, _T_USER).standard_normal((cfg.n_users, cfg.rank_user), dtype=np.float32)
    shared = _rng(cfg.seed, _T_SHARED).standard_normal((cfg.n_items, cfg.rank_shared), dtype=np.float32)
    specific = {
        m: _rng(cfg.seed, _T_SPECIFIC, _modality_key(m)).standard_normal(
            (cfg.n_items, cfg.rank_specific), dtype=np.float32)
        for m in cfg.modalities
    }
    return users, shared, specific


def _item_of_rank(cfg: SynthConfig) -> np.ndarray:
    """int32 ``[n_items]``: the item at each popularity rank (a random ranking)."""
    return _rng(cfg.seed, _T_POPULARITY).permutation(cfg.n_items).astype(np.int32)


def _draw_ranks(u: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """int64 popularity ranks in ``[0, n)`` for uniforms ``u``: ``P(j) ∝ ∫_{j+1}^{j+2} x^-alpha dx``.

    The continuous power law on ``[1, n + 1)`` sampled by inverting its CDF (no ``[n]`` table to
    search), then floored: a Zipf law with exponent ``alpha`` apart from the first few ranks.
    """
    if alpha == 1.0:
        x = np.exp(u * math.log(n + 1.0))
    else:
        a = 1.0 - alpha
        x = (1.0 + u * ((n + 1.0) ** a - 1.0)) ** (1.0 / a)
    return np.clip(x.astype(np.int64) - 1, 0, n - 1)


def _activity(cfg: SynthConfig) -> np.ndarray:
    """int64 ``[n_users]`` items each user draws: ``core`` plus a log-normal long tail."""
    sigma = cfg.activity_sigma
    x = np.exp(sigma * _rng(cfg.seed, _T_ACTIVITY).standard_normal(cfg.n_users) - 0.5 * sigma**2)
    k = cfg.core + np.floor((cfg.mean_interactions - cfg.core) * x).astype(np.int64)
    return np.minimum(k, max(cfg.core, cfg.n_items // 4))


def _descending_bits(score: np.ndarray) -> np.ndarray:
    """int64 keys in ``[0, 2^32)`` that sort like ``-score`` (float32 order-preserving bit trick)."""
    bits = score.astype(np.float32).view(np.uint32).astype(np.int64)
    ascending = np.where(bits >= 1 << 31, (1 << 32) - 1 - bits, bits + (1 << 31))
    return (1 << 32) - 1 - ascending


def _draw_interactions(cfg, users, items_full, item_of_rank, k, progress):
    """Steps 2-3: ``(user, item)`` int32 arrays, grouped by user (ascending), random order within a user.

    ``users`` is ``[n_users, r_user]``, ``items_full`` ``[n_items, r_user]`` (the concatenated item
    latents), ``k`` ``[n_users]`` the items each user keeps.
    """
    candidates = k * cfg.candidates_per_pick
    chunk_of_user = (np.cumsum(candidates) - candidates) // CANDIDATE_BUDGET
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(chunk_of_user)) + 1, [cfg.n_users]])
    scale = cfg.affinity_scale / math.sqrt(cfg.rank_user)
    out_users = np.empty(int(k.sum()), dtype=np.int32)  # upper bound; filled in user order
    out_items = np.empty_like(out_users)
    n_out = 0
    for chunk, (lo, hi) in enumerate(tqdm(list(zip(bounds[:-1], bounds[1:])), desc="interactions",
                                          unit="chunk", disable=None if progress else True)):
        rng = _rng(cfg.seed, _T_DRAW, chunk)
        owner = np.repeat(np.arange(hi - lo, dtype=np.int64), candidates[lo:hi])
        drawn = np.take(item_of_rank, _draw_ranks(rng.random(owner.size), cfg.n_items, cfg.pop_exponent))
        pair = np.sort(owner * cfg.n_items + drawn)
        pair = pair[np.concatenate([[True], pair[1:] != pair[:-1]])]  # drop repeated candidates
        owner, item = np.divmod(pair, cfg.n_items)
        affinity = np.einsum("ij,ij->i", np.take(users[lo:hi], owner, axis=0),
                             np.take(items_full, item, axis=0))
        score = scale * affinity + rng.gumbel(size=pair.size)
        order = np.argsort((owner << 32) | _descending_bits(score), kind="stable")  # per user, best first
        owner, item = owner[order], item[order]
        start = np.searchsorted(owner, np.arange(hi - lo))
        keep = np.arange(owner.size) - start[owner] < k[lo + owner]  # Gumbel top-k per user
        owner, item = owner[keep], item[keep]
        # Shuffle each user's items: the order they were "drawn" (their timestamps).
        order = np.argsort((owner << 32) | rng.integers(0, 1 << 32, owner.size), kind="stable")
        out_users[n_out:n_out + owner.size] = owner[order] + lo
        out_items[n_out:n_out + owner.size] = item[order]
        n_out += owner.size
    return out_users[:n_out], out_items[:n_out]


def k_core(users: np.ndarray, items: np.ndarray, core: int) -> np.ndarray:
    """Which interactions survive ``core``-core filtering.

    Repeatedly drops interactions whose user or item has fewer than ``core`` interactions until none
    does. Vectorised: one ``bincount`` per side per round; memory is the mask plus one gather.

    Args:
        users, items: int ``[n]`` ids (non-negative).
        core: minimum interactions per user and per item.

    Returns:
        bool ``[n]`` mask of the kept interactions.
    """
    users, items = np.asarray(users), np.asarray(items)
    keep = np.ones(users.size, dtype=bool)
    n_kept = users.size
    while n_kept:
        user_degree = np.bincount(users[keep]).astype(np.int32)
        item_degree = np.bincount(items[keep]).astype(np.int32)
        keep[keep] = (user_degree[users[keep]] >= core) & (item_degree[items[keep]] >= core)
        if np.count_nonzero(keep) == n_kept:
            break
        n_kept = np.count_nonzero(keep)
    return keep


def _reindex(ids: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(new_ids, kept_old_ids)``: contiguous int32 ids, in the order of the old ids."""
    present = np.bincount(ids, minlength=n) > 0
    new_of_old = (np.cumsum(present) - 1).astype(np.int32)
    return new_of_old[ids], np.flatnonzero(present)


def _split_labels(users: np.ndarray) -> np.ndarray:
    """int8 ``[n]`` x_label for rows grouped by user in draw order: train, then valid, then test.

    A user with ``n`` rows gets ``round(0.1 n)`` valid and as many test rows (half rounds up), the
    rest train; that leaves at least one train row for every ``n >= 1``.
    """
    count = np.bincount(users)
    n_eval = np.floor(EVAL_FRACTION * count + 0.5).astype(np.int64)
    start = np.cumsum(count) - count
    valid_from = (start + count - 2 * n_eval).astype(np.int32)
    test_from = (start + count - n_eval).astype(np.int32)
    row = np.arange(users.size, dtype=np.int32)
    labels = (row >= valid_from[users]).view(np.int8)
    labels += (row >= test_from[users]).view(np.int8)
    return labels


# ----------------------------------------------------------------------------------------------------
# Features


class _FeatureMap:
    """Modality ``m``'s fixed random map (step 6): latents ``[n, r_s]``, ``[n, r_z]`` -> ``[n, d_m]``."""

    def __init__(self, cfg: SynthConfig, modality: str):
        self.seed, self.key, self.noise = cfg.seed, _modality_key(modality), cfg.noise
        self.dim = cfg.dims[modality]
        rng = _rng(cfg.seed, _T_WEIGHTS, self.key)
        gain = PRE_ACTIVATION_STD
        self.w_shared = rng.standard_normal((cfg.rank_shared, HIDDEN)) * (gain / math.sqrt(cfg.rank_shared))
        self.w_specific = rng.standard_normal((cfg.rank_specific, HIDDEN)) * (
            gain / math.sqrt(cfg.rank_specific))
        self.b_shared = rng.standard_normal(HIDDEN) * 0.5
        self.b_specific = rng.standard_normal(HIDDEN) * 0.5
        # Unit-variance output: each of the 2*HIDDEN units contributes E[tanh^2] ~ `second_moment`.
        nodes, weights = np.polynomial.hermite_e.hermegauss(64)  # E[f(g)], g ~ N(0, 1)
        second_moment = float(weights @ np.tanh(gain * nodes) ** 2 / math.sqrt(2 * math.pi))
        self.w_out = rng.standard_normal((2 * HIDDEN, self.dim)) / math.sqrt(2 * HIDDEN * second_moment)

    def signal(self, shared: np.ndarray, specific: np.ndarray) -> np.ndarray:
        """float32 ``[n, d]`` noise-free features.

        Computed in float64 and rounded once, so BLAS summing in a different order for a different ``n``
        does not (in practice) change a float32 row: the files do not depend on the chunk size.
        """
        hidden = np.concatenate([
            np.tanh(shared.astype(np.float64) @ self.w_shared + self.b_shared),
            np.tanh(specific.astype(np.float64) @ self.w_specific + self.b_specific),
        ], axis=1)
        return (hidden @ self.w_out).astype(np.float32)

    def standard_noise(self, out: np.ndarray, lo: int) -> None:
        """Fill float32 ``out`` ``[n, d]`` with the N(0, 1) noise of items ``lo..lo+n-1``.

        Noise is drawn per block of NOISE_BLOCK items from a stream keyed by the block, so a row's noise
        does not depend on how the items are chunked.
        """
        hi = lo + len(out)
        for block in range(lo // NOISE_BLOCK, (hi - 1) // NOISE_BLOCK + 1):
            rng = _rng(self.seed, _T_NOISE, self.key, block)
            first, last = block * NOISE_BLOCK, (block + 1) * NOISE_BLOCK
            if lo <= first and last <= hi:  # whole block inside the chunk: draw in place
                rng.standard_normal(dtype=np.float32, out=out[first - lo:last - lo])
            else:
                rows = rng.standard_normal((NOISE_BLOCK, self.dim), dtype=np.float32)
                a, b = max(lo, first), min(hi, last)
                out[a - lo:b - lo] = rows[a - first:b - first]

    def rows(self, shared: np.ndarray, specific: np.ndarray, lo: int) -> np.ndarray:
        """float32 ``[n, d]`` features of items ``lo..lo+n-1`` (latents given for those rows)."""
        out = np.empty((len(shared), self.dim), dtype=np.float32)
        self.standard_noise(out, lo)
        out *= np.float32(self.noise)
        out += self.signal(shared, specific)
        return out


_FLOAT32 = np.dtype(np.float32)


def _default_chunk(dim: int) -> int:
    rows = FEATURE_CHUNK_BYTES // (8 * (dim + 2 * HIDDEN))
    return max(NOISE_BLOCK, rows // NOISE_BLOCK * NOISE_BLOCK)


def _write_features(path, fmap, shared, specific, chunk_items, progress, desc, dtype=_FLOAT32):
    """Stream ``[n_items, d]`` features to ``path`` (``.npy``, ``dtype``), one chunk mapped at a time.

    Rows are computed as float32 and rounded to ``dtype`` (float16) as they are written.
    """
    n = len(shared)
    header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, fmap.dim))
    offset = header.offset
    del header  # only the header and the file size; chunks are mapped one by one below
    chunk = chunk_items or _default_chunk(fmap.dim)
    row_bytes = dtype.itemsize * fmap.dim
    for lo in tqdm(range(0, n, chunk), desc=desc, unit="chunk", disable=None if progress else True):
        hi = min(n, lo + chunk)
        block = fmap.rows(shared[lo:hi], specific[lo:hi], lo)
        if dtype != np.float32:
            with np.errstate(over="ignore"):
                block = block.astype(dtype)
            if not np.isfinite(block).all():
                raise ValueError(f"{desc} overflow {dtype} (noise={fmap.noise}); use feature_dtype float32")
        out = np.memmap(path, dtype=dtype, mode="r+", offset=offset + lo * row_bytes,
                        shape=(hi - lo, fmap.dim))
        out[:] = block
        out.flush()
        del out


# ----------------------------------------------------------------------------------------------------
# Files


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-reproducible (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(value), allow_pickle=False)


_POWERS_OF_TEN = 10 ** np.arange(1, 19, dtype=np.int64)


def _tsv_lines(columns: list[np.ndarray]) -> bytes:
    """Non-negative integer columns (each ``[n]``) as tab-separated ``\\n``-terminated ASCII lines."""
    values = [np.asarray(c, dtype=np.int64) for c in columns]
    widths = [np.searchsorted(_POWERS_OF_TEN, v, side="right") + 1 for v in values]
    line_length = sum(widths) + len(values)  # digits, then a tab or the final newline per column
    line_end = np.cumsum(line_length)
    text = np.empty(int(line_end[-1]) if line_end.size else 0, dtype=np.uint8)
    cursor = line_end - line_length
    for number, (value, width) in enumerate(zip(values, widths)):
        last_digit = cursor + width - 1
        for place in range(int(width.max(initial=1))):  # digits right to left
            has = width > place
            text[last_digit[has] - place] = ord("0") + value[has] // 10**place % 10
        cursor = cursor + width
        text[cursor] = ord("\n") if number == len(values) - 1 else ord("\t")
        cursor += 1
    return text.tobytes()


def _write_inter(path: str, users, items, labels, rows_per_write: int = 1 << 20) -> None:
    with open(path, "wb") as handle:
        handle.write(b"userID\titemID\tx_label\n")
        for lo in range(0, users.size, rows_per_write):
            part = slice(lo, lo + rows_per_write)
            handle.write(_tsv_lines([users[part], items[part], labels[part]]))


def _check_target(out_dir: str) -> None:
    """Refuse an ``out_dir`` that exists and is neither an empty folder nor a synthetic dataset."""
    if not os.path.lexists(out_dir):
        return
    if os.path.isdir(out_dir) and (not os.listdir(out_dir)
                                   or os.path.isfile(os.path.join(out_dir, "synthetic.json"))):
        return
    raise FileExistsError(f"{out_dir}: exists and is not an empty folder or a synthetic dataset (no "
                          "synthetic.json); fix: choose a new folder or remove this one")


def _install(tmp_dir: str, out_dir: str) -> None:
    """Rename the finished ``tmp_dir`` to ``out_dir``, replacing an empty folder or a synthetic dataset."""
    _check_target(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(tmp_dir, out_dir)
    elif not os.listdir(out_dir):
        os.rmdir(out_dir)
        os.rename(tmp_dir, out_dir)
    else:  # an earlier synthetic dataset: move it aside, move the new one in, then delete the old one
        trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(trash, "dataset"))
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(trash, ignore_errors=True)


def generate(out_dir: str | os.PathLike, config: SynthConfig, *, progress: bool = True,
             chunk_items: int | None = None) -> dict:
    """Generate ``config``'s dataset into ``out_dir`` (see the module docstring for the model and files).

    ``out_dir`` must not exist, be empty, or hold an earlier synthetic dataset (which is replaced).
    Peak memory is the latents (``n x r`` float32), a few bytes per drawn interaction (int32 ids, masks)
    and one feature chunk: 1,000,000 items x 384 dims with 20M interactions peaks near 0.7 GB.

    Args:
        out_dir: dataset folder to create.
        config: the dataset's parameters.
        progress: show tqdm bars (they switch themselves off when stderr is not a terminal).
        chunk_items: items per feature chunk (default: about 64 MB of work arrays); the files do not
            depend on it.

    Returns:
        ``{"name", "n_users", "n_items", "n_interactions", "n_train", "n_valid", "n_test", "seconds",
        "paths": {"inter", "latents", "config", "features": {modality: path}}}``; counts are after
        filtering, ``seconds`` is the wall time.
    """
    cfg = config
    if chunk_items is not None and int(chunk_items) < 1:
        raise ValueError(f"chunk_items={chunk_items!r}: must be >= 1")
    start_time = time.perf_counter()
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _check_target(out_dir)

    users_latent, shared, specific = _latents(cfg)
    # Specific blocks in modality-name order, so the dataset does not depend on the order of ``dims``.
    items_full = np.concatenate([shared, *(specific[m] for m in sorted(specific))], axis=1)
    users, items = _draw_interactions(cfg, users_latent, items_full, _item_of_rank(cfg), _activity(cfg),
                                      progress)
    del items_full
    n_drawn = int(users.size)
    kept = k_core(users, items, cfg.core)
    if not kept.any():
        raise ValueError(f"{cfg.core}-core filtering removed every interaction of {cfg.name!r}; "
                         "fix: raise mean_interactions or n_users, or lower core / pop_exponent")
    users, user_ids = _reindex(users[kept], cfg.n_users)
    items, item_ids = _reindex(items[kept], cfg.n_items)
    del kept
    labels = _split_labels(users)

    summary = {"name": cfg.name, "n_users": int(user_ids.size), "n_items": int(item_ids.size),
               "n_interactions": int(users.size),
               **{f"n_{split}": int(np.count_nonzero(labels == code))
                  for code, split in enumerate(("train", "valid", "test"))}}
    names = {"inter": f"{cfg.name}.inter", "latents": "latents.npz", "config": "synthetic.json",
             "features": {m: f"{m}_feat.npy" for m in cfg.modalities}}

    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the dataset is an ordinary folder
        _write_inter(os.path.join(tmp_dir, names["inter"]), users, items, labels)
        del users, items, labels
        shared = shared[item_ids]
        specific = {m: z[item_ids] for m, z in specific.items()}
        _write_npz(os.path.join(tmp_dir, names["latents"]), {
            "user": users_latent[user_ids], "item_shared": shared,
            **{f"item_specific_{m}": specific[m] for m in sorted(specific)}})
        del users_latent
        for m in cfg.modalities:
            _write_features(os.path.join(tmp_dir, names["features"][m]), _FeatureMap(cfg, m), shared,
                            specific[m], chunk_items, progress, desc=f"{m} features",
                            dtype=np.dtype(cfg.feature_dtype))
        document = {
            "generator": "dgmrec_dgl.data.synthetic",
            "format_version": 1,
            "config": cfg.to_dict(),
            "constants": {"hidden": HIDDEN, "pre_activation_std": PRE_ACTIVATION_STD,
                          "candidate_budget": CANDIDATE_BUDGET,
                          "noise_block": NOISE_BLOCK, "eval_fraction": EVAL_FRACTION},
            "counts": {"drawn": {"n_users": cfg.n_users, "n_items": cfg.n_items, "n_interactions": n_drawn},
                       "kept": {k: v for k, v in summary.items() if k != "name"}},
            "files": names,
        }
        with open(os.path.join(tmp_dir, names["config"]), "w", newline="\n") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
        _install(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - start_time
    summary["paths"] = {key: os.path.join(out_dir, names[key]) for key in ("inter", "latents", "config")}
    summary["paths"]["features"] = {m: os.path.join(out_dir, name) for m, name in names["features"].items()}
    return summary
