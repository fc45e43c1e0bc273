"""The validated dataset every model trains on: interactions, features and missing-modality masks.

Layout (the MMRec layout the DGMRec reference reads)::

    DIR/<name>.inter        userID  itemID  x_label   (TSV; 0 train, 1 valid, 2 test)
    DIR/image_feat.npy      float [n_items, d_image]   (any subset of the feature files)
    DIR/text_feat.npy       float [n_items, d_text]
    DIR/audio_feat.npy      float [n_items, d_audio]

Protocol (reference): valid/test users without a train interaction are dropped; rows of items missing a
modality are imputed (``mean`` of the items that have it by default; ``zero``; or ``nn``, the mean over the
item's co-interaction neighbours that have it).

Memory: float32/float16 feature files stay memory-mapped (:func:`~dgmrec_dgl.data.io.load_features`); the
loader, the imputation and the optional PCA reduction (:mod:`dgmrec_dgl.data.reduce`,
:meth:`Dataset.reduced`) stream them in blocks, so a catalog of 1,000,000 items never needs its raw
matrices in RAM.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from .io import (
    FEATURE_DTYPES,
    Interactions,
    chunk_rows_for,
    copy_on_write,
    iter_row_blocks,
    load_features,
    read_inter,
    take_rows,
)
from .masks import MissingMask
from .reduce import fit_pca

#: Default feature file of each modality.
FEATURE_FILES = {"image": "image_feat.npy", "text": "text_feat.npy", "audio": "audio_feat.npy"}
IMPUTATIONS = ("mean", "zero", "nn")
#: ids are positions in tables of max id + 1 rows; ids spread further than this many times the number of
#: distinct ids are refused (a stray 1e11 in a 7,000-item file would allocate hundreds of GB)
ID_SPREAD_LIMIT = 100


@dataclass(frozen=True)
class Dataset:
    """Validated arrays of one dataset.

    Attributes:
        name: dataset name (the ``.inter`` file's stem).
        root: the folder it was read from.
        n_users, n_items: id ranges (ids are 0-based and contiguous).
        train, valid, test: int64 ``[n, 2]`` (user, item) pairs; valid/test hold only users with train data.
        modalities: names of the modalities with a feature file, canonical order (image, text, audio).
        features: modality → ``[n_items, d_m]`` float32 or float16 array; rows of items missing it are
            imputed. A float32/float16 file is its read-only memory map (its own dtype) until something
            rewrites rows: imputation (a copy-on-write map, see :meth:`with_mask`) or the reduction (a new
            ``feature_dtype`` array). Consumers needing float32 convert (``np.asarray(x, np.float32)``)
            or read blocks (:func:`~dgmrec_dgl.data.io.iter_row_blocks`).
        present: modality → bool ``[n_items]``, False where the item lacks the modality.
        mask: the missing-modality mask, or ``None`` when every item has every modality.
        new_items: int64 ids of the new items (new-items setting), else ``None``.
        new_items_protocol: how the new-items setting is run (``release`` or ``test_new_only``,
            :mod:`dgmrec_dgl.data.new_items`), else ``None``.
        imputation: how missing rows were filled (``mean``, ``zero``, ``nn``), ``None`` if nothing was.
        n_file_rows: interactions in the ``.inter`` file (after dropping duplicates, before the
            cold-user filter): the count the published statistics use.
        n_dropped_cold: valid/test rows dropped because their user has no train interaction.
        reduction: modality → what :meth:`reduced` did (``d_in``, ``d_out``, ``explained_variance``,
            ``fit_rows``, ``seed``); empty when nothing was reduced.
    """

    name: str
    root: str
    n_users: int
    n_items: int
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    modalities: tuple[str, ...] = ()
    features: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    present: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    mask: MissingMask | None = None
    new_items: np.ndarray | None = None
    new_items_protocol: str | None = None
    imputation: str | None = None
    n_file_rows: int = 0
    n_dropped_cold: int = 0
    reduction: dict[str, dict] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived views
    @property
    def n_interactions(self) -> int:
        """Interactions used: train + valid + test after the cold-user filter."""
        return len(self.train) + len(self.valid) + len(self.test)

    @property
    def sparsity(self) -> float:
        """1 − file interactions / (users × items), as the published statistics define it."""
        return 1.0 - self.n_file_rows / float(self.n_users * self.n_items)

    def train_matrix(self) -> sp.csr_matrix:
        """Binary user×item train matrix, CSR ``[n_users, n_items]`` with sorted column indices."""
        return pairs_to_csr(self.train, self.n_users, self.n_items)

    def item_train_counts(self) -> np.ndarray:
        """int64 ``[n_items]``: train interactions per item."""
        return np.bincount(self.train[:, 1], minlength=self.n_items)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        root: str | os.PathLike,
        *,
        inter: str | None = None,
        feature_files: dict[str, str] | None = None,
        mask: str | os.PathLike | MissingMask | None = None,
        allow_pickle: bool = False,
        imputation: str = "mean",
        require_features: bool = False,
        feature_dtype: str = "float32",
        reduce_dims: int | dict[str, int] | None = None,
        reduce_sample: int = 50_000,
        reduce_seed: int = 0,
    ) -> Dataset:
        """Read and validate a dataset folder.

        Args:
            root: the folder.
            inter: ``.inter`` file name inside ``root`` (or a path); default: the folder's only ``.inter``
                file, or ``<folder name>.inter``.
            feature_files: modality → file name inside ``root``; default :data:`FEATURE_FILES`. Files that do
                not exist are skipped (the modality is absent) unless named explicitly.
            mask: a mask file (``.npz``; pickled ``.npy`` with ``allow_pickle``) or a :class:`MissingMask`.
            allow_pickle: allow unpickling a ``.npy`` mask (warns).
            imputation: ``mean`` (reference default), ``zero`` or ``nn`` for rows of missing items.
            require_features: fail when no feature file exists.
            feature_dtype: ``float32`` or ``float16``: the dtype of feature matrices the loader creates (a
                float64 file's conversion, the reduced features). float32/float16 files are memory-mapped
                in their own dtype whatever this says.
            reduce_dims, reduce_sample, reduce_seed: optional PCA reduction, see :meth:`reduced`; with a
                ``mask`` it is fitted on the items the mask leaves with the modality and done before the
                imputation (same result, less memory).

        Raises:
            DataError: any invalid file (the message names the file, the field and the fix).
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(root, "folder", "does not exist or is not a folder", "pass a dataset folder")
        if imputation not in IMPUTATIONS:
            raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {imputation!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
        inter_path = _find_inter(root, inter)
        name = os.path.splitext(os.path.basename(inter_path))[0]
        records = read_inter(inter_path)

        explicit = feature_files is not None
        files = dict(FEATURE_FILES if feature_files is None else feature_files)
        paths = {m: (f if os.path.isabs(f) else os.path.join(root, f)) for m, f in files.items()}
        if not explicit:
            paths = {m: p for m, p in paths.items() if os.path.exists(p)}
        modalities = tuple(m for m in ("image", "text", "audio") if m in paths)
        if require_features and not modalities:
            raise DataError(root, "features", "no feature file found (looked for "
                            + ", ".join(FEATURE_FILES.values()) + ")", "add at least one *_feat.npy file")

        _check_id_spread(inter_path, "userID", records.users)
        if not modalities:          # else the feature files' row counts bound the item ids (load_features)
            _check_id_spread(inter_path, "itemID", records.items)
        n_users = int(records.users.max()) + 1
        n_items = int(records.items.max()) + 1
        features = {}
        for modality in modalities:
            features[modality] = load_features(paths[modality], field=f"{modality} features", n_items=n_items,
                                               dtype=feature_dtype)
        # Items may exist only in the feature files (no interaction at all).
        if features:
            n_items = max(n_items, *(f.shape[0] for f in features.values()))

        train, valid, test, dropped = _split(inter_path, records, n_users)
        dataset = cls(name=name, root=root, n_users=n_users, n_items=n_items, train=train, valid=valid,
                      test=test, modalities=modalities, features=features,
                      present={m: np.ones(n_items, dtype=bool) for m in modalities},
                      n_file_rows=len(records.users), n_dropped_cold=dropped)
        if mask is not None and not isinstance(mask, MissingMask):
            mask = MissingMask.load(mask, n_items, modalities or None, allow_pickle=allow_pickle)
        if reduce_dims is not None:
            dataset = dataset.reduced(reduce_dims, sample=reduce_sample, seed=reduce_seed, dtype=feature_dtype,
                                      mask=mask)
        if mask is not None:
            dataset = dataset.with_mask(mask, allow_pickle=allow_pickle, imputation=imputation)
        return dataset

    def without_features(self) -> Dataset:
        """A copy without the feature matrices (``features`` empty; ``modalities`` and ``present`` kept).

        For holding on to the interactions once a model has made its own copy of the features, so that the
        matrices and memory maps can be released: at 1M items with 256 + 384 float16 dims that is 1.3 GB
        of resident memory (the imputed rows plus the file pages the copy read).
        """
        return replace(self, features={})

    def with_mask(self, mask: str | os.PathLike | MissingMask, *, allow_pickle: bool = False,
                  imputation: str = "mean") -> Dataset:
        """A copy in which the items of ``mask`` lack their modalities, their feature rows imputed.

        Memory (per modality): when no item lacks the modality the matrix is passed on as it is (a memory
        map stays a map). Otherwise the imputed rows must be written somewhere, once:

        * a read-only memory-mapped file is re-mapped copy-on-write (``mode="c"``; the file is never
          modified): only the pages holding imputed rows become private memory, about
          ``n_missing × d × itemsize`` bytes (whole 4 KB pages; at most the matrix's size), in the
          file's dtype;
        * an in-memory array is copied once (``n_items × d × itemsize`` bytes), in its dtype.

        The mean, and the neighbour rows of ``nn``, are accumulated block by block in float64: no copy of
        the present rows is made. In the release's new-items setting the mean is over the old items that
        have the modality (the release's imputation leaves the new items out). Reduce wide features first (:meth:`reduced` with ``mask=``, or
        :meth:`load` with ``reduce_dims``) to impute in the narrow space instead.
        """
        if imputation not in IMPUTATIONS:
            raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {imputation!r}")
        if not isinstance(mask, MissingMask):
            mask = MissingMask.load(mask, self.n_items, self.modalities or None, allow_pickle=allow_pickle)
        elif mask.n_items != self.n_items:
            raise ValueError(f"mask covers {mask.n_items} items, dataset has {self.n_items}")
        present = {m: ~mask.missing(m) for m in self.modalities}
        old = np.ones(self.n_items, dtype=bool)
        if self.new_items is not None and self.new_items_protocol == "release":
            old[self.new_items] = False
        features = {}
        for modality in self.modalities:
            if not (present[modality] & old).any():
                raise DataError(self.root, f"{modality} mask",
                                "every item lacks this modality, so nothing can be imputed",
                                "use a mask that leaves some items with the modality")
            features[modality] = _impute(self.features[modality], present[modality], imputation,
                                         self.train_matrix() if imputation == "nn" else None,
                                         mean_of=present[modality] & old)
        return replace(self, mask=mask, present=present, features=features,
                       imputation=imputation if self.modalities else None)

    def reduced(self, dims: int | dict[str, int] | None, *, sample: int = 50_000, seed: int = 0,
                dtype: str = "float32", mask: MissingMask | None = None) -> Dataset:
        """A copy whose wide feature matrices are replaced by their PCA projection (:mod:`.reduce`).

        Args:
            dims: ``None`` → ``self`` unchanged; an int → every modality wider than it is reduced to it
                (``DataConfig.reduce_dims``); a dict → modality → output width (modalities not named, or
                not wider, are kept).
            sample: rows of the fit (items that have the modality), default 50,000.
            seed: seeds the fit's sample and random projection.
            dtype: ``float32`` or ``float16``, the dtype of the reduced matrices.
            mask: fit on the items this mask leaves with the modality instead of ``self.present`` (to
                reduce *before* :meth:`with_mask`; the map is linear, so imputing after reducing equals
                reducing the imputed rows).

        Every row is projected, block by block (imputed rows too). Memory per reduced modality: the
        output ``n_items × d_out × itemsize``, the fit sample ``sample × d_in × 4`` bytes and one block.
        What was done is recorded in ``reduction`` (modality → ``d_in``, ``d_out``,
        ``explained_variance``, ``fit_rows``, ``seed``).
        """
        if dims is None:
            return self
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
        if isinstance(dims, dict):
            unknown = sorted(set(dims) - set(self.modalities))
            if unknown:
                raise ValueError(f"reduce_dims names modalities {unknown} the dataset does not have "
                                 f"(it has {list(self.modalities)})")
            targets = {m: int(d) for m, d in dims.items()}
        else:
            targets = {m: int(dims) for m in self.modalities}
        if any(d < 1 for d in targets.values()):
            raise ValueError(f"reduce_dims must be >= 1, got {dims!r}")
        if sample < 1:
            raise ValueError(f"reduce_sample must be >= 1, got {sample}")
        features, reduction = dict(self.features), dict(self.reduction)
        for m, d_out in targets.items():
            x = self.features[m]
            if x.shape[1] <= d_out:
                continue
            present = ~mask.missing(m) if mask is not None and m in mask.modalities else self.present[m]
            pca = fit_pca(x, d_out, present=present, sample=sample, seed=seed)
            features[m] = pca.transform(x, dtype=np.dtype(dtype))
            reduction[m] = pca.info()
        return replace(self, features=features, reduction=reduction)


# ---------------------------------------------------------------------- helpers
def pairs_to_csr(pairs: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary CSR ``[n_users, n_items]`` of (user, item) pairs (repeats count once), sorted column indices."""
    data = np.ones(len(pairs), dtype=np.float32)
    mat = sp.csr_matrix((data, (pairs[:, 0], pairs[:, 1])), shape=(n_users, n_items))
    mat.sum_duplicates()
    mat.data[:] = 1.0
    mat.sort_indices()
    return mat


def _find_inter(root: str, inter: str | None) -> str:
    if inter is not None:
        path = os.path.join(root, inter)
        if not os.path.exists(path) and os.path.exists(inter):
            path = inter
        if not os.path.exists(path):
            raise DataError(path, "file", "does not exist", f"name an .inter file inside {root}")
        return path
    candidates = sorted(glob.glob(os.path.join(root, "*.inter")))
    named = os.path.join(root, os.path.basename(os.path.normpath(root)) + ".inter")
    if named in candidates:
        return named
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(root, "inter", "no .inter file in the folder",
                        "add <name>.inter (userID, itemID, x_label) or pass --inter")
    raise DataError(root, "inter", f"several .inter files ({', '.join(map(os.path.basename, candidates))})",
                    "choose one with --inter FILE")


def find_mask(root: str, mask: str) -> str:
    """The path of the mask file ``mask`` (``data.mask``) of the dataset folder ``root``.

    ``mask`` names a file inside ``root`` when it is there, or is a bare file name (so a config can say
    ``mask: missing_items_0.666.npz`` and follow ``--data``); else it is a path as given (absolute, or
    relative to the current folder).
    """
    inside = os.path.join(root, mask)
    if os.path.exists(inside) or (os.path.basename(mask) == mask and not os.path.exists(mask)):
        return inside
    return mask


def _check_id_spread(path: str, column: str, ids: np.ndarray) -> None:
    """Refuse ids whose largest is more than :data:`ID_SPREAD_LIMIT` times the number of distinct ids."""
    largest, distinct = int(ids.max()), np.unique(ids).size
    if largest + 1 > ID_SPREAD_LIMIT * distinct:
        raise DataError(path, column, f"id {largest} is far beyond the {distinct:,} distinct ids (tables of "
                        f"{largest + 1:,} rows would be allocated, over {ID_SPREAD_LIMIT} x the ids in use)",
                        "re-index the ids to 0..n-1")


def _split(path: str, records: Interactions, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Train/valid/test pairs, with valid/test users lacking train data dropped (reference protocol)."""
    train = records.split(0)
    if len(train) == 0:
        raise DataError(path, "x_label", "no row has x_label 0, so the train split is empty",
                        "mark the training interactions with x_label 0")
    has_train = np.zeros(n_users, dtype=bool)
    has_train[train[:, 0]] = True
    valid, test = records.split(1), records.split(2)
    keep_valid, keep_test = has_train[valid[:, 0]], has_train[test[:, 0]]
    dropped = int((~keep_valid).sum() + (~keep_test).sum())
    return train, valid[keep_valid], test[keep_test], dropped


def _writable_copy(features: np.ndarray) -> np.ndarray:
    """A writable twin of ``features``: a copy-on-write map of its file when it is one, else one copy."""
    twin = copy_on_write(features)
    return twin if twin is not None else np.array(features, copy=True)


def _present_mean(features: np.ndarray, present: np.ndarray) -> np.ndarray:
    """float64 ``[d]``: mean of the rows where ``present``, accumulated block by block."""
    total = np.zeros(features.shape[1], dtype=np.float64)
    for start, block in iter_row_blocks(features):
        keep = present[start:start + len(block)]
        total += block[keep].sum(axis=0, dtype=np.float64)
    return total / max(int(present.sum()), 1)


def _neighbour_sums(features: np.ndarray, co: sp.csr_matrix) -> np.ndarray:
    """float64 ``co @ features`` ``[len(co), d]``, reading only the rows of ``features`` that ``co`` uses."""
    cols, compact = np.unique(co.indices, return_inverse=True)
    by_col = sp.csr_matrix((co.data.astype(np.float64), compact.ravel(), co.indptr),
                           shape=(co.shape[0], cols.size)).tocsc()
    out = np.zeros((co.shape[0], features.shape[1]), dtype=np.float64)
    step = chunk_rows_for(features.shape[1], 8)
    for start in range(0, cols.size, step):
        rows = take_rows(features, cols[start:start + step], np.float64)
        out += by_col[:, start:start + step] @ rows
    return out


def _impute(features: np.ndarray, present: np.ndarray, how: str, train: sp.csr_matrix | None,
            mean_of: np.ndarray | None = None) -> np.ndarray:
    """Fill the rows of items lacking the modality (memory: see :meth:`Dataset.with_mask`).

    ``mean_of`` (bool ``[n_items]``, default ``present``): the rows averaged into the mean.
    Returns ``features`` itself when no row lacks the modality, else a writable twin (same dtype) with
    the missing rows filled.
    """
    lacks = np.flatnonzero(~present)
    if lacks.size == 0:
        return features
    mean = _present_mean(features, present if mean_of is None else mean_of)
    out = _writable_copy(features)
    if how == "zero":
        out[lacks] = 0.0
    elif how == "mean":
        out[lacks] = mean.astype(out.dtype)
    else:  # nn: mean over co-interaction neighbours (items sharing a train user) that have the modality
        item_user = train.T.tocsr()                     # [n_items, n_users]; train is [n_users, n_items] CSR
        keep = sp.diags(present.astype(np.float32))
        step = min(4096, chunk_rows_for(features.shape[1], 8))
        for start in range(0, lacks.size, step):
            rows = lacks[start:start + step]
            co = (item_user[rows] @ train @ keep).tocsr()   # [chunk, n_items] co-interaction counts
            co.eliminate_zeros()
            co.data[:] = 1.0
            n_nb = np.diff(co.indptr)
            summed = _neighbour_sums(features, co)
            filled = np.where(n_nb[:, None] > 0, summed / np.maximum(n_nb, 1)[:, None], mean)
            out[rows] = filled.astype(out.dtype)
    return out
