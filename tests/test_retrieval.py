"""Cross-modal retrieval (paper Table 3): Hit@K against brute force, the NN baseline, the report layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dgmrec_dgl.retrieval import cross_modal_retrieval, nn_queries, retrieval_hits


def brute_force_hits(queries, targets, candidates, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    sims = q @ c.T
    own = sims[np.arange(len(targets)), targets]
    sims[np.arange(len(targets)), targets] = -np.inf
    return float(np.mean((sims > own[:, None]).sum(axis=1) < k))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 60), q=st.integers(1, 20), d=st.integers(2, 8), k=st.integers(1, 10),
       seed=st.integers(0, 10_000), chunk=st.integers(1, 8))
def test_hits_equal_brute_force(n, q, d, k, seed, chunk):
    rng = np.random.default_rng(seed)
    candidates = rng.normal(size=(n, d)).astype(np.float32)
    targets = rng.integers(0, n, size=q)
    queries = candidates[targets] + rng.normal(scale=1.0, size=(q, d)).astype(np.float32)
    got = retrieval_hits(queries, targets, candidates, ks=(k,), chunk=chunk)   # blocks of 16·chunk rows
    assert got[f"hit@{k}"] == pytest.approx(brute_force_hits(queries, targets, candidates, k))
    assert got["n_queries"] == q


def test_a_query_equal_to_its_own_feature_is_a_hit_at_one():
    candidates = np.eye(5, dtype=np.float32) + 0.01
    assert retrieval_hits(candidates.copy(), np.arange(5), candidates, ks=(1,))["hit@1"] == 1.0


def two_modality_data():
    """Item i's image and text share a cluster; item 0 lacks text, item 1 lacks both."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)).astype(np.float32)
    cluster = np.array([0, 1, 0, 0, 1, 1, 2, 2, 0, 2])
    image = centres[cluster] + 0.05 * rng.normal(size=(10, 8)).astype(np.float32)
    text = centres[cluster][:, ::-1] + 0.05 * rng.normal(size=(10, 8)).astype(np.float32)
    present = {"image": np.ones(10, bool), "text": np.ones(10, bool)}
    present["text"][[0, 1]] = False
    present["image"][1] = False
    return {"image": image, "text": text}, present, cluster


def test_nn_query_is_the_mean_text_of_the_five_nearest_by_image():
    truth, present, cluster = two_modality_data()
    query = nn_queries(truth, present, "text", [0])
    unit = truth["image"] / np.linalg.norm(truth["image"], axis=1, keepdims=True)
    allowed = np.flatnonzero(present["text"] & present["image"])
    best = allowed[np.argsort(-(unit[allowed] @ unit[0]))[:5]]
    np.testing.assert_allclose(query[0], truth["text"][best].mean(axis=0), rtol=1e-5)


def test_nn_refuses_items_that_lack_every_modality():
    truth, present, _ = two_modality_data()
    with pytest.raises(ValueError, match="lacks every modality"):
        nn_queries(truth, present, "text", [1])


def test_report_has_levels_and_an_oracle_generator_hits_everything():
    truth, present, _ = two_modality_data()
    oracle = lambda rows: {m: torch.from_numpy(truth[m][r]) for m, r in rows.items()}  # noqa: E731
    report = cross_modal_retrieval(truth, truth, present, oracle, ks=(1, 2))
    assert report["dgmrec"]["missing=1/hit@1"] == 1.0
    assert report["dgmrec"]["missing=all/hit@1"] == 1.0
    assert report["dgmrec"]["missing=all/n_queries"] == 2        # item 1, once per modality
    assert "missing=all/hit@1" not in report["nn"]             # the NN baseline has nothing to borrow from
    assert 0.0 <= report["nn"]["missing=1/hit@2"] <= 1.0
    assert report["nn"]["text/missing=1/n_queries"] == 1


def test_generated_features_leave_the_raw_tables_untouched(tiny_dir):
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.models import build_model
    from dgmrec_dgl.train import load_dataset

    config = load_config("configs/dgmrec/base.yaml", {"data": {"dir": str(tiny_dir), "missing_ratio": 0.5},
                                                      "model": {"knn_k": 3}})
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    before = {m: p.detach().clone() for m, p in model.raw.items()}
    rows = {m: torch.from_numpy(np.flatnonzero(~dataset.present[m])) for m in dataset.modalities}
    out = model.generated_features(g, rows)
    for m, x in out.items():
        assert x.shape == (len(rows[m]), dataset.features[m].shape[1])
        assert torch.isfinite(x).all()
        assert torch.equal(model.raw[m].detach(), before[m])
