"""Run folders owned by one training: never silently overwritten, shared or resumed under another config.

``dgmrec-dgl train --out DIR`` and :func:`dgmrec_dgl.fit` train inside :func:`claimed`, which, before the
run writes anything:

* locks the folder for the whole run: ``fcntl.flock`` on ``DIR/train.lock``, which holds the PID of the
  trainer; a second trainer on the folder stops, naming that PID;
* removes the temporary files that killed atomic writes left (``.tmp-*``, :mod:`dgmrec_dgl.io_utils`);
* refuses a folder holding any file a run writes (:data:`RUN_FILES`) unless ``resume`` (continue that run)
  or ``overwrite`` (remove those files first; other files in the folder stay);
* for ``resume``, requires a checkpoint, the run's config (any key but :data:`RESUMABLE_KEYS`) and its data
  (``data_fingerprint.json``); otherwise fingerprints the data into the folder (and removes that fingerprint
  again when the run stops before writing anything else, say on bad input).

Every refusal is a :class:`~dgmrec_dgl.errors.DataError` (exit 2 and one line from the CLI).
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

from .errors import DataError
from .fingerprint import FINGERPRINT_FILE, check_fingerprint, resolve_data_paths, write_fingerprint
from .io_utils import stale_temporaries

#: the checkpoint of the latest epoch and the one before it (kept in case the latest does not load)
LAST_CHECKPOINT, PREVIOUS_CHECKPOINT = "last.pt", "last.prev.pt"
#: what training writes; a fresh start in an owned folder removes these
TRAINING_FILES = ("log.jsonl", LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, "best.pt", "metrics.json")
#: every file a run and the commands on it write into its folder (``compare`` adds result.json)
RUN_FILES = ("config.yaml", FINGERPRINT_FILE, *TRAINING_FILES, "curves.png", "evaluation.json",
             "retrieval.json", "result.json")
LOCK_FILE = "train.lock"
#: config keys a resumed run may change: they do not change the maths (``train.epochs`` extends the run)
RESUMABLE_KEYS = ("train.epochs", "train.threads", "train.keep_freed_memory", "train.sample_ahead",
                  "train.checkpoint_steps", "data.allow_pickle")


def writes_run_folder() -> bool:
    """False in a rank other than 0 under torchrun: rank 0 alone claims and writes the run folder."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def claimed(config, out: str | os.PathLike, *, resume: bool = False, overwrite: bool = False):
    """Own the run folder ``out`` for the ``with`` block (see the module docstring).

    Makes the config's data paths absolute (``config`` is changed in place), as the run will record them.
    """
    out = os.fspath(out)
    if resume and overwrite:
        raise DataError("<command line>", "--overwrite", "cannot be combined with --resume",
                        "give --resume to continue the run in the folder, or --overwrite to replace it")
    resolve_data_paths(config)
    if not writes_run_folder():
        yield
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(out, "--out", "is a file, not a folder", "name a run folder")
    if resume:
        require_checkpoint(out)
    os.makedirs(out, exist_ok=True)
    with locked(out):
        for path in stale_temporaries(out):
            os.unlink(path)
        if resume:
            check_resumable(config, out)
        else:
            if overwrite:
                remove_run_files(out)
            else:
                refuse_used(out)
            write_fingerprint(config, out)
        try:
            yield
        except BaseException:
            if not resume:
                forget_unstarted(out)
            raise


@contextmanager
def locked(out: str):
    """Hold ``fcntl.flock`` on ``out/train.lock`` (which then holds this PID); DataError if another holds it."""
    path = os.path.join(out, LOCK_FILE)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "(PID not written yet)"
            raise DataError(path, "lock", f"held by process {holder}, which is training into this folder",
                            "wait until that training ends, or train into another --out folder") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_files(out: str) -> list[str]:
    """The names of :data:`RUN_FILES` present in ``out``."""
    return [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]


def remove_run_files(out: str) -> None:
    for name in run_files(out):
        os.unlink(os.path.join(out, name))


def forget_unstarted(out: str) -> None:
    """Remove the data fingerprint of a run that stopped before writing anything else (e.g. on bad input), so
    that the folder is not refused as another run's."""
    if run_files(out) == [FINGERPRINT_FILE]:
        os.unlink(os.path.join(out, FINGERPRINT_FILE))


def refuse_used(out: str) -> None:
    """DataError when ``out`` holds files of a run (and neither ``--resume`` nor ``--overwrite`` was given)."""
    found = run_files(out)
    if found:
        raise DataError(out, "--out", f"holds the files of another run ({', '.join(found)})",
                        "pass --resume to continue that run, --overwrite to replace it, or another --out folder")


def require_checkpoint(out: str) -> None:
    if not any(os.path.exists(os.path.join(out, name)) for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT)):
        raise DataError(out, "--resume", f"holds no checkpoint ({LAST_CHECKPOINT}) to resume from",
                        "train without --resume (with --overwrite if the folder holds a run killed before its "
                        "first epoch)")


def check_resumable(config, out: str) -> None:
    """DataError unless ``out`` holds a checkpoint of a run of ``config`` (up to :data:`RESUMABLE_KEYS`) on its data."""
    from .config import load_config

    require_checkpoint(out)
    saved = os.path.join(out, "config.yaml")
    if not os.path.exists(saved):
        raise DataError(saved, "file", "does not exist, so the config of the run to resume is unknown",
                        "start a new run with --overwrite or another --out folder")
    changed = config_changes(load_config(saved).to_dict(), config.to_dict())
    if changed:
        listed = ", ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changed.items())
        raise DataError(saved, "--resume", f"the run was trained with other values of {listed}",
                        f"resume with the run's values (only {', '.join(RESUMABLE_KEYS)} may change), or start "
                        "a new run with --overwrite or another --out folder")
    if os.path.exists(os.path.join(out, FINGERPRINT_FILE)):
        check_fingerprint(out)
    else:                               # a run folder from before fingerprints: record the data from now on
        write_fingerprint(config, out)


def config_changes(before: dict, after: dict) -> dict[str, tuple]:
    """``section.key -> (before, after)`` for the values that differ, :data:`RESUMABLE_KEYS` left out."""
    changes = {}
    for section in sorted(set(before) | set(after)):
        old, new = before.get(section, {}), after.get(section, {})
        for key in sorted(set(old) | set(new)):
            name = f"{section}.{key}"
            if name not in RESUMABLE_KEYS and old.get(key) != new.get(key):
                changes[name] = (old.get(key), new.get(key))
    return changes
