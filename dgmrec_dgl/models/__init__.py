"""Recommender models on the DGL heterograph; :func:`build_model` makes the one a config names."""

from __future__ import annotations

from ..errors import DataError


def build_model(config, dataset):
    """The :class:`~dgmrec_dgl.models.base.Recommender` named by ``config.model.name`` for ``dataset``."""
    name = config.model.name
    k = getattr(config.model, "knn_k", None)
    if k is not None and k > dataset.n_items:
        raise DataError(str(dataset.root), "model.knn_k", f"is {k} but the catalog has only {dataset.n_items} items",
                        f"set model.knn_k to at most {dataset.n_items} in the config")
    if name == "dgmrec":
        from .dgmrec.model import DGMRec

        return DGMRec.from_dataset(dataset, config.model, seed=config.train.seed)
    if name == "mfbpr":
        from .mf import MFBPR

        return MFBPR.from_dataset(dataset, config.model)
    if name == "lightgcn":
        from .lightgcn_rec import LightGCNRecommender

        return LightGCNRecommender.from_dataset(dataset, config.model)
    if name == "ci2mg":
        from .ci2mg.model import CI2MG

        return CI2MG.from_dataset(dataset, config.model, seed=config.train.seed)
    raise ValueError(f"unknown model {name!r}")
