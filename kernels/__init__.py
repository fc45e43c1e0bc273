"""Numba kernels of dgmrec-dgl (no torch here), each with a pure-numpy twin used by the tests.

- :mod:`kernels.refine` — CSR graph refinement (Eq. 16): :func:`refine_rows`, :func:`row_sums`,
  :func:`sym_normalize_rows`.
- :mod:`kernels.sampling` — BPR triples: :func:`bpr_triples`, :func:`sample_negatives`.
- :mod:`kernels.ivf` — the IVF list scan of the kNN graphs: :func:`ivf_topk`.
- :mod:`kernels.adam` — lazy Adam on the rows a sampled step read: :func:`lazy_adam_rows`.
- :mod:`kernels.introsort` — the argsort of numpy's classic quicksort, ties included (the release's new-item
  draw): :func:`introsort_argsort` (tested against the shipped TikTok split; no numpy twin can order ties so).
"""

from kernels.adam import lazy_adam_rows
from kernels.introsort import introsort_argsort
from kernels.ivf import ivf_topk
from kernels.refine import refine_rows, row_sums, sym_normalize_rows
from kernels.sampling import bpr_triples, sample_negatives

__all__ = ["bpr_triples", "introsort_argsort", "ivf_topk", "lazy_adam_rows", "refine_rows", "row_sums", "sample_negatives", "sym_normalize_rows"]
