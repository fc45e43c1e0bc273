"""The Python API: train, load, score and recommend, one call each.

    import dgmrec_dgl

    run = dgmrec_dgl.fit("configs/dgmrec/demo.yaml", data="demo_data", out="runs/api-demo", train={"epochs": 3})
    run.metrics["test"]["recall@20"]          # metrics.json of the best epoch
    run.recommend([0, 1, 2], k=10)            # pandas DataFrame: user, rank, item, score, missing
    run.score([0, 1], [5, 7, 9])              # float32 [2, 3]
    users, items = run.embeddings()           # float32 [n_users, d], [n_items, d]
    run = dgmrec_dgl.load("runs/api-demo")    # later, from any folder

Heavy imports (torch, DGL, FAISS) happen inside the functions, so ``import dgmrec_dgl`` stays light.
"""

from __future__ import annotations

import json
import os

import numpy as np

from .errors import DataError
from .fingerprint import check_fingerprint

#: HNSW graph degree and search breadth of ``recommend(approximate=True)`` (see README, "Recommending")
HNSW_NEIGHBOURS = 32
HNSW_EF_SEARCH = 128


class Run:
    """A run folder's best checkpoint, ready to score.

    Attributes:
        dir: the run folder.
        config: its resolved :class:`~dgmrec_dgl.config.Config`.
        dataset: the dataset it was trained on (masked and imputed as in training).
        model, graph: the model (eval mode) and the graph it scores on.
    """

    def __init__(self, run_dir: str | os.PathLike, config, dataset, model, graph):
        self.dir = os.fspath(run_dir)
        self.config = config
        self.dataset = dataset
        self.model = model
        self.graph = graph
        self._user = self._item = None        # fused embeddings (torch, float32), computed once
        self._seen = None
        self._index = None

    def __repr__(self) -> str:
        return (f"Run({self.dir!r}, model={self.config.model.name}, users={self.dataset.n_users:,}, "
                f"items={self.dataset.n_items:,})")

    @property
    def metrics(self) -> dict:
        """``metrics.json``: best epoch, its valid and test metrics and ``finished`` (only that before the first
        validation; ``{}`` without the file)."""
        path = os.path.join(self.dir, "metrics.json")
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            return json.load(fh)

    # ------------------------------------------------------------------ scores
    def _tensors(self):
        if self._user is None:
            import torch

            with torch.no_grad():
                user, item = self.model.embeddings(self.graph)
            self._user, self._item = user.float().contiguous(), item.float().contiguous()
        return self._user, self._item

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """The scoring embeddings: float32 ``[n_users, d]`` and ``[n_items, d]`` (read-only views).

        A user's score for an item is the inner product of the two rows.
        """
        views = []
        for tensor in self._tensors():
            array = tensor.numpy()
            array.flags.writeable = False
            views.append(array)
        return views[0], views[1]

    def check_ids(self, ids, kind: str = "users", field: str | None = None) -> np.ndarray:
        """``ids`` as int64 ``[n]``; DataError naming ``field`` when one is not a user (item) id of the run."""
        field = field or kind
        n = self.dataset.n_users if kind == "users" else self.dataset.n_items
        array = np.asarray(ids)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise DataError(self.dir, field, f"expected a list of integer {kind[:-1]} ids, got {ids!r}",
                            f"pass integers in 0..{n - 1}")
        array = array.astype(np.int64)
        bad = array[(array < 0) | (array >= n)]
        if bad.size:
            raise DataError(self.dir, field, f"{kind[:-1]} id {bad[0]} is outside 0..{n - 1} (the run's dataset "
                            f"has {n:,} {kind})", f"pass {kind[:-1]} ids in 0..{n - 1}")
        return array

    def score(self, users, items=None) -> np.ndarray:
        """float32 ``[len(users), len(items)]`` scores (all items when ``items`` is None)."""
        user, item = self._tensors()
        u = self.check_ids(users, "users")
        rows = user[u]
        if items is None:
            return (rows @ item.T).numpy()
        return (rows @ item[self.check_ids(items, "items")].T).numpy()

    def missing(self, items) -> np.ndarray:
        """For each item, the modalities it lacks joined by ``+`` (``"image"``, ``"image+text"``, ``""``)."""
        items = np.asarray(items, dtype=np.int64)
        modalities = self.dataset.modalities
        codes = np.zeros(items.shape, dtype=np.int64)
        for bit, modality in enumerate(modalities):
            codes |= (~self.dataset.present[modality][items]).astype(np.int64) << bit
        labels = ["+".join(m for bit, m in enumerate(modalities) if code >> bit & 1)
                  for code in range(1 << len(modalities))]
        return np.asarray(labels, dtype=object)[codes]

    # ------------------------------------------------------------------ recommending
    def top_k(self, users, k: int = 20, *, exclude_seen: bool = True,
              approximate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Item ids int64 ``[n, k]`` and scores float32 ``[n, k]``, best first, for ``users``.

        ``exclude_seen`` leaves out each user's train items. A user with fewer than ``k`` candidate items
        gets item -1 and score NaN in the remaining slots. Users are scored in chunks sized by
        ``eval.budget_mb``, so no ``[n_users, n_items]`` matrix is made. ``approximate`` searches an HNSW
        inner-product index of the item embeddings (FAISS) instead of scoring every item.
        """
        if int(k) < 1:
            raise DataError(self.dir, "k", f"must be at least 1, got {k}", "ask for k >= 1 items")
        users = self.check_ids(users, "users")
        k = min(int(k), self.dataset.n_items)
        step = int(max(1, min(4096, (self.config.eval.budget_mb << 20) // (4 * self.dataset.n_items))))
        items = np.full((len(users), k), -1, dtype=np.int64)
        scores = np.full((len(users), k), np.nan, dtype=np.float32)
        search = self._approximate_chunk if approximate else self._exact_chunk
        for start in range(0, len(users), step):
            chunk = users[start:start + step]
            got_items, got_scores = search(chunk, k, exclude_seen)
            valid = np.isfinite(got_scores)
            items[start:start + len(chunk)] = np.where(valid, got_items, -1)
            scores[start:start + len(chunk)] = np.where(valid, got_scores, np.nan)
        return items, scores

    def recommend(self, users, k: int = 20, exclude_seen: bool = True, approximate: bool = False):
        """The top-``k`` items of each user as a pandas DataFrame, one row per (user, rank).

        Columns: ``user``, ``rank`` (1 = best), ``item``, ``score`` (the model's inner product) and
        ``missing`` (the modalities the item lacks, e.g. ``"image+text"``; ``""`` when it has all).
        By default each user's train items are left out (``exclude_seen=False`` keeps them); a user with
        fewer than ``k`` candidate items gets fewer rows. See :meth:`top_k` for ``approximate``.
        """
        import pandas as pd

        users = self.check_ids(users, "users")
        items, scores = self.top_k(users, k, exclude_seen=exclude_seen, approximate=approximate)
        keep = items >= 0
        rows, ranks = np.nonzero(keep)
        chosen = items[keep]
        return pd.DataFrame({"user": users[rows], "rank": ranks + 1, "item": chosen,
                             "score": scores[keep], "missing": self.missing(chosen)})

    def _seen_keys(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys ``row * n_items + item`` of the chunk's train items, and the train counts per row."""
        if self._seen is None:
            self._seen = self.dataset.train_matrix()
        sub = self._seen[users]
        counts = np.diff(sub.indptr)
        keys = np.repeat(np.arange(len(users), dtype=np.int64), counts) * self.dataset.n_items + sub.indices
        return keys, counts

    def _exact_chunk(self, users: np.ndarray, k: int, exclude_seen: bool):
        import torch

        user, item = self._tensors()
        scores = user[torch.from_numpy(users)] @ item.T
        if exclude_seen:
            keys, _ = self._seen_keys(users)
            rows, cols = np.divmod(keys, self.dataset.n_items)
            scores[torch.from_numpy(rows), torch.from_numpy(cols)] = -torch.inf
        top = torch.topk(scores, k, dim=1)
        return top.indices.numpy(), top.values.numpy()

    def _approximate_chunk(self, users: np.ndarray, k: int, exclude_seen: bool):
        user, _ = self._tensors()
        index = self._faiss_index()
        keys, counts = self._seen_keys(users) if exclude_seen else (np.empty(0, np.int64), np.zeros(1, np.int64))
        wanted = min(k + int(counts.max(initial=0)), self.dataset.n_items)   # room for the seen items to drop
        index.hnsw.efSearch = max(HNSW_EF_SEARCH, wanted)
        scores, items = index.search(user[users].numpy(), wanted)
        scores[items < 0] = -np.inf
        if len(keys):
            query = np.arange(len(users), dtype=np.int64)[:, None] * self.dataset.n_items + items
            pos = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
            scores[keys[pos] == query] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(items, order, 1), np.take_along_axis(scores, order, 1)

    def _faiss_index(self):
        if self._index is None:
            import faiss

            _, item = self._tensors()
            self._index = faiss.IndexHNSWFlat(item.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
            self._index.add(item.numpy())
        return self._index

    # ------------------------------------------------------------------ metrics
    def evaluate(self, split: str = "test", ks=None, *, progress: bool = False) -> dict[str, float]:
        """Full-ranking Recall@K / NDCG@K of the checkpoint on ``split`` (``valid`` or ``test``).

        With a missing-modality mask, adds ``<metric>/group=g``: the metric over held-out items lacking g
        modalities (the paper's Fig. 3). ``progress``: a bar over the user chunks of a long evaluation.
        """
        from .evaluate import evaluate

        user, item = self._tensors()
        groups = self.dataset.mask.n_missing() if self.dataset.mask is not None else None
        return evaluate(lambda users: user[users] @ item.T, self.dataset, split, ks or self.config.eval.ks,
                        budget_bytes=self.config.eval.budget_mb << 20, item_groups=groups,
                        masks_valid=self.config.eval.test_masks_valid, progress=progress)


def load(run_dir: str | os.PathLike) -> Run:
    """The best checkpoint of a run folder written by ``dgmrec-dgl train`` or :func:`fit`.

    Raises DataError when the folder is incomplete or a data file changed since training
    (``data_fingerprint.json``; run folders without that file load unchecked).
    """
    from .train import load_run

    check_fingerprint(run_dir)
    config, dataset, model, graph = load_run(os.fspath(run_dir))
    return Run(run_dir, config, dataset, model, graph)


def default_run_dir(config) -> str:
    """``runs/<model>-<data folder name>-seed<seed>``."""
    data_name = os.path.basename(os.path.normpath(config.data.dir))
    return os.path.join("runs", f"{config.model.name}-{data_name}-seed{config.train.seed}")


def fit(config, data: str | os.PathLike | None = None, out: str | os.PathLike | None = None, *,
        mask: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
        progress: bool = True, **overrides) -> Run:
    """Train a model and return its best checkpoint as a :class:`Run`.

    Args:
        config: a YAML file (e.g. ``configs/dgmrec/demo.yaml``) or a :class:`~dgmrec_dgl.config.Config`.
        data: the dataset folder (overrides ``data.dir``).
        out: the run folder (default ``runs/<model>-<data>-seed<seed>``).
        mask: a missing-modality mask file (overrides ``data.mask``).
        resume: continue the run in ``out`` from its last epoch (under the same config but ``train.epochs``
            and the keys of :data:`~dgmrec_dgl.run_folder.RESUMABLE_KEYS`, on the same data).
        overwrite: replace the run in ``out``: remove every file it wrote first (without ``resume`` or
            ``overwrite``, a folder holding a run's files is refused; see :mod:`dgmrec_dgl.run_folder`).
        progress: show the training progress bar.
        **overrides: config sections as dicts, e.g. ``train={"epochs": 3}, model={"knn_k": 5}``.

    The run folder also gets ``curves.png`` (:func:`dgmrec_dgl.plots.write_curves`).
    """
    from .config import Config, load_config
    from .plots import write_curves
    from .run_folder import claimed
    from .train import train

    sections = {name: dict(values) if isinstance(values, dict) else values for name, values in overrides.items()}
    if data is not None:
        sections.setdefault("data", {})["dir"] = os.fspath(data)
    if mask is not None:
        sections.setdefault("data", {})["mask"] = os.fspath(mask)
    if isinstance(config, Config):
        merged = config.to_dict()
        for name, values in sections.items():
            merged[name] = {**merged.get(name, {}), **values} if isinstance(values, dict) else values
        config = load_config(None, merged)
    else:
        config = load_config(config, sections or None)
    out = os.fspath(out) if out is not None else default_run_dir(config)
    with claimed(config, out, resume=resume, overwrite=overwrite):
        train(config, out, resume=resume, progress=progress)
        write_curves(out)
    if not os.path.exists(os.path.join(out, "best.pt")):
        raise DataError(out, "train.epochs", f"training ended before the first validation (every "
                        f"{config.train.eval_every} epochs)", "train for at least train.eval_every epochs")
    return load(out)
