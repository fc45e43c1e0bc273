"""Item–item kNN graphs (FAISS), their refinement (Eq. 16, Numba) and the DGL heterograph.

- :mod:`.knn` — ``KnnGraph``, ``build_knn``, ``query_rows``, ``normalize_knn`` (Eq. 4),
  ``modality_knn_graphs``.
- :mod:`.refine` — ``refine_knn`` (Eq. 16).
- :mod:`.hetero` — ``build_heterograph``, ``replace_knn_relation``, ``propagate``, ``mean_aggregate``.
- :mod:`.blocks` — exact full-neighbour DGL blocks (``knn_blocks``, ``item_user_block``) for DGMRec's
  blocks execution mode.
- :mod:`.sampling` — neighbour-sampled blocks drawn by DGL's samplers (``sample_ui_blocks``,
  ``lightgcn_blocks``, ``sample_one_hop``) for the sampled execution mode.
- :mod:`.partition` — the heterograph with its node data as DistDGL partitions (``partition_dataset``,
  ``summarize_partitions``; ``dgmrec-dgl partition``).

The DGL/torch side (:mod:`.hetero`, :mod:`.blocks`, :mod:`.sampling`, :mod:`.partition`) is imported on
first use, so the FAISS/Numba side can run without loading torch (the graph benchmark measures its memory
that way).
"""

from __future__ import annotations

import importlib

from .knn import KnnGraph, KnnRows, build_knn, modality_knn_graphs, normalize_knn, query_rows
from .refine import refine_knn

_HETERO = ("build_heterograph", "replace_knn_relation", "propagate", "mean_aggregate", "knn_etype")
_BLOCKS = ("relation_block", "knn_blocks", "item_user_block", "src_ids", "dst_ids")
_SAMPLING = ("seed_sampling", "sample_ui_blocks", "lightgcn_blocks", "sample_one_hop")

__all__ = ["KnnGraph", "KnnRows", "build_knn", "modality_knn_graphs", "normalize_knn", "query_rows", "refine_knn",
           *_HETERO, *_BLOCKS, *_SAMPLING]


def __getattr__(name: str):
    if name in _HETERO:
        return getattr(importlib.import_module(".hetero", __name__), name)
    if name in _BLOCKS:
        return getattr(importlib.import_module(".blocks", __name__), name)
    if name in _SAMPLING:
        return getattr(importlib.import_module(".sampling", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
