"""Cross-modal retrieval with generated features (DGMRec paper, Sec. 4.2.4 and Table 3).

An item lacks modality m; can its missing m-feature be recovered well enough to find the item among the
true m-features of the whole catalog? For each such item i a query vector q_i is built, every item's true
m-feature is ranked by cosine similarity to q_i, and

    Hit@K = mean_i 1[rank of item i's own true m-feature ≤ K]

(rank = 1 + the number of items strictly more similar than item i, so ties never help the query).

Queries come from two methods:

``dgmrec``
    the model's generated feature X̂_m of item i (Eq. 12–15).
``nn``
    the paper's nearest-neighbour baseline: the 5 items most similar to i by the modalities i *has*
    (cosine per modality, averaged over those modalities; candidates have m and every modality i has),
    and the mean of their m-features. Not defined when i lacks every modality (the paper's "-").

Results are reported per *level* (how many modalities the item lacks: ``missing=1``, ..., ``missing=all``)
as the mean over the queries of that level across modalities, and per modality. The ground truth is the
complete feature files, so this evaluation needs a mask applied to complete data (a synthetic mask, as in
the paper), not items whose features are truly unknown.

Cost: one pass of ``[chunk, n_items]`` similarities per chunk of queries, O(queries · n_items · d);
``max_queries`` caps the queries per (level, modality) with a seeded sample for very large catalogs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

NN_NEIGHBOURS = 5
HIT_KS = (10, 20)
_CHUNK = 1024

Generate = Callable[[dict[str, np.ndarray]], dict[str, torch.Tensor]]   # modality → rows ↦ [len, d_m]


def _unit(x) -> torch.Tensor:
    return F.normalize(torch.from_numpy(np.array(x, dtype=np.float32)), dim=1)   # a copy: maps are read-only


def retrieval_hits(queries, targets: np.ndarray, candidates, ks: Sequence[int] = HIT_KS,
                   *, chunk: int = _CHUNK) -> dict[str, float]:
    """Hit@K of ``queries`` [q, d] for their own items ``targets`` [q] among ``candidates`` [n, d].

    Candidates are read in blocks of ``16·chunk`` rows (a memory map is never loaded whole).

    Returns:
        ``{"hit@K": fraction}`` for each K, plus ``n_queries``.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(queries) != len(targets):
        raise ValueError(f"{len(queries)} queries but {len(targets)} target items")
    hits = dict.fromkeys(ks, 0)
    block_rows = 16 * chunk
    for lo in range(0, len(targets), chunk):
        q = F.normalize(torch.as_tensor(np.asarray(queries[lo:lo + chunk]), dtype=torch.float32), dim=1)
        own_ids = torch.from_numpy(targets[lo:lo + chunk])
        own = (q * _unit(candidates[own_ids.numpy()])).sum(dim=1)
        better = torch.zeros(len(q), dtype=torch.int64)      # candidates strictly more similar than the own item
        for c_lo in range(0, len(candidates), block_rows):
            sims = q @ _unit(candidates[c_lo:c_lo + block_rows]).T
            inside = ((own_ids >= c_lo) & (own_ids < c_lo + sims.shape[1])).nonzero().squeeze(1)
            sims[inside, own_ids[inside] - c_lo] = -torch.inf   # the own item never outranks itself
            better += (sims > own[:, None]).sum(dim=1)
        for k in ks:
            hits[k] += int((better < k).sum())
    out = {f"hit@{k}": hits[k] / max(len(targets), 1) for k in ks}
    out["n_queries"] = float(len(targets))
    return out


def nn_queries(features: dict[str, np.ndarray], present: dict[str, np.ndarray], modality: str, rows,
               n_neighbours: int = NN_NEIGHBOURS, *, chunk: int = _CHUNK) -> np.ndarray:
    """The nearest-neighbour baseline's query for each item of ``rows`` lacking ``modality``.

    For item i with available modalities A(i) (non-empty): candidates are the items that have
    ``modality`` (so never i) and every modality of A(i); score(i, j) = mean over a ∈ A(i) of cos(x_i^a, x_j^a); the
    query is the mean ``modality`` feature of the ``n_neighbours`` best candidates. Candidates are
    scanned in blocks with a running top-k, so memory is O(chunk · 16·chunk) whatever the catalog size.

    Returns:
        float32 ``[len(rows), d_modality]``.

    Raises:
        ValueError: an item of ``rows`` has ``modality`` or lacks every modality.
    """
    rows = np.asarray(rows, dtype=np.int64)
    names = [m for m in features if m != modality]
    has = np.stack([np.asarray(present[m], dtype=bool)[rows] for m in names], axis=1) if names \
        else np.zeros((len(rows), 0), dtype=bool)
    if np.asarray(present[modality], dtype=bool)[rows].any():
        raise ValueError(f"nn_queries: some rows have {modality}; pass items lacking it")
    if len(rows) and not has.any(axis=1).all():
        raise ValueError("nn_queries: an item lacks every modality, so it has no neighbours to borrow from")
    out = np.empty((len(rows), np.shape(features[modality])[1]), dtype=np.float32)
    for pattern in np.unique(has, axis=0):                  # rows sharing the same available modalities
        available = [m for m, h in zip(names, pattern) if h]
        positions = np.flatnonzero((has == pattern).all(axis=1))   # into rows / out
        group = rows[positions]
        allowed = np.asarray(present[modality], dtype=bool).copy()
        for m in available:
            allowed &= np.asarray(present[m], dtype=bool)
        cand = np.flatnonzero(allowed)
        if len(cand) == 0:
            raise ValueError(f"nn_queries: no item has {modality} and {available}")
        k = min(n_neighbours, len(cand))
        for lo in range(0, len(group), chunk):
            ids = torch.from_numpy(group[lo:lo + chunk])
            queries = {m: _unit(features[m][ids.numpy()]) for m in available}
            best_score = torch.full((len(ids), 0), -torch.inf)
            best_id = torch.zeros((len(ids), 0), dtype=torch.int64)
            for c_lo in range(0, len(cand), 16 * chunk):               # candidate blocks, running top-k
                block = torch.from_numpy(cand[c_lo:c_lo + 16 * chunk])
                score = sum(queries[m] @ _unit(features[m][block.numpy()]).T for m in available) / len(available)
                score = torch.cat([best_score, score], dim=1)
                pool = torch.cat([best_id, block.expand(len(ids), -1)], dim=1)
                best_score, pick = torch.topk(score, min(k, score.shape[1]), dim=1)
                best_id = torch.gather(pool, 1, pick)
            neighbours = best_id.numpy()                                            # [len(ids), k]
            distinct, where = np.unique(neighbours, return_inverse=True)   # gather each source row once
            source = np.asarray(features[modality][distinct], dtype=np.float32)
            out[positions[lo:lo + chunk]] = source[where.reshape(neighbours.shape)].mean(axis=1)
    return out


