r"""Optional linear reduction of very wide feature matrices: PCA by a randomized SVD of a row sample.

Off by default (``DataConfig.reduce_dims: null``). It exists for catalogs where a raw modality does not fit
in memory as float32 (1,000,000 items × 4096 dims is 16 GB, 8 GB as float16 on disk); projected to 256
dims the same matrix is 1 GB.

Maths. Let :math:`X \in R^{n \times d}` be one modality's feature matrix and :math:`P` the items that
have the modality. The fit uses :math:`A = X_S`, the rows of a uniform sample :math:`S \subseteq P` of
:math:`s = \min(\text{sample}, |P|)` items drawn without replacement with ``seed``; its mean is
:math:`\mu = \frac1s A^\top 1` and its centred form :math:`A_c = A - 1 \mu^\top`.

1. Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4): with
   :math:`\ell = \min(k + p, s, d)` (``p`` = ``oversample``, 10) and a Gaussian
   :math:`\Omega \in R^{d \times \ell}` (same ``seed``),

   .. math:: Q \leftarrow \mathrm{qr}(A_c \Omega); \quad
             \text{repeat } q \text{ times: } Q \leftarrow \mathrm{qr}(A_c\, \mathrm{qr}(A_c^\top Q))

   (``q`` = ``power_iters``, 2; re-orthonormalising keeps the small singular directions from being
   rounded away in float32). Then :math:`B = Q^\top A_c \in R^{\ell \times d}`, an exact SVD
   :math:`B = \hat U \Sigma V^\top` (float64), and :math:`V_k`, the first :math:`k` columns of
   :math:`V`, approximate the top-:math:`k` principal axes of the sample. When :math:`s` or :math:`d`
   is no larger than :math:`\ell` the SVD of :math:`A_c` is computed exactly instead.
2. The mean direction is kept: with :math:`k = d_{out} - 1` and the residual
   :math:`r = \mu - V_k V_k^\top \mu`, the basis is :math:`W = [V_k,\ r / \lVert r\rVert]`
   (:math:`W = V_{d_{out}}` when :math:`\mu` already lies in :math:`\mathrm{span}(V_k)`). :math:`W` has
   orthonormal columns and :math:`\mathrm{span}(W) \ni \mu`.
3. The reduced features are the *linear* map :math:`Z = X W \in R^{n \times d_{out}}` (no centring),
   applied block by block to every row (present or not). Consequences:

   * :math:`W W^\top x = x` for every :math:`x \in \mu + \mathrm{span}(V_k)`, so inner products and
     cosines between rows (what the kNN graphs use, on features that are usually far from centred) are
     kept up to the part of :math:`x - \mu` outside :math:`\mathrm{span}(V_k)`;
   * the map is linear, so it commutes with every imputation: projecting the mean / the zero row / the
     neighbour mean of the raw rows equals taking them in the reduced space. Reducing before or after
     ``Dataset.with_mask`` gives the same features (up to float rounding);
   * rows are independent and each block is multiplied in float64 then rounded once, so the result does
     not depend on the block size.

Recorded per modality (:meth:`PCA.info`, kept in ``Dataset.reduction``): ``d_in``, ``d_out``,
``explained_variance`` :math:`= \lVert A_c W\rVert_F^2 / \lVert A_c\rVert_F^2`, the share of the
sample's variance inside :math:`\mathrm{span}(W)` (exact for the computed :math:`W`, estimated on the
sample), ``fit_rows`` :math:`s`, ``seed``.

Memory: the sample as float32 (:math:`s \times d \times 4` bytes: 50,000 × 4096 → 0.8 GB), :math:`Q`
(:math:`s \times \ell`), the output :math:`n \times d_{out}` and one input block. Time is dominated by the
:math:`2(q + 1) + 2` products with :math:`A_c` and the projection :math:`XW`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .io import chunk_rows_for, iter_row_blocks, take_rows

__all__ = ["PCA", "fit_pca", "sample_rows"]

#: Extra random directions of the range finder (``p``).
OVERSAMPLE = 10
#: Power iterations of the range finder (``q``).
POWER_ITERS = 2


@dataclass(frozen=True)
class PCA:
    """A fitted reduction ``x ↦ x @ components`` (see the module docstring).

    Attributes:
        components: float32 ``[d_in, d_out]``, orthonormal columns ``W``.
        mean: float64 ``[d_in]``, the mean ``μ`` of the fit sample (inside ``span(W)``).
        explained_variance: share of the sample's variance inside ``span(W)``, in [0, 1].
        fit_rows: rows the fit used.
        seed: the seed of the sample and of the range finder.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance: float
    fit_rows: int
    seed: int

    @property
    def d_in(self) -> int:
        return int(self.components.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.components.shape[1])

    def transform(self, x: np.ndarray, *, dtype=np.float32, chunk_rows: int | None = None) -> np.ndarray:
        """``x @ components`` as a new ``dtype`` array ``[n, d_out]``, computed block by block.

        ``x`` may be a memory map in any float dtype. Each block is multiplied in float64 and rounded once
        into the output, so the result does not depend on the block size (bit for bit) and the extra
        memory is one float64 block; float64 costs about 2.4x the time of a float32 product.

        Raises:
            ValueError: wrong width, or a projected value that overflows ``dtype`` (float16).
        """
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected [n, {self.d_in}] features, got shape {x.shape}")
        out = np.empty((x.shape[0], self.d_out), dtype=dtype)
        rows = chunk_rows or chunk_rows_for(self.d_in, 8)
        weights = self.components.astype(np.float64)
        for start, block in iter_row_blocks(x, rows):
            with np.errstate(over="ignore"):
                out[start:start + len(block)] = np.asarray(block, dtype=np.float64) @ weights
        if out.dtype != np.float32 and not np.isfinite(out).all():
            raise ValueError(f"projected features overflow {out.dtype}; use feature_dtype float32")
        return out

    def info(self) -> dict:
        """What was done, as plain JSON/YAML values."""
        return {"d_in": self.d_in, "d_out": self.d_out, "explained_variance": round(self.explained_variance, 6),
                "fit_rows": self.fit_rows, "seed": self.seed}


