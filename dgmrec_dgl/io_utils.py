"""Atomic writes: results and checkpoints are written to a temporary file and renamed into place."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

#: how :func:`atomic_path` names its temporary files (``.tmp-XXXXXXXX<suffix>`` beside the target); a write
#: killed before its rename leaves one behind (:func:`stale_temporaries`)
TEMP_PREFIX = ".tmp-"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the mode open() would have
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Paths of the temporary files that killed atomic writes left in ``folder``."""
    folder = os.fspath(folder)
    return sorted(os.path.join(folder, name) for name in os.listdir(folder)
                  if name.startswith(TEMP_PREFIX) and os.path.isfile(os.path.join(folder, name)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
