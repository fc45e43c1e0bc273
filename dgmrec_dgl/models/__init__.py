"""Recommender models on the DGL heterograph; :func:`build_model` makes the one a config names."""

from __future__ import annotations


def build_model(config, dataset):
    """The :class:`~dgmrec_dgl.models.base.Recommender` named by ``config.model.name`` for ``dataset``."""
    name = config.model.name
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
