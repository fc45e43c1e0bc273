"""dgmrec-dgl: multimodal recommendation with missing modalities (DGMRec, CI2MG) on DGL."""

import os

# Idle OpenMP threads (torch, DGL, Numba) spin between parallel regions by default, which on a small
# machine starves the other runtimes; passive waiting was measured to cut LightGCN epochs from 1-12 s to
# 0.3 s here. Set before torch loads its OpenMP runtime; an explicit setting by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from .api import Run, fit, load  # noqa: E402  (after the OpenMP setting; api imports torch lazily)

__all__ = ["Run", "fit", "load", "__version__"]
