"""Readers for the MMRec layout: ``<name>.inter`` TSV files and ``*_feat.npy`` feature matrices.

Every reader validates what it returns and raises :class:`~dgmrec_dgl.errors.DataError` (file, field,
fix) for bad input, so the CLI can report one line and exit with status 2.
"""

from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import DataError

INTER_COLUMNS = ("userID", "itemID", "x_label")
SPLITS = {0: "train", 1: "valid", 2: "test"}
#: ids must be below this: tables of n_users / n_items rows are indexed with int32 in places (DGL graphs)
#: and an id of 1e11 would make the loader allocate arrays of that length
ID_LIMIT = 2**31
#: the first bytes of a .npy file (numpy.lib.format) and of a pickle of protocol 2 or later
NPY_MAGIC = b"\x93NUMPY"
PICKLE_MAGIC = b"\x80"


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
    huge = numeric >= ID_LIMIT
    if huge.any():
        row = int(np.flatnonzero(huge.to_numpy())[0])
        raise DataError(
            path, column, f"value {values.iloc[row]} on data line {row + 1} is not below 2**31 = {ID_LIMIT:,}",
            "use 0 for train, 1 for valid and 2 for test" if column == "x_label" else "re-index the ids to 0..n-1",
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
        DataError: unreadable file, missing column, non-integer, negative or >= 2**31 id, label outside {0, 1, 2}.
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
    pickled = DataError(path, field, "holds pickled Python objects, which are not loaded (a pickle can run code)",
                        "save a plain numeric array with numpy.save(path, array)")
    try:
        with open(path, "rb") as handle:
            start = handle.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise DataError(path, field, "file does not exist", "check the path or the feature file name") from None
    except OSError as exc:
        raise DataError(path, field, f"is unreadable ({exc})", "check the file's permissions") from None
    if start.startswith(PICKLE_MAGIC):
        raise pickled
    if start != NPY_MAGIC:
        raise DataError(path, field, "is not a .npy file (it does not begin with the NumPy header)",
                        "save the array with numpy.save")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:
        # numpy refuses object arrays as "Object arrays cannot be loaded when allow_pickle=False" and, when
        # memory-mapping, as "Array can't be memory-mapped: Python objects in dtype"
        if "object" in str(exc).lower():
            raise pickled from None
        raise DataError(path, field, f"is truncated or not a valid .npy file ({exc})",
                        "re-create it with numpy.save") from None
    except (OSError, EOFError) as exc:
        raise DataError(path, field, f"is unreadable or truncated ({exc})", "re-create it with numpy.save") from None
    return array


#: On-disk feature dtypes that are memory-mapped and passed on as they are (either byte order).
MAPPED_FEATURE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
#: Dtypes the data path may create feature matrices in (``DataConfig.feature_dtype``).
FEATURE_DTYPES = ("float32", "float16")
#: Bytes of one block when feature rows are streamed (validation, means, projections).
CHUNK_BYTES = 32 << 20


def chunk_rows_for(width: int, itemsize: int = 4, budget: int = CHUNK_BYTES) -> int:
    """Rows of a ``[rows, width]`` block of ``itemsize``-byte numbers that fit in ``budget`` bytes (>= 1)."""
    return max(1, budget // max(1, width * itemsize))


def _mapped_file(x: np.ndarray) -> mmap.mmap | None:
    """The ``mmap`` under ``x`` when ``x`` is a whole, read-only ``np.memmap`` of a file, else None.

    Pages of such a map are clean and shared with the page cache, so after a block has been read they
    can be dropped from the process (``MADV_DONTNEED``) and re-read later if needed. A copy-on-write map
    (``mode="c"``) is excluded: dropping its pages would discard the rows written into it.
    """
    if (isinstance(x, np.memmap) and isinstance(x.base, mmap.mmap) and x.mode == "r" and x.ndim == 2
            and hasattr(mmap, "MADV_DONTNEED")):
        return x.base
    return None


def _release_rows(x: np.ndarray, mapped: mmap.mmap, first: int, stop: int) -> None:
    """Drop the pages of rows ``first..stop-1`` of the read-only map ``x`` from the process's RSS."""
    start = int(x.offset) % mmap.ALLOCATIONGRANULARITY          # where the array begins inside ``mapped``
    row_bytes = int(x.itemsize * x.shape[1])
    if not x.flags.c_contiguous:                                # Fortran order: rows are not contiguous
        first, stop, row_bytes = 0, 1, x.nbytes                 # (dropping everything is harmless)
    lo = (start + first * row_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = min(len(mapped), start + stop * row_bytes)
    if hi > lo:
        mapped.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def iter_row_blocks(x: np.ndarray, chunk_rows: int | None = None):
    """Yield ``(start, x[start:start + rows])`` over the row blocks of a 2-D array (views, no copies).

    For a read-only memory-mapped ``.npy`` file the pages of each block are dropped from the process once
    the next block is requested (they stay in the page cache), so streaming the whole matrix costs one
    block of RSS, not the file's size. Default block: :data:`CHUNK_BYTES`.
    """
    n, d = x.shape
    rows = chunk_rows or chunk_rows_for(d, x.dtype.itemsize)
    mapped = _mapped_file(x)
    for start in range(0, n, rows):
        yield start, x[start:start + rows]
        if mapped is not None:
            _release_rows(x, mapped, start, min(n, start + rows))


def take_rows(x: np.ndarray, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
    """``x[ids]`` as a new ``dtype`` array, gathered in blocks; a read-only map keeps no pages afterwards.

    ``ids`` should be sorted (reads then go forward through the file).
    """
    ids = np.asarray(ids, dtype=np.int64)
    out = np.empty((ids.size, x.shape[1]), dtype=dtype)
    mapped = _mapped_file(x)
    step = chunk_rows_for(x.shape[1], max(x.dtype.itemsize, out.dtype.itemsize))
    for start in range(0, ids.size, step):
        part = ids[start:start + step]
        out[start:start + part.size] = x[part]
        if mapped is not None and part.size:
            _release_rows(x, mapped, int(part.min()), int(part.max()) + 1)
    return out


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def copy_on_write(x: np.ndarray) -> np.memmap | None:
    """A writable copy-on-write map (``mode="c"``) of the file under the read-only map ``x``, or None.

    Writing into it makes private copies of the written pages only; the file is never modified. None
    when ``x`` is not a map made by :func:`load_features` or when its file has been replaced or changed
    since (the new map would show other data than ``x``).
    """
    known = getattr(x, "file_identity", None)
    if known is None or not isinstance(x, np.memmap) or not isinstance(x.base, mmap.mmap):
        return None
    try:
        with open(x.filename, "rb") as handle:
            if _identity(os.fstat(handle.fileno())) != known:
                return None
            order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
            return np.memmap(handle, dtype=x.dtype, mode="c", offset=x.offset, shape=x.shape, order=order)
    except OSError:
        return None


def _first_non_finite(block: np.ndarray) -> int | None:
    """Row index of the first non-finite value in ``block`` (row-major scan), or None."""
    finite = np.isfinite(block)
    if finite.all():
        return None
    return int(np.argwhere(~finite)[0, 0])


def _non_finite(path: str, field: str, row: int, extra: str = "") -> DataError:
    return DataError(path, field, f"row {row} (item {row}) holds NaN or Inf{extra}",
                     "replace non-finite values, or mark the item's modality as missing in a mask file")


def load_features(path: str | os.PathLike, *, field: str, n_items: int, chunk_rows: int | None = None,
                  dtype: str = "float32") -> np.ndarray:
    """Open one modality's feature matrix ``[n_items, d]`` and check it, without reading it all into RAM.

    * **float32 or float16 on disk** (either byte order): returned as the read-only memory map of the file
      itself (``np.load(..., mmap_mode="r")``), in its own dtype: no copy. The NaN/Inf check streams the
      file in blocks of :data:`CHUNK_BYTES` (or ``chunk_rows`` rows) and drops each block's pages from
      the process after checking it, so it costs one block of RSS. Consumers that need float32 convert
      (their own copy, or block by block with :func:`iter_row_blocks`).
    * **float64** (or wider) is accepted with a warning: memory-mapping it would make every consumer
      convert, so it is converted once, block by block, into an in-memory ``dtype`` array
      (``n_items × d × 4`` bytes for float32; peak = that array + one block). Saving the file as float32
      or float16 avoids the copy.
    * integer, bool, complex or structured dtypes are refused: features must be floating point.

    A Fortran-ordered file is memory-mapped too; its check goes through the map, column block by block.

    Args:
        path: the ``.npy`` file.
        field: what the file holds, for messages (``"image features"``).
        n_items: expected number of rows.
        chunk_rows: rows per checked block (default: :data:`CHUNK_BYTES` worth).
        dtype: ``float32`` or ``float16``: the dtype a float64 file is converted to.

    Raises:
        DataError: unreadable/truncated file, wrong rank, row count or width 0, non-float dtype, NaN or Inf
            (also a float64 value that overflows ``dtype``).
    """
    path = os.fspath(path)
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {FEATURE_DTYPES}, got {dtype!r}")
    raw = load_npy(path, field=field, mmap=True)
    if raw.ndim != 2:
        raise DataError(path, field, f"has shape {raw.shape}, expected [n_items, dim]",
                        "save a 2-D array with one row per item")
    if raw.shape[1] == 0:
        raise DataError(path, field, f"has shape {raw.shape}: its rows are empty (width 0)",
                        "save at least one feature column per item, or remove the file if the modality is absent")
    if raw.shape[0] != n_items:
        raise DataError(
            path, field, f"has {raw.shape[0]} rows but the interactions have {n_items} items",
            "write one feature row per item id 0..n_items-1 (in item id order)",
        )
    if raw.dtype.kind != "f":
        raise DataError(path, field, f"has dtype {raw.dtype}; features must be float32 or float16",
                        "save the matrix as floats, e.g. numpy.save(path, x.astype(numpy.float32))")
    if raw.dtype.newbyteorder("=") in MAPPED_FEATURE_DTYPES:
        if raw.flags.c_contiguous:
            for start, block in iter_row_blocks(raw, chunk_rows):
                row = _first_non_finite(block)
                if row is not None:
                    raise _non_finite(path, field, start + row)
        else:  # Fortran order: each column is contiguous, so check column blocks through the map
            step = chunk_rows_for(n_items, raw.dtype.itemsize)
            rows = [np.flatnonzero(~np.isfinite(raw[:, c:c + step]).all(axis=1)) for c in
                    range(0, raw.shape[1], step)]
            bad = [int(r[0]) for r in rows if r.size]
            if bad:
                raise _non_finite(path, field, min(bad))
        raw.file_identity = _identity(os.stat(path))     # lets copy_on_write() re-map this very file
        return raw
    target = np.dtype(dtype)
    warnings.warn(
        f"{path}: {field}: dtype {raw.dtype} is converted to {target} in memory "
        f"({raw.shape[0] * raw.shape[1] * target.itemsize / 2**20:,.0f} MB) instead of being memory-mapped; "
        f"save it as float32 or float16 to avoid the copy", stacklevel=2)
    out = np.empty(raw.shape, dtype=target)
    for start, block in iter_row_blocks(raw, chunk_rows):
        row = _first_non_finite(block)
        if row is not None:
            raise _non_finite(path, field, start + row)
        with np.errstate(over="ignore"):
            converted = block.astype(target)
        row = _first_non_finite(converted)
        if row is not None:
            raise _non_finite(path, field, start + row, f" after conversion to {target} (a value is too large)")
        out[start:start + len(block)] = converted
    return out
