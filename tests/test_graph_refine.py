"""Graph refinement, DGMRec Eq. 16 (dgmrec_dgl.graphs.refine) against a dense numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest

from dgmrec_dgl.graphs.knn import build_knn, normalize_knn
from dgmrec_dgl.graphs.refine import refine_knn, source_degree
from test_knn import dense_cosine, dense_knn, dense_sym_norm


def dense_refine(norm_dense, x_gen, raw_degree, missing, present, alpha, k, sources):
    """Eq. 16 densely: top-k of the missing rows over the sources, normalised, blended into those rows."""
    n = x_gen.shape[0]
    sim = dense_cosine(x_gen)
    src = np.flatnonzero(present) if sources == "present" else np.arange(n)
    new = np.zeros((n, n))
    for i in missing:
        top = src[np.argsort(-sim[i, src], kind="stable")[:k]]
        new[i, top] = sim[i, top]
    deg = raw_degree.astype(np.float64).copy()
    deg[missing] = new[missing].sum(axis=1)
    inv = 1.0 / np.sqrt(deg)
    new_norm = new * inv[:, None] * inv[None, :]
    out = norm_dense.copy()
    out[missing] = alpha * norm_dense[missing] + (1 - alpha) * new_norm[missing]
    return out


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(11)
    n, d, k = 80, 10, 6
    x = rng.standard_normal((n, d)).astype(np.float32) + 0.3  # mostly positive cosines
    present = rng.random(n) < 0.55
    missing = np.flatnonzero(~present)
    raw = build_knn(x, k, present, index="exact", progress=False)
    norm = normalize_knn(raw)
    x_gen = x.copy()
    x_gen[missing] = rng.standard_normal((missing.size, d)).astype(np.float32) + 0.3  # "generated"
    return dict(x=x, x_gen=x_gen, present=present, missing=missing, raw=raw, norm=norm, k=k)


def rows_of(g, i):
    return g.indices[g.indptr[i]:g.indptr[i + 1]], g.weights[g.indptr[i]:g.indptr[i + 1]]


@pytest.mark.parametrize("sources", ["present", "all"])
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_equals_dense_implementation(setup, sources, alpha):
    s = setup
    out = refine_knn(s["norm"], s["x_gen"], s["missing"], alpha, s["k"], sources=sources,
                     present=s["present"], degree=s["raw"].row_degree(), index="exact", progress=False)
    want = dense_refine(s["norm"].to_scipy().toarray(), s["x_gen"], s["raw"].row_degree(), s["missing"],
                        s["present"], alpha, s["k"], sources)
    got = out.to_scipy().toarray()
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("sources", ["present", "all"])
def test_only_missing_rows_change_and_edges_point_into_them(setup, sources):
    s = setup
    norm, present, missing = s["norm"], s["present"], s["missing"]
    out = refine_knn(norm, s["x_gen"], missing, 0.4, s["k"], sources=sources, present=present,
                     index="exact", progress=False)
    for i in np.flatnonzero(present):  # untouched rows: bit-identical
        old_c, old_w = rows_of(norm, i)
        new_c, new_w = rows_of(out, i)
        np.testing.assert_array_equal(old_c, new_c)
        assert old_w.tobytes() == new_w.tobytes()
    old_pattern = norm.to_scipy() != 0
    added = (out.to_scipy() != 0).astype(np.int8) - old_pattern.astype(np.int8)
    targets, srcs = (added > 0).nonzero()  # entries that were not in the old graph
    assert set(targets.tolist()) <= set(missing.tolist())  # new edges go into missing items
    assert len(set(targets.tolist())) == missing.size
    if sources == "present":
        assert present[srcs].all()  # ... and only from items that have the modality
        for i in missing:  # old self-loop kept with weight alpha, plus k present sources
            cols, w = rows_of(out, i)
            assert i in cols and np.isclose(w[cols == i][0], 0.4)
            assert present[cols[cols != i]].all() and (cols != i).sum() == s["k"]


def test_alpha_one_leaves_graph_unchanged(setup):
    s = setup
    out = refine_knn(s["norm"], s["x_gen"], s["missing"], 1.0, s["k"], progress=False)
    np.testing.assert_array_equal(out.indptr, s["norm"].indptr)
    np.testing.assert_array_equal(out.indices, s["norm"].indices)
    np.testing.assert_array_equal(out.weights, s["norm"].weights)


def test_alpha_zero_rows_are_the_new_normalised_rows(setup):
    s = setup
    out = refine_knn(s["norm"], s["x_gen"], s["missing"], 0.0, s["k"], progress=False)
    sim = dense_cosine(s["x_gen"])
    src = np.flatnonzero(s["present"])
    for i in s["missing"][:5]:
        cols, _ = rows_of(out, i)
        np.testing.assert_array_equal(cols, np.sort(src[np.argsort(-sim[i, src])[:s["k"]]]))


def test_degree_rederived_from_features_matches_raw_row_sums(setup):
    s = setup
    present_ids = np.flatnonzero(s["present"])
    np.testing.assert_allclose(source_degree(s["norm"], s["x"], present_ids),
                               s["raw"].row_degree()[present_ids], rtol=1e-5)
    # with unchanged features for present items, degree=None gives the same graph as the raw degrees
    a = refine_knn(s["norm"], s["x_gen"], s["missing"], 0.5, s["k"], progress=False)
    b = refine_knn(s["norm"], s["x_gen"], s["missing"], 0.5, s["k"], degree=s["raw"].row_degree(),
                   progress=False)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5)


def test_repeated_refinement_stays_valid(setup):
    s = setup
    g = s["norm"]
    for step in range(3):
        g = refine_knn(g, s["x_gen"], s["missing"], 0.8, s["k"], degree=s["raw"].row_degree(), progress=False)
    dense = g.to_scipy().toarray()
    assert np.isfinite(dense).all()
    present_rows = dense[s["present"]]
    np.testing.assert_array_equal(present_rows, s["norm"].to_scipy().toarray()[s["present"]])


def test_tolerance_keeps_a_subset_of_the_union(setup):
    s = setup
    rng = np.random.default_rng(5)
    full = pruned = s["norm"]
    for step in range(4):   # fresh generated features each time: new neighbours join the rows
        x = s["x_gen"].copy()
        x[s["missing"]] = rng.standard_normal((s["missing"].size, x.shape[1])).astype(np.float32) + 0.3
        full = refine_knn(full, x, s["missing"], 0.6, s["k"], degree=s["raw"].row_degree(), progress=False)
        pruned = refine_knn(pruned, x, s["missing"], 0.6, s["k"], degree=s["raw"].row_degree(),
                            tolerance=0.2, progress=False)
    assert pruned.indptr[-1] < full.indptr[-1]
    dense_full, dense_pruned = full.to_scipy().toarray(), pruned.to_scipy().toarray()
    # an entry dropped and later rebuilt restarts from (1 - alpha) * new, so only the pattern is a subset
    assert np.all(dense_full[dense_pruned != 0] != 0)
    np.testing.assert_array_equal(dense_pruned[s["present"]], dense_full[s["present"]])
    with pytest.raises(ValueError, match="tolerance must lie in"):
        refine_knn(full, x, s["missing"], 0.6, s["k"], tolerance=1.0, progress=False)


def test_bad_input(setup):
    s = setup
    with pytest.raises(ValueError, match="alpha"):
        refine_knn(s["norm"], s["x_gen"], s["missing"], 1.5, 5, progress=False)
    with pytest.raises(ValueError, match="rows but the graph"):
        refine_knn(s["norm"], s["x_gen"][:-1], s["missing"], 0.5, 5, progress=False)
    with pytest.raises(ValueError, match="marks as having"):
        refine_knn(s["norm"], s["x_gen"], s["missing"], 0.5, 5, present=np.ones(80, bool), progress=False)
    with pytest.raises(ValueError, match="sources"):
        refine_knn(s["norm"], s["x_gen"], s["missing"], 0.5, 5, sources="some", progress=False)
    with pytest.raises(ValueError, match="missing_rows"):
        refine_knn(s["norm"], s["x_gen"], np.array([0, 99]), 0.5, 5, progress=False)
    bad = s["x_gen"].copy()
    bad[s["missing"][0]] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_knn(s["norm"], bad, s["missing"], 0.5, 5, progress=False)


def test_dense_reference_helpers_agree(setup):
    # the dense helpers used above match the library's initial graph (sanity of the test itself)
    s = setup
    np.testing.assert_allclose(s["norm"].to_scipy().toarray(),
                               dense_sym_norm(dense_knn(s["x"], s["k"], s["present"])), atol=1e-6)


def test_rows_whose_similarities_sum_below_zero_get_zero_weights_not_an_error():
    # Zero-mean features: a missing item's nearest present items can all have negative cosine.
    features = np.array([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1], [-0.9, 0.0]], dtype=np.float32)
    present = np.array([False, True, True, True])
    old = normalize_knn(build_knn(features, 2, present))
    refined = refine_knn(old, features, [0], alpha=0.5, k=2, present=present)
    row = slice(refined.indptr[0], refined.indptr[1])
    assert np.isfinite(refined.weights).all()
    # the old self-loop, halved; the new entries all have weight 0 (their row sum is negative)
    weights = dict(zip(refined.indices[row].tolist(), refined.weights[row].tolist()))
    assert weights.pop(0) == pytest.approx(0.5)
    assert all(w == 0.0 for w in weights.values())


def test_non_finite_features_are_reported_not_propagated():
    features = np.ones((4, 2), dtype=np.float32)
    present = np.array([False, True, True, True])
    old = normalize_knn(build_knn(features, 2, present))
    features[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        refine_knn(old, features, [0], alpha=0.5, k=2, present=present)
