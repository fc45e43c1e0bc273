"""CLUB upper bound of the mutual information between general and specific features (DGMRec Eq. 7).

A variational network q_φ(g | s) = N(μ(s), diag(exp(lv(s)))) with μ and lv two-layer MLPs (d → 32 → d,
ReLU; lv ends in tanh). The bound on a batch of rows r, with π a random permutation of the rows, is

.. math::
    \\hat I = \\frac{1}{2B}\\sum_r \\Big[ \\sum_k -\\frac{(μ_{rk} - g_{rk})^2}{e^{lv_{rk}}}
              + \\sum_k \\frac{(μ_{rk} - g_{π(r)k})^2}{e^{lv_{rk}}} \\Big]

It is minimised by the encoders (in the main loss the estimator is only evaluated); the estimator itself is
trained separately to maximise the log-likelihood Σ −(μ − g)²/e^{lv} − lv (:meth:`CLUBEstimator.log_likelihood`).
"""

from __future__ import annotations

import torch
from torch import nn


class CLUBEstimator(nn.Module):
    """q_φ(g | s) for one modality."""

    def __init__(self, d: int, hidden: int = 32):
        super().__init__()
        self.mu = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))
        self.logvar = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Tanh())

    def forward(self, specific: torch.Tensor, general: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """The bound (a scalar) for rows ``specific`` [B, d] and ``general`` [B, d]."""
        mu, logvar = self.mu(specific), self.logvar(specific)
        inv_var = torch.exp(-logvar)
        perm = torch.randperm(len(general), generator=generator, device=general.device)
        positive = -((mu - general) ** 2 * inv_var).sum(dim=1)
        negative = -((mu - general[perm]) ** 2 * inv_var).sum(dim=1)
        return (positive - negative).mean() / 2.0

    def log_likelihood(self, specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        """Mean Gaussian log-likelihood (up to constants) of ``general`` given ``specific``."""
        mu, logvar = self.mu(specific), self.logvar(specific)
        return (-((mu - general) ** 2) * torch.exp(-logvar) - logvar).sum(dim=1).mean()
