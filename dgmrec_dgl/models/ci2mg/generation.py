r"""Task-guided modality generation and its reconstruction loss (CI2MG Eq. 11–12).

.. math::
    Z^m = \sigma\big(\mathrm{BN}([Q^m, \hat Q^m] W + b)\big) \quad (\text{Eq. 11}), \qquad
    \mathcal L_{rec} = \sum_m \mathrm{MSE}\big(Z^m_i, P^m_i\big),\ i \text{ observed in } m \quad (\text{Eq. 12})

``W`` is a Linear 2d → d (Xavier init), BN a batch normalisation over the items. The
reconstruction target ``P^m`` is the *projected* raw feature (the release's ``Linear d_m → d`` of the frozen
raw features, not detached, so the projection is trained by it too), on the mini-batch's distinct positive
items that have modality m. σ is the identity in the release (``activation="none"``) and the paper's
nonlinearity with ``activation="sigmoid"``.

The release keeps one BatchNorm shared by all modalities (``shared_norm=True``): its affine weights are
trained by every modality and its running statistics, which scoring uses, mix the modalities (each
training forward updates them once per modality, in modality order). ``shared_norm=False`` gives every
modality its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("none", "sigmoid")


class TaskGuidedGenerator(nn.Module):
    """Eq. 11 for one modality: ``[Q, Q̂]`` [I, 2d] → Z [I, d].

    ``norm``: a BatchNorm1d(d) to use (one shared by several generators, as the release); None: its own.
    """

    def __init__(self, d: int, activation: str = "none", norm: nn.BatchNorm1d | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.linear = nn.Linear(2 * d, d)
        nn.init.xavier_uniform_(self.linear.weight)
        self.norm = nn.BatchNorm1d(d) if norm is None else norm
        self.activation = activation

    def forward(self, q: torch.Tensor, q_hat: torch.Tensor) -> torch.Tensor:
        z = self.norm(self.linear(torch.cat([q, q_hat], dim=1)))
        return torch.sigmoid(z) if self.activation == "sigmoid" else z


def reconstruction_loss(z: torch.Tensor, target: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Eq. 12 for one modality: MSE of ``z[items]`` and ``target[items]`` ([I, d] each); 0 if no item."""
    if len(items) == 0:
        return z.new_zeros(())
    return F.mse_loss(z[items], target[items])
