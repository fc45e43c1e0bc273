"""The validated dataset every model trains on: interactions, features and missing-modality masks.

Layout (the MMRec layout the DGMRec reference reads)::

    DIR/<name>.inter        userID  itemID  x_label   (TSV; 0 train, 1 valid, 2 test)
    DIR/image_feat.npy      float [n_items, d_image]   (any subset of the feature files)
    DIR/text_feat.npy       float [n_items, d_text]
    DIR/audio_feat.npy      float [n_items, d_audio]

Protocol (reference): valid/test users without a train interaction are dropped; rows of items missing a
modality are imputed (``mean`` of the items that have it by default; ``zero``; or ``nn``, the mean over the
item's co-interaction neighbours that have it).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.sparse as sp

from ..errors import DataError
from .io import Interactions, load_features, read_inter
from .masks import MissingMask

#: Default feature file of each modality.
FEATURE_FILES = {"image": "image_feat.npy", "text": "text_feat.npy", "audio": "audio_feat.npy"}
IMPUTATIONS = ("mean", "zero", "nn")


@dataclass(frozen=True)
class Dataset:
    """Validated arrays of one dataset.

    Attributes:
        name: dataset name (the ``.inter`` file's stem).
        root: the folder it was read from.
        n_users, n_items: id ranges (ids are 0-based and contiguous).
        train, valid, test: int64 ``[n, 2]`` (user, item) pairs; valid/test hold only users with train data.
        modalities: names of the modalities with a feature file, canonical order (image, text, audio).
        features: modality → float32 ``[n_items, d_m]``; rows of items missing it are imputed.
        present: modality → bool ``[n_items]``, False where the item lacks the modality.
        mask: the missing-modality mask, or ``None`` when every item has every modality.
        new_items: int64 ids of the new items (new-items setting), else ``None``.
        imputation: how missing rows were filled (``mean``, ``zero``, ``nn``), ``None`` if nothing was.
        n_file_rows: interactions in the ``.inter`` file (after dropping duplicates, before the
            cold-user filter): the count the published statistics use.
        n_dropped_cold: valid/test rows dropped because their user has no train interaction.
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
    imputation: str | None = None
    n_file_rows: int = 0
    n_dropped_cold: int = 0

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

        Raises:
            DataError: any invalid file (the message names the file, the field and the fix).
        """
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DataError(root, "folder", "does not exist or is not a folder", "pass a dataset folder")
        if imputation not in IMPUTATIONS:
            raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {imputation!r}")
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

        n_users = int(records.users.max()) + 1
        n_items = int(records.items.max()) + 1
        features = {}
        for modality in modalities:
            features[modality] = load_features(paths[modality], field=f"{modality} features", n_items=n_items)
        # Items may exist only in the feature files (no interaction at all).
        if features:
            n_items = max(n_items, *(f.shape[0] for f in features.values()))

        train, valid, test, dropped = _split(inter_path, records, n_users)
        dataset = cls(name=name, root=root, n_users=n_users, n_items=n_items, train=train, valid=valid,
                      test=test, modalities=modalities, features=features,
                      present={m: np.ones(n_items, dtype=bool) for m in modalities},
                      n_file_rows=len(records.users), n_dropped_cold=dropped)
        if mask is not None:
            dataset = dataset.with_mask(mask, allow_pickle=allow_pickle, imputation=imputation)
        return dataset

    def with_mask(self, mask: str | os.PathLike | MissingMask, *, allow_pickle: bool = False,
                  imputation: str = "mean") -> Dataset:
        """A copy in which the items of ``mask`` lack their modalities, their feature rows imputed."""
        if imputation not in IMPUTATIONS:
            raise ValueError(f"imputation must be one of {IMPUTATIONS}, got {imputation!r}")
        if not isinstance(mask, MissingMask):
            mask = MissingMask.load(mask, self.n_items, self.modalities or None, allow_pickle=allow_pickle)
        elif mask.n_items != self.n_items:
            raise ValueError(f"mask covers {mask.n_items} items, dataset has {self.n_items}")
        present = {m: ~mask.missing(m) for m in self.modalities}
        features = {}
        for modality in self.modalities:
            lacks = ~present[modality]
            if lacks.all():
                raise DataError(self.root, f"{modality} mask",
                                "every item lacks this modality, so nothing can be imputed",
                                "use a mask that leaves some items with the modality")
            features[modality] = _impute(self.features[modality], present[modality], imputation,
                                         self.train_matrix() if imputation == "nn" else None)
        return replace(self, mask=mask, present=present, features=features,
                       imputation=imputation if self.modalities else None)


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


def _impute(features: np.ndarray, present: np.ndarray, how: str, train: sp.csr_matrix | None) -> np.ndarray:
    """Fill the rows of items lacking the modality. Returns a new float32 ``[n_items, d]`` array."""
    out = features.copy()
    lacks = np.flatnonzero(~present)
    if lacks.size == 0:
        return out
    mean = features[present].mean(axis=0, dtype=np.float64).astype(np.float32)
    if how == "zero":
        out[lacks] = 0.0
    elif how == "mean":
        out[lacks] = mean
    else:  # nn: mean over co-interaction neighbours (items sharing a train user) that have the modality
        item_user = train.T.tocsr()                     # [n_items, n_users]
        have = item_user[np.flatnonzero(present)]       # rows of items with the modality
        sources = np.flatnonzero(present)
        for start in range(0, lacks.size, 4096):
            rows = lacks[start:start + 4096]
            co = (item_user[rows] @ have.T).tocsr()     # [chunk, n_present] co-interaction counts
            co.data[:] = 1.0
            n_nb = np.asarray(co.sum(axis=1)).ravel()
            summed = co @ features[sources]
            filled = np.where(n_nb[:, None] > 0, summed / np.maximum(n_nb, 1)[:, None], mean)
            out[rows] = filled.astype(np.float32)
    return out
