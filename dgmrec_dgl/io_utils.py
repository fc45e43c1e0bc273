"""Atomic writes: results and checkpoints are written to a temporary file and renamed into place."""

from __future__ import annotations

import json
import os
import shutil
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


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: list[str] | tuple[str, ...] = ()):
    """Yield a temporary folder beside ``path`` to fill; on success move what it holds into ``path``.

    A new ``path`` is the temporary folder renamed (all or nothing). An existing ``path`` first loses the
    entries named in ``replace`` (what an earlier write put there), then gets each entry renamed into it;
    other entries are kept. On failure the temporary folder is deleted and ``path`` is untouched. The
    folder gets the mode ``os.makedirs`` would give (``mkdtemp`` makes 0700).
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_current_umask())
        yield tmp
        if not os.path.exists(path):
            os.replace(tmp, path)
            return
        for entry in replace:
            old = os.path.join(path, entry)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old)
            elif os.path.lexists(old):
                os.unlink(old)
        for entry in sorted(os.listdir(tmp)):
            os.replace(os.path.join(tmp, entry), os.path.join(path, entry))
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)


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
