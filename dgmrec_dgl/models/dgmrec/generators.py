"""Decoders and generators of missing modality features (DGMRec Eq. 10, 12, 13, 15).

- :class:`ModalityDecoder` ``f^dec_m``: ``[ḡ_m ⊕ s̄_m]`` (2d) → raw features (d_m), one Linear layer (Eq. 10/15).
- :class:`ModalityGenerator`: a two-layer MLP (Linear, tanh, Linear). As the general generator ``G^g_m`` it maps
  the concatenated general features of the other modalities ((M−1)·d) to modality m's general feature
  (Eq. 12); as the specific generator ``G^s_m`` it maps the item's modality preference ``p_{i,m}`` (d) to the
  specific feature (Eq. 13).
- :func:`perturb`: ``x + sign(x) ⊙ normalize(U[0,1)) · ε``, the noise the reference adds to generator and
  decoder inputs during training. ``normalize`` is over a row of the perturbed tensor: the model perturbs
  ḡ and s̄ apart or their concatenation (``DGMRecConfig.perturb_over``).

Every Linear layer starts with Xavier weights and zero or PyTorch-default biases (``bias_init``, see
:func:`~dgmrec_dgl.models.dgmrec.encoders.xavier_linear`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import xavier_linear


class ModalityDecoder(nn.Module):
    def __init__(self, d: int, d_out: int, bias_init: str = "zero"):
        super().__init__()
        self.decode = xavier_linear(2 * d, d_out, bias_init=bias_init)

    def forward(self, general: torch.Tensor, specific: torch.Tensor) -> torch.Tensor:
        """``general``, ``specific`` [n, d] → reconstructed raw features [n, d_m]."""
        return self.decode(torch.cat([general, specific], dim=1))


class ModalityGenerator(nn.Module):
    def __init__(self, d_in: int, d: int, bias_init: str = "zero"):
        super().__init__()
        self.net = nn.Sequential(xavier_linear(d_in, d, bias_init=bias_init), nn.Tanh(),
                                 xavier_linear(d, d, bias_init=bias_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, d_in] → generated features [n, d]."""
        return self.net(x)


def perturb(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x + sign(x) ⊙ normalize(U[0,1)) · eps`` (row-normalised noise, same shape as ``x``)."""
    if eps == 0.0:
        return x
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + torch.sign(x) * F.normalize(noise, dim=-1) * eps
