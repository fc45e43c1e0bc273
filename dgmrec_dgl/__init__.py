"""dgmrec-dgl: multimodal recommendation with missing modalities (DGMRec, CI2MG) on DGL."""

__version__ = "0.1.0"