def _level_name(level: int, n_modalities: int) -> str:
    return "missing=all" if level == n_modalities else f"missing={level}"


def cross_modal_retrieval(truth: dict[str, np.ndarray], features: dict[str, np.ndarray],
                          present: dict[str, np.ndarray], generate: Generate | None, *,
                          ks: Sequence[int] = HIT_KS, max_queries: int | None = 5000,
                          seed: int = 0) -> dict[str, dict[str, float]]:
    """Table 3: Hit@K of generated features (``dgmrec``) and of the NN baseline (``nn``) by missing level.

    Args:
        truth: modality → the complete true features ``[n_items, d_m]`` (the unmasked files).
        features: modality → the features the model saw (missing rows imputed; only present rows are read).
        present: modality → bool ``[n_items]``.
        generate: maps ``{modality: item ids}`` to generated features (e.g. ``DGMRec.generated_features``
            bound to its graph), or None to report the NN baseline only.
        ks: cut-offs.
        max_queries: at most this many items per (modality, level), a seeded sample (None = all).
        seed: sample seed.

    Returns:
        ``{method: {"missing=1/hit@10": ..., "image/missing=1/hit@10": ..., "missing=1/n_queries": ...}}``;
        a level's overall value is the query-weighted mean over modalities. NN has no ``missing=all``.
    """
    modalities = list(truth)
    n_missing = sum((~np.asarray(present[m], dtype=bool)).astype(np.int64) for m in modalities)
    rng = np.random.default_rng(seed)
    queries: dict[tuple[str, int], np.ndarray] = {}
    for m in modalities:
        lacks = ~np.asarray(present[m], dtype=bool)
        for level in range(1, len(modalities) + 1):
            rows = np.flatnonzero(lacks & (n_missing == level))
            if max_queries is not None and len(rows) > max_queries:
                rows = np.sort(rng.choice(rows, max_queries, replace=False))
            if len(rows):
                queries[(m, level)] = rows
    generated = {}
    if generate is not None and queries:
        wanted = {m: np.concatenate([r for (mm, _), r in queries.items() if mm == m])
                  for m in modalities if any(mm == m for mm, _ in queries)}
        made = generate(wanted)
        for m, rows in wanted.items():
            offset = 0
            for (mm, level), r in queries.items():
                if mm == m:
                    generated[(m, level)] = made[m][offset:offset + len(r)]
                    offset += len(r)
    results: dict[str, dict[str, float]] = {}
    for (m, level), rows in queries.items():
        methods = {}
        if generate is not None:
            methods["dgmrec"] = generated[(m, level)]
        if level < len(modalities):
            methods["nn"] = nn_queries(features, present, m, rows)
        for method, q in methods.items():
            hits = retrieval_hits(q, rows, truth[m], ks)
            table = results.setdefault(method, {})
            name = _level_name(level, len(modalities))
            for key, value in hits.items():
                table[f"{m}/{name}/{key}"] = value
            n = hits["n_queries"]
            total = table.get(f"{name}/n_queries", 0.0)
            for k in ks:     # running query-weighted mean over modalities
                prev = table.get(f"{name}/hit@{k}", 0.0)
                table[f"{name}/hit@{k}"] = (prev * total + hits[f"hit@{k}"] * n) / (total + n)
            table[f"{name}/n_queries"] = total + n
    return results


def model_retrieval(model, g, dataset, truth: dict[str, np.ndarray], *, ks: Sequence[int] = HIT_KS,
                    max_queries: int | None = 5000, seed: int = 0) -> dict[str, dict[str, float]]:
    """:func:`cross_modal_retrieval` of a trained model on its masked ``dataset``, against ``truth``
    (the same data's complete features). A model without ``generated_features`` (anything but DGMRec)
    gets the NN baseline only.
    """
    if dataset.mask is None:
        raise ValueError("cross-modal retrieval needs a run trained with a missing-modality mask")
    generate = None
    if hasattr(model, "generated_features"):
        generator = torch.Generator().manual_seed(seed)

        def generate(rows):
            rows = {m: torch.from_numpy(r) for m, r in rows.items()}
            return {m: x.numpy() for m, x in model.generated_features(g, rows, generator).items()}

    return cross_modal_retrieval(truth, dataset.features, dataset.present, generate, ks=ks,
                                 max_queries=max_queries, seed=seed)
