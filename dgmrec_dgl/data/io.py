"""Readers for the MMRec layout: ``<name>.inter`` TSV files and ``*_feat.npy`` feature matrices.

Every reader validates what it returns and raises :class:`~dgmrec_dgl.errors.DataError` (file, field,
fix) for bad input, so the CLI can report one line and exit with status 2.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DataError

INTER_COLUMNS = ("userID", "itemID", "x_label")
SPLITS = {0: "train", 1: "valid", 2: "test"}


@dataclass(frozen=True)
class Interactions:
    """Validated interactions of one ``.inter`` file.

    Attributes:
        users, items: int64 ``[n]`` ids (0-based).
        labels: int8 ``[n]`` split labels, 0 train, 1 valid, 2 test.
        n_duplicates: rows dropped because the same (user, item) pair appeared before.
    """

    users: np.ndarray
    items: np.ndarray
    labels: np.ndarray
    n_duplicates: int = 0

    def split(self, label: int) -> np.ndarray:
        """``[n_split, 2]`` int64 (user, item) pairs of one split."""
        keep = self.labels == label
        return np.stack([self.users[keep], self.items[keep]], axis=1)


def _integer_column(path: str, frame: pd.DataFrame, column: str) -> np.ndarray:
    values = frame[column]
    numeric = pd.to_numeric(values, errors="coerce")
    bad = numeric.isna() | (numeric != np.floor(numeric))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            path, column, f"value {values.iloc[row]!r} on data line {row + 1} is not an integer id",
            "ids must be 0-based integers; re-export the file with integer ids",
        )
    ids = numeric.to_numpy(dtype=np.int64)
    if ids.size and ids.min() < 0:
        row = int(np.argmax(ids < 0))
        raise DataError(
            path, column, f"negative id {ids[row]} on data line {row + 1}",
            "ids must be 0-based non-negative integers; re-index the file",
        )
    return ids


def read_inter(path: str | os.PathLike) -> Interactions:
    """Read and validate a ``userID itemID x_label`` TSV file.

    Duplicate (user, item) pairs keep their first row and are reported with a warning.

    Raises:
        DataError: unreadable file, missing column, non-integer or negative id, label outside {0, 1, 2}.
    """
    path = os.fspath(path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise DataError(path, "file", "does not exist", "pass the path of an existing .inter file") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(
            path, "file", f"cannot be parsed as TSV ({type(exc).__name__})",
            "write a tab-separated file with the header userID, itemID, x_label",
        ) from None
    missing = [c for c in INTER_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(
            path, missing[0], f"column is missing (found columns {list(frame.columns)})",
            "the header must name the tab-separated columns userID, itemID, x_label",
        )
    users = _integer_column(path, frame, "userID")
    items = _integer_column(path, frame, "itemID")
    labels = _integer_column(path, frame, "x_label")
    outside = ~np.isin(labels, list(SPLITS))
    if outside.any():
        row = int(np.argmax(outside))
        raise DataError(
            path, "x_label", f"value {labels[row]} on data line {row + 1} is not 0, 1 or 2",
            "use 0 for train, 1 for valid and 2 for test",
        )
    if users.size == 0:
        raise DataError(path, "file", "holds no interactions", "add rows below the header")

    # Drop repeated (user, item) pairs, keeping the first occurrence.
    key = users * (int(items.max()) + 1) + items
    _, first = np.unique(key, return_index=True)
    n_duplicates = users.size - first.size
    if n_duplicates:
        warnings.warn(f"{path}: dropped {n_duplicates} duplicate (userID, itemID) rows, kept the first of each",
                      stacklevel=2)
        first.sort()
        users, items, labels = users[first], items[first], labels[first]
    return Interactions(users, items, labels.astype(np.int8), int(n_duplicates))


def load_npy(path: str | os.PathLike, *, field: str, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` array without pickles, turning every failure into a :class:`DataError`."""
    path = os.fspath(path)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(path, field, "file does not exist", "check the path or the feature file name") from None
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(
                path, field, "holds pickled Python objects, which are not loaded (a pickle can run code)",
                "save a plain numeric array with numpy.save(path, array)",
            ) from None
        raise DataError(path, field, f"is truncated or not a valid .npy file ({exc})",
                        "re-create it with numpy.save") from None
    except (OSError, EOFError) as exc:
        raise DataError(path, field, f"is unreadable or truncated ({exc})", "re-create it with numpy.save") from None
    return array


def load_features(path: str | os.PathLike, *, field: str, n_items: int, chunk_rows: int = 65536) -> np.ndarray:
    """Load one modality's feature matrix as float32 ``[n_items, d]`` and check it.

    The file is memory-mapped and converted chunk by chunk, so the check of a large matrix needs no
    second copy.

    Raises:
        DataError: unreadable/truncated file, wrong rank or row count, non-numeric dtype, NaN or Inf.
    """
    path = os.fspath(path)
    raw = load_npy(path, field=field, mmap=True)
    if raw.ndim != 2:
        raise DataError(path, field, f"has shape {raw.shape}, expected [n_items, dim]",
                        "save a 2-D array with one row per item")
    if raw.shape[0] != n_items:
        raise DataError(
            path, field, f"has {raw.shape[0]} rows but the interactions have {n_items} items",
            "write one feature row per item id 0..n_items-1 (in item id order)",
        )
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)):
        raise DataError(path, field, f"has dtype {raw.dtype}, expected numbers", "save a float32 array")
    out = np.empty(raw.shape, dtype=np.float32)
    for start in range(0, n_items, chunk_rows):
        block = np.asarray(raw[start:start + chunk_rows], dtype=np.float32)
        finite = np.isfinite(block)
        if not finite.all():
            row = start + int(np.argwhere(~finite)[0, 0])
            raise DataError(
                path, field, f"row {row} (item {row}) holds NaN or Inf",
                "replace non-finite values, or mark the item's modality as missing in a mask file",
            )
        out[start:start + chunk_rows] = block
    return out
