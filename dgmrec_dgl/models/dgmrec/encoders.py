"""General and specific modality encoders (DGMRec Eq. 1).

.. math::
    E^g_m = \\sigma\\big(f^g(\\tanh(h_m(X_m)))\\big), \\qquad E^s_m = \\sigma\\big(f^s_m(X_m)\\big)

``h_m: R^{d_m} → R^d`` projects each modality to a common width, ``f^g: R^d → R^d`` is shared by all
modalities (it extracts what they have in common), ``f^s_m: R^{d_m} → R^d`` is per modality. Each is one
Linear layer with Xavier initialisation; σ is the sigmoid, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import nn


def xavier_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class GeneralEncoder(nn.Module):
    """General features of every modality through one shared layer.

    Args:
        dims: modality → raw feature width ``d_m``.
        d: embedding width.
    """

    def __init__(self, dims: dict[str, int], d: int):
        super().__init__()
        self.project = nn.ModuleDict({m: xavier_linear(dm, d) for m, dm in dims.items()})  # h_m
        self.shared = xavier_linear(d, d)                                                   # f^g

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, d_m] → general features [n, d]."""
        return torch.sigmoid(self.shared(torch.tanh(self.project[modality](x))))


class SpecificEncoder(nn.Module):
    """Specific features of one modality (its own layer ``f^s_m``)."""

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.encode = xavier_linear(d_in, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, d_m] → specific features [n, d]."""
        return torch.sigmoid(self.encode(x))
