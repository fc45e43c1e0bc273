"""Recommender models: DGMRec, and the LightGCN propagation they share."""
