r"""Modality-aware contrastive learning between the intra- and inter-modality views (CI2MG Eq. 10).

.. math::
    \mathcal L_s = \sum_m \frac{1}{|B_m|} \sum_{k \in B_m}
        -\log \frac{\exp(s(q^m_k, \hat q^m_k)/\tau)}{\sum_{k' \in B_m} \exp(s(q^m_k, \hat q^m_{k'})/\tau)}

``s`` is the cosine similarity; ``B_m`` the distinct positive items of the mini-batch that have modality m
(the release's index set), so the negatives are the other in-batch items (InfoNCE). The paper sums over
all items; the release and this module average over the batch's items.

``release=True`` reproduces the released code, whose denominator holds the positive pair twice
(``pos / (pos + pos)``): every term is log 2, a constant with a zero gradient, so the contrastive loss
never trains anything there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dgmrec.losses import info_nce


def modality_contrastive(q: torch.Tensor, q_hat: torch.Tensor, temperature: float = 1.0,
                         release: bool = False) -> torch.Tensor:
    """Eq. 10 for one modality on ``q``, ``q_hat`` [B, d] (row r of each is the same item)."""
    if len(q) == 0:
        return q.new_zeros(())
    if release:
        pos = torch.exp(F.cosine_similarity(q, q_hat, dim=1) / temperature)
        return -torch.log(pos / (pos + pos)).mean()
    return info_nce(q, q_hat, temperature)
