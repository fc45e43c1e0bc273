"""Full-ranking evaluation, as the reference protocol defines it.

For each evaluated user every item is scored; the user's train items are masked (on the test split the valid
items too only with ``masks_valid=True``: the release and MMRec mask the train items alone, see
:func:`evaluate`); the top-K list is compared with the user's held-out items:

    Recall@K = mean_u |top-K(u) ∩ T_u| / |T_u|
    NDCG@K   = mean_u Σ_{r ≤ K, item_r ∈ T_u} 1/log2(r + 1)  /  Σ_{r ≤ min(|T_u|, K)} 1/log2(r + 1)

(Recall divides by the full |T_u|, not by min(K, |T_u|).) Users are scored in chunks whose size is set by a
memory budget, so a million-item catalog needs no [n_users, n_items] matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from tqdm.auto import tqdm

from .data.dataset import Dataset, pairs_to_csr

KS = (10, 20, 50)
PROGRESS_MIN_CHUNKS = 20      # an evaluation of at least this many user chunks shows a progress bar
ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # user ids [B] -> scores [B, n_items]


def ranking_metrics(top_items: np.ndarray, truth: sp.csr_matrix, users: np.ndarray,
                    ks: Sequence[int] = KS) -> dict[str, np.ndarray]:
    """Per-user Recall@K and NDCG@K of ranked lists.

    Args:
        top_items: int ``[B, K_max]`` ranked item ids per user (best first), K_max ≥ max(ks).
        truth: CSR ``[n_users, n_items]`` of held-out items.
        users: int ``[B]`` the rows of ``truth`` the lists belong to (each with ≥ 1 held-out item).
        ks: cut-offs.

    Returns:
        ``{"recall@K": float64 [B], "ndcg@K": float64 [B]}`` for each K.
    """
    sub = truth[users]
    sub.sort_indices()
    n_items = np.int64(truth.shape[1])
    # membership test by binary search on row-major keys row·n_items + item (sorted within the CSR)
    keys = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(sub.indptr)) * n_items + sub.indices
    query = np.arange(len(users), dtype=np.int64)[:, None] * n_items + top_items
    pos = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
    hits = (keys[pos] == query).astype(np.float64) if len(keys) else np.zeros(query.shape)
    n_truth = np.diff(truth.indptr)[users].astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    out = {}
    for k in ks:
        out[f"recall@{k}"] = hits[:, :k].sum(axis=1) / n_truth
        dcg = (hits[:, :k] * discount[:k]).sum(axis=1)
        ideal = np.cumsum(discount[:k])[np.minimum(n_truth, k).astype(np.int64) - 1]
        out[f"ndcg@{k}"] = dcg / ideal
    return out


def top_k_columns(scores: torch.Tensor, k: int, block: int = 64) -> torch.Tensor:
    """Column indices ``[B, k]`` of each row's ``k`` largest entries of ``scores`` ``[B, n]``, largest first.

    The same lists as ``torch.topk(scores, k).indices`` except where entries tie (then either order is a
    correct ranking). Wide rows are cut into blocks of ``block`` columns: every column among the k largest
    lies in a block whose maximum is at least the k-th largest entry, and at most k blocks have such a
    maximum (one such entry each), so the k blocks with the largest maxima hold all of them and the exact
    selection runs on those ``k × block`` candidates instead of the whole row. On 1M-item rows this
    replaces a partial sort of every row by one pass for the block maxima.
    """
    rows, n = scores.shape
    if n < 100 * k * block:      # below ~300K columns a partial sort of the row is as fast (measured)
        return torch.topk(scores, k, dim=1).indices
    whole = n // block * block
    maxima = scores[:, :whole].unflatten(1, (whole // block, block)).amax(2)      # a view: no copy
    if whole < n:
        maxima = torch.cat([maxima, scores[:, whole:].amax(1, keepdim=True)], dim=1)
    best = torch.topk(maxima, k, dim=1).indices                                   # [B, k] blocks
    cols = (best.unsqueeze(2) * block + torch.arange(block)).view(rows, k * block)  # [B, k·block]
    inside = cols < n
    candidates = torch.where(inside, scores.gather(1, cols.clamp(max=n - 1)), -torch.inf)
    return cols.gather(1, torch.topk(candidates, k, dim=1).indices)


class InnerProductRanker:
    """Exact top-k of inner-product scores ``user @ item.T`` that skips the items no user can rank.

    Every model here scores by an inner product of a user row and an item row, so a score is at most
    ``‖u‖·‖i‖`` (Cauchy–Schwarz). The items are taken in order of decreasing norm, in blocks; a user whose
    k-th best score so far is at least ``‖u‖ ×`` the largest norm left can gain nothing from the rest of the
    catalog and leaves the loop. The lists are those of scoring every item (up to the order of equal
    scores); the work follows the items users still need, not the catalog: at 200,000 items, most users stop
    within the first blocks (see ``bench/scale.py``'s evaluate rows).

    Args:
        item: ``[n_items, d]`` item rows.
        block: items per block (the score chunk is ``users × block`` floats).
    """

    def __init__(self, item: torch.Tensor, block: int = 32_768):
        norms = item.norm(dim=1)
        self.order = torch.argsort(norms, descending=True, stable=True)        # rank -> item id
        self.rank = torch.empty_like(self.order)
        self.rank[self.order] = torch.arange(len(self.order))                   # item id -> rank
        self.item = item[self.order].contiguous()
        self.norms = norms[self.order]
        self.block = block
        self.scored = 0                 # (user, item) scores computed, for the record

    def top_k(self, user: torch.Tensor, k: int, seen: sp.csr_matrix) -> torch.Tensor:
        """Item ids ``[B, k]`` of each row of ``user`` ``[B, d]``, best first, never an item of ``seen``
        (CSR ``[B, n_items]``, the masked items of each row). Needs ``k`` unmasked items per row."""
        n_users, n_items = len(user), len(self.order)
        rows = np.repeat(np.arange(n_users), np.diff(seen.indptr))
        ranks = self.rank[torch.from_numpy(seen.indices.astype(np.int64))]
        by_rank = torch.argsort(ranks, stable=True)
        rows, ranks = torch.from_numpy(rows)[by_rank], ranks[by_rank]
        values = torch.full((n_users, k), -torch.inf)
        slots = torch.zeros((n_users, k), dtype=torch.int64)
        user_norm = user.norm(dim=1)
        for start in range(0, n_items, self.block):
            stop = min(start + self.block, n_items)
            active = torch.nonzero(values[:, -1] < user_norm * self.norms[start]).flatten()
            if not len(active):
                break
            scores = user[active] @ self.item[start:stop].T                          # [A, block]
            self.scored += scores.numel()
            lo, hi = torch.searchsorted(ranks, torch.tensor([start, stop]))
            if hi > lo:                     # this block's masked entries of the active users
                position = torch.full((n_users,), -1, dtype=torch.int64)
                position[active] = torch.arange(len(active))
                r, c = position[rows[lo:hi]], ranks[lo:hi] - start
                keep = r >= 0
                scores[r[keep], c[keep]] = -torch.inf
            # the block's own k best, merged with the k kept so far: [A, 2k], not [A, k + block]
            best = torch.topk(scores, min(k, stop - start), dim=1)
            top = torch.topk(torch.cat([values[active], best.values], dim=1), k, dim=1)
            candidates = torch.cat([slots[active], best.indices + start], dim=1)
            values[active] = top.values
            slots[active] = candidates.gather(1, top.indices)
        return self.order[slots]


def _chunk_size(n_items: int, budget_bytes: int) -> int:
    return int(max(1, min(4096, budget_bytes // (4 * max(n_items, 1)))))


#: ``evaluate(factors=...)`` ranks with :class:`InnerProductRanker` from this many items on; below, scoring
#: every item is as fast and the lists are bit-for-bit the earlier ones.
PRUNE_MIN_ITEMS = 100_000
#: items per block of :class:`InnerProductRanker` in ``evaluate`` (users per chunk: the budget over this)
PRUNE_BLOCK = 32_768


@torch.no_grad()
def evaluate(score_fn: ScoreFn | None, dataset: Dataset, split: str = "test", ks: Sequence[int] = KS,
             *, budget_bytes: int = 256 << 20, item_groups: np.ndarray | None = None, user_sample: int = 0,
             seed: int = 0, masks_valid: bool = False, progress: bool = False,
             factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """Full-ranking Recall@K / NDCG@K on ``split`` (``valid`` or ``test``).

    Args:
        score_fn: maps a LongTensor of user ids ``[B]`` to scores ``[B, n_items]``; or None with ``factors``.
        factors: ``(user [n_users, d], item [n_items, d])`` when the scores are ``user @ item.T``; from
            :data:`PRUNE_MIN_ITEMS` items on the lists come from :class:`InnerProductRanker` (the same lists,
            without scoring the items no user can rank).
        dataset: the dataset (its train items are masked).
        split: ``valid`` or ``test``.
        ks: cut-offs (10, 20, 50 by default).
        budget_bytes: memory for one chunk of scores; sets the users per chunk.
        item_groups: optional int ``[n_items]`` group of each item (e.g. how many modalities it misses);
            adds ``recall@K/group=g`` computed on the held-out items of group g only (users with ≥ 1 such
            item), the breakdown of the paper's Fig. 3.
        user_sample: rank for this many of the split's users only, drawn uniformly with ``seed`` (0: all);
            for validations during training on large catalogs.
        masks_valid: on the test split, mask each user's valid items as well as the train items
            (``eval.test_masks_valid``). False is the release's and MMRec's protocol (the test loader masks
            the train items only); True ranks a valid item below every other item at test time, which
            raises test Recall wherever a user has both valid and test items (Baby, Sports, Clothing).
        progress: a tqdm bar over the user chunks (shown when there are many).

    Returns:
        metric name → mean over evaluated users, plus ``n_users``.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    n_users, n_items = dataset.n_users, dataset.n_items
    truth = pairs_to_csr(dataset.valid if split == "valid" else dataset.test, n_users, n_items)
    seen = np.concatenate([dataset.train, dataset.valid]) if split == "test" and masks_valid else dataset.train
    seen = pairs_to_csr(seen, n_users, n_items)
    users = np.flatnonzero(np.diff(truth.indptr) > 0)
    if 0 < user_sample < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, size=user_sample, replace=False))
    k_max = min(max(ks), n_items)
    group_truth = {}
    if item_groups is not None:
        for g in np.unique(item_groups):
            keep = sp.diags((item_groups == g).astype(np.float32))
            group_truth[int(g)] = (truth @ keep).tocsr()
            group_truth[int(g)].eliminate_zeros()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    ranker = None
    if factors is not None:
        if n_items >= PRUNE_MIN_ITEMS:
            ranker = InnerProductRanker(factors[1].float(), block=PRUNE_BLOCK)
        else:
            score_fn = (lambda user, item: lambda ids: user[ids] @ item.T)(*factors)
    step = max(1, budget_bytes // (4 * ranker.block)) if ranker else _chunk_size(n_items, budget_bytes)
    starts = range(0, len(users), step)
    for start in tqdm(starts, desc=f"evaluate {split}", unit="chunk", leave=False,
                      disable=not progress or len(starts) < PROGRESS_MIN_CHUNKS):
        batch = users[start:start + step]
        rows = seen[batch]
        if ranker is not None:
            top = ranker.top_k(factors[0][torch.from_numpy(batch)].float(), k_max, rows).numpy()
        else:
            scores = score_fn(torch.from_numpy(batch)).float()
            r_idx = np.repeat(np.arange(len(batch)), np.diff(rows.indptr))
            scores[torch.from_numpy(r_idx), torch.from_numpy(rows.indices.astype(np.int64))] = -torch.inf
            top = top_k_columns(scores, k_max).numpy()
        _accumulate(sums, counts, ranking_metrics(top, truth, batch, ks), "")
        for g, g_truth in group_truth.items():
            has = np.diff(g_truth.indptr)[batch] > 0
            if has.any():
                _accumulate(sums, counts, ranking_metrics(top[has], g_truth, batch[has], ks), f"/group={g}")
    result = {name: sums[name] / counts[name] for name in sums}
    result["n_users"] = float(len(users))
    if ranker is not None:
        result["scored_share"] = ranker.scored / (len(users) * n_items)
    return result


def popularity_scores(dataset: Dataset) -> ScoreFn:
    """The popularity reference ranker: every user scores each item by its number of train interactions."""
    counts = torch.from_numpy(dataset.item_train_counts().astype(np.float32))
    return lambda users: counts.repeat(len(users), 1)     # a fresh [B, n_items]: evaluate() masks it in place


def _accumulate(sums, counts, metrics, suffix):
    for name, values in metrics.items():
        key = name + suffix
        sums[key] = sums.get(key, 0.0) + float(values.sum())
        counts[key] = counts.get(key, 0) + len(values)
