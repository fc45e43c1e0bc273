"""General and specific modality encoders (DGMRec Eq. 1).

.. math::
    E^g_m = \\sigma\\big(f^g(\\tanh(h_m(X_m)))\\big), \\qquad E^s_m = \\sigma\\big(f^s_m(X_m)\\big)

``h_m: R^{d_m} → R^d`` projects each modality to a common width, ``f^g: R^d → R^d`` is shared by all
modalities (it extracts what they have in common), ``f^s_m: R^{d_m} → R^d`` is per modality. Each is one
Linear layer with Xavier-initialised weights; σ is the sigmoid, as in the reference implementation. Biases
start at zero, or (``bias_init="uniform"``, the release) at PyTorch's default U(−1/√d_in, 1/√d_in).

:func:`encode` computes both features of a modality with h_m and f^s_m as one product (see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


#: initial biases of DGMRec's Linear layers (DGMRecConfig.linear_bias_init)
BIAS_INITS = ("zero", "uniform")


def xavier_linear(d_in: int, d_out: int, bias: bool = True, bias_init: str = "zero") -> nn.Linear:
    """A Linear layer with Xavier-uniform weights and zero biases, or with ``bias_init="uniform"`` the biases
    ``nn.Linear`` draws (U(−1/√d_in, 1/√d_in), the release's). The random draws are the same either way."""
    if bias_init not in BIAS_INITS:
        raise ValueError(f"bias_init must be one of {BIAS_INITS}, got {bias_init!r}")
    layer = nn.Linear(d_in, d_out, bias=bias)
    nn.init.xavier_uniform_(layer.weight)
    if bias and bias_init == "zero":
        nn.init.zeros_(layer.bias)
    return layer


class GeneralEncoder(nn.Module):
    """General features of every modality through one shared layer.

    Args:
        dims: modality → raw feature width ``d_m``.
        d: embedding width.
        bias_init: ``zero`` or ``uniform`` (:func:`xavier_linear`).
    """

    def __init__(self, dims: dict[str, int], d: int, bias_init: str = "zero"):
        super().__init__()
        self.project = nn.ModuleDict({m: xavier_linear(dm, d, bias_init=bias_init) for m, dm in dims.items()})  # h_m
        self.shared = xavier_linear(d, d, bias_init=bias_init)                                               # f^g

    def forward(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, d_m] → general features [n, d]."""
        return self.from_projection(self.project[modality](x))

    def from_projection(self, hx: torch.Tensor) -> torch.Tensor:
        """``h_m(x)`` [n, d] → general features [n, d]."""
        return torch.sigmoid(self.shared(torch.tanh(hx)))


class SpecificEncoder(nn.Module):
    """Specific features of one modality (its own layer ``f^s_m``)."""

    def __init__(self, d_in: int, d: int, bias_init: str = "zero"):
        super().__init__()
        self.encode = xavier_linear(d_in, d, bias_init=bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, d_m] → specific features [n, d]."""
        return torch.sigmoid(self.encode(x))


def encode(general: GeneralEncoder, specific: SpecificEncoder, modality: str,
           x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 for one modality: ``(E^g_m, E^s_m)`` of ``x`` [n, d_m], each [n, d].

    The values of ``(general(modality, x), specific(x))``, up to summation order. h_m and f^s_m both read
    ``x``, the largest operand of the step (all items' raw image features: 116 MB at Baby size), so they run as
    one ``[d_m, 2d]`` product: ``x`` is read once forward, and its gradient is one product instead of two
    products and a sum.
    """
    project, own = general.project[modality], specific.encode
    both = F.linear(x, torch.cat([project.weight, own.weight]), torch.cat([project.bias, own.bias]))  # [n, 2d]
    # Under bf16 autocast the product is bfloat16; like every Linear's output there (train._step_precision),
    # it goes back to x's float32 before the rest of Eq. 1.
    both = both.to(x.dtype)
    hx, fx = both.split(project.out_features, dim=1)
    return general.from_projection(hx), torch.sigmoid(fx)
