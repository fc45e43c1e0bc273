"""Item modality preferences from the users who interacted with the item (DGMRec Eq. 2–3).

.. math::
    p_{i,m} = \\frac{1}{|N_i|} \\sum_{u \\in N_i} \\tanh(W_m e_u), \\qquad \\tilde E_m = p_m \\odot E_m

As in the reference implementation, a user's modality preference is a bias-free linear map ``W_m`` of the
user's (layer-0) ID embedding followed by tanh, and the same item preference filters both the general and
the specific features. (The paper writes σ(P_{i,m}) and separate preference tables; the release does not
use them, see DGMRec_SPEC §2.4.) Items without train users get a zero preference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...graphs.hetero import mean_aggregate


class PreferenceFilter(nn.Module):
    """``p_{i,m}`` for one modality."""

    def __init__(self, d: int):
        super().__init__()
        self.user_to_pref = nn.Linear(d, d, bias=False)  # W_m
        nn.init.xavier_uniform_(self.user_to_pref.weight)

    def user_preferences(self, user_emb: torch.Tensor) -> torch.Tensor:
        """``tanh(W_m e_u)`` [n_users, d]."""
        # tanh in place: the product's output is not kept for the backward pass (the product keeps its inputs,
        # tanh its output), and a whole-graph pass at 2M users does not hold a second [n_users, d] (0.5 GB)
        return torch.tanh_(self.user_to_pref(user_emb))

    def forward(self, g, user_emb: torch.Tensor) -> torch.Tensor:
        """``user_emb`` [n_users, d] → item preferences [n_items, d] (mean over each item's train users)."""
        # The same values, but tanh's [n_users, d] output is recomputed in the backward pass rather than kept
        # from forward to backward: 0.5 GB per modality at 2M users, for one [n_users, d] x [d, d] product.
        user_pref = checkpoint(self.user_preferences, user_emb, use_reentrant=False)
        return mean_aggregate(g, "interacts", user_pref)


def filtered_features(pref: torch.Tensor, general: torch.Tensor, specific: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 3 as the model propagates it: ``Ẽ_m = [p_m ⊙ E^g_m, p_m ⊙ E^s_m]``, [n, 2d] from three [n, d]
    (into ``out`` when given, e.g. a slice of rows of a whole-catalog table)."""
    return torch.cat([pref * general, pref * specific], dim=1, out=out)
