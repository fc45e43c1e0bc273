"""Self-contained run folders: absolute data paths and a fingerprint of the data files a run was trained on.

``RUN/data_fingerprint.json`` records, for the interaction file, every feature file and the mask file (when
the mask is a file), its absolute path, size, modification time and a SHA-256:

* files up to :data:`FULL_HASH_BYTES` (16 MiB): the SHA-256 of the whole file;
* larger files: the SHA-256 of their first MiB and of their last MiB (hashing a 16 GB feature file would
  take minutes); a change in the middle that keeps the size is then caught only through the
  modification time, and is reported as a warning, not an error (copying a folder also changes it).

:func:`check_fingerprint` raises :class:`~dgmrec_dgl.errors.DataError` when a recorded file is gone, has
another size or another hash. Run folders written before the fingerprint existed have no such file and
are not checked. (The dataset module is imported inside the functions: ``import dgmrec_dgl`` stays light.)
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

from .errors import DataError
from .io_utils import atomic_write_json

FINGERPRINT_FILE = "data_fingerprint.json"
FULL_HASH_BYTES = 16 << 20
PART_BYTES = 1 << 20


def resolve_data_paths(config) -> None:
    """Make ``config.data.dir``, ``data.inter`` and ``data.mask`` absolute (in place), as train would read them.

    Relative paths are taken from the current folder, as ``train`` reads them; ``data.inter`` becomes the
    absolute path of the interaction file (found inside ``data.dir`` when it was a bare name, or the
    folder's only ``.inter`` file when it was unset), ``data.mask`` that of the mask file (inside
    ``data.dir`` when it is there or a bare name, :func:`~dgmrec_dgl.data.dataset.find_mask`).
    """
    from .data.dataset import _find_inter, find_mask

    data = config.data
    if not data.dir:
        raise DataError("config", "data.dir", "is empty", "pass --data DIR (or data=...) or set data.dir")
    data.dir = os.path.abspath(data.dir)
    if not os.path.isdir(data.dir):
        raise DataError(data.dir, "data.dir", "does not exist or is not a folder", "pass a dataset folder")
    data.inter = os.path.abspath(_find_inter(data.dir, data.inter))
    if data.mask:
        data.mask = os.path.abspath(find_mask(data.dir, data.mask))


def data_files(config) -> list[str]:
    """Absolute paths of the files ``config`` trains on: interactions (with a shipped new-items split, the
    full file beside it too), the feature files, the mask file."""
    from .data.dataset import FEATURE_FILES, _find_inter, find_mask
    from .data.new_items import interaction_files

    data = config.data
    files = [os.path.abspath(_find_inter(data.dir, data.inter))]
    read, _ = interaction_files(data.dir, data.inter, new_items=data.new_items, protocol=data.new_items_protocol)
    if read and os.path.abspath(read) not in files:   # a shipped <name>_del.inter is read with its full file
        files.append(os.path.abspath(read))
    for name in FEATURE_FILES.values():
        path = os.path.join(os.path.abspath(data.dir), name)
        if os.path.exists(path):
            files.append(path)
    mask = find_mask(data.dir, data.mask) if data.mask else None
    if mask and os.path.exists(mask):             # a missing mask file is train's error to report
        files.append(os.path.abspath(mask))
    return files


def file_fingerprint(path: str) -> dict:
    """Size, modification time and SHA-256 (whole file, or first + last MiB of a large one) of ``path``."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if stat.st_size <= FULL_HASH_BYTES:
            for block in iter(lambda: fh.read(PART_BYTES), b""):
                digest.update(block)
            hashed = "whole file"
        else:
            digest.update(fh.read(PART_BYTES))
            fh.seek(stat.st_size - PART_BYTES)
            digest.update(fh.read(PART_BYTES))
            hashed = "first and last MiB"
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest(), "hashed": hashed}


def write_fingerprint(config, run_dir: str | os.PathLike) -> str:
    """Write ``RUN/data_fingerprint.json`` for the data files of ``config``; returns its path."""
    path = os.path.join(run_dir, FINGERPRINT_FILE)
    atomic_write_json(path, {"files": {f: file_fingerprint(f) for f in data_files(config)}})
    return path


def check_fingerprint(run_dir: str | os.PathLike) -> None:
    """Raise DataError when a data file recorded in ``RUN/data_fingerprint.json`` changed; no file: no check."""
    path = os.path.join(run_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        return
    with open(path) as fh:
        recorded = json.load(fh)["files"]
    fix = f"restore the data the run in {os.fspath(run_dir)} was trained on, or train a new run on this data"
    for file, before in recorded.items():
        if not os.path.exists(file):
            raise DataError(file, "data file", "was used to train the run but no longer exists", fix)
        now = file_fingerprint(file)
        if now["size"] != before["size"]:
            raise DataError(file, "data file", f"changed since the run was trained (size {before['size']:,} "
                            f"-> {now['size']:,} bytes)", fix)
        if now["sha256"] != before["sha256"]:
            raise DataError(file, "data file", f"changed since the run was trained (SHA-256 of the "
                            f"{before['hashed']} differs)", fix)
        if before["hashed"] != "whole file" and now["mtime_ns"] != before["mtime_ns"]:
            warnings.warn(f"{file}: modified since the run was trained; its size and first and last MiB are "
                          "unchanged, the rest was not compared")