def sample_rows(present: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted int64 ids of ``min(size, present.sum())`` items drawn uniformly from those where ``present``."""
    candidates = np.flatnonzero(present)
    if candidates.size <= size:
        return candidates.astype(np.int64)
    return np.sort(rng.choice(candidates, size=size, replace=False)).astype(np.int64)


def _orthonormal(a: np.ndarray) -> np.ndarray:
    """Q of the economic QR of a tall matrix, in its dtype (scipy's LAPACK call: ~10x numpy's for float32)."""
    return scipy.linalg.qr(a, mode="economic", overwrite_a=True, check_finite=False)[0]


def _principal_axes(a: np.ndarray, k: int, rng: np.random.Generator, oversample: int,
                    power_iters: int) -> np.ndarray:
    """float64 ``[d, k]``: the top-``k`` right singular vectors of the centred float32 sample ``a``."""
    s, d = a.shape
    width = min(k + oversample, s, d)
    if width >= min(s, d):  # the sketch would be as large as the matrix: exact SVD
        return np.linalg.svd(a.astype(np.float64), full_matrices=False)[2][:k].T
    q = _orthonormal(a @ rng.standard_normal((d, width), dtype=np.float32))
    for _ in range(power_iters):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    b = (q.T @ a).astype(np.float64)
    return np.linalg.svd(b, full_matrices=False)[2][:k].T


def fit_pca(x: np.ndarray, d_out: int, *, present: np.ndarray | None = None, sample: int = 50_000,
            seed: int = 0, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS) -> PCA:
    """Fit the reduction of ``x`` ``[n, d_in]`` to ``d_out`` dims on a sample of the rows where ``present``.

    Args:
        x: the features (a memory map is read only at the sampled rows).
        d_out: output width, ``1 <= d_out < d_in`` and at most the number of fit rows.
        present: bool ``[n]``, rows that may be sampled (the items having the modality); None = all.
        sample: rows used for the fit (all eligible rows when fewer).
        seed: seeds the sample and the range finder; the fit is deterministic for a seed (and a BLAS
            thread count).
        oversample, power_iters: ``p`` and ``q`` of the range finder.

    Raises:
        ValueError: ``d_out`` out of range, or no eligible row.
    """
    n, d_in = x.shape
    present = np.ones(n, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    if not 1 <= d_out < d_in:
        raise ValueError(f"d_out must be in [1, {d_in}) for {d_in}-dim features, got {d_out}")
    if sample < 1:
        raise ValueError(f"sample must be >= 1, got {sample}")
    rng = np.random.default_rng(seed)
    ids = sample_rows(present, sample, rng)
    if ids.size < d_out:
        raise ValueError(f"the fit has {ids.size} rows, fewer than d_out={d_out}; lower the output width")
    a = take_rows(x, ids, np.float32)            # the sample, centred in place below
    step = chunk_rows_for(d_in, 8)                # float64 work blocks
    mean = np.zeros(d_in, dtype=np.float64)
    for start in range(0, ids.size, step):
        mean += a[start:start + step].sum(axis=0, dtype=np.float64)
    mean /= ids.size
    a -= mean.astype(np.float32)
    total = sum(float(np.square(a[start:start + step], dtype=np.float64).sum())
                for start in range(0, ids.size, step))

    axes = _principal_axes(a, d_out, rng, oversample, power_iters)
    keep = axes[:, :d_out - 1]
    residual = mean - keep @ (keep.T @ mean)
    norm = float(np.linalg.norm(residual))
    if norm > 1e-6 * max(float(np.linalg.norm(mean)), 1e-30):
        basis = np.concatenate([keep, (residual / norm)[:, None]], axis=1)
    else:
        basis = axes[:, :d_out]
    components = np.ascontiguousarray(basis, dtype=np.float32)
    captured = 0.0
    for start in range(0, ids.size, step):
        captured += float(np.square(a[start:start + step] @ components, dtype=np.float64).sum())
    explained = captured / total if total > 0 else 1.0
    return PCA(components=components, mean=mean, explained_variance=float(min(explained, 1.0)),
               fit_rows=int(ids.size), seed=int(seed))
