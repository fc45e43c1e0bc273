"""CI2MG (Lin et al., MM 2023) on the DGL graph: one module per concept.

- :mod:`.hypergraph` — prototype-clustering hypergraph, intra-modality generation (Eq. 3–5);
- :mod:`.transport` — block-wise log-domain Sinkhorn OT, inter-modality generation (Eq. 6–9);
- :mod:`.contrastive` — modality-aware contrastive loss (Eq. 10);
- :mod:`.generation` — task-guided generation and reconstruction (Eq. 11–12);
- :mod:`.model` — the :class:`~dgmrec_dgl.models.ci2mg.model.CI2MG` recommender (Eq. 1, 13–15).
"""
