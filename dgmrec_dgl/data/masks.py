"""Missing-modality masks: which items lack which modalities.

A mask maps the *exact* set of missing modalities to item ids, with the keys of the reference study:
``t`` text only, ``v`` image only, ``a`` audio only, ``tv`` / ``ta`` / ``va`` those two, ``all`` every
modality of the dataset. An item missing text is therefore in ``t``, ``all`` and every pair holding ``t``.

Masks are stored as ``.npz`` (one int64 array per key). The study's original ``.npy`` files are pickled
dicts; they are read only with ``allow_pickle=True``, because unpickling a file can execute code.

Generation follows the reference protocol (:meth:`MissingMask.generate`): a fraction ``r`` of the items
miss something; those are split evenly over the number of missing modalities (1..M) and, within a level,
evenly over its combinations. Masks generated with one seed are nested across ratios: an item missing at
r = 0.2 is missing at 0.4 too, with the same modalities or more.
"""

from __future__ import annotations

import math
from itertools import combinations as choose
import os
import warnings
import zipfile
from dataclasses import dataclass, field

import numpy as np

from ..errors import DataError
from ..io_utils import atomic_path
from .io import load_npy

#: Modality names, in canonical order, and their one-letter mask keys.
MODALITY_LETTERS = {"text": "t", "image": "v", "audio": "a"}
LETTER_MODALITIES = {letter: name for name, letter in MODALITY_LETTERS.items()}
_LETTER_ORDER = "tva"


def _combo_key(missing: frozenset[str], modalities: tuple[str, ...]) -> str:
    """Mask key of a set of missing modality names (``all`` when every modality is missing)."""
    if missing == frozenset(modalities):
        return "all"
    letters = sorted((MODALITY_LETTERS[m] for m in missing), key=_LETTER_ORDER.index)
    return "".join(letters)


def _key_modalities(key: str, modalities: tuple[str, ...]) -> frozenset[str]:
    if key == "all":
        return frozenset(modalities)
    return frozenset(LETTER_MODALITIES[letter] for letter in key)


def combinations(modalities: tuple[str, ...]) -> list[str]:
    """Every mask key of a modality set, by level (number of missing modalities), e.g. t, v, all."""

    ordered = sorted(modalities, key=lambda m: _LETTER_ORDER.index(MODALITY_LETTERS[m]))
    keys = []
    for level in range(1, len(modalities) + 1):
        for combo in choose(ordered, level):
            keys.append(_combo_key(frozenset(combo), modalities))
    return keys


def ratio_label(ratio: float) -> str:
    """The reference's file label of a ratio: truncated to 3 decimals (2/3 → ``0.666``, 0.6 → ``0.6``)."""
    text = f"{math.floor(ratio * 1000 + 1e-9) / 1000:.3f}".rstrip("0").rstrip(".")
    return text or "0"


@dataclass(frozen=True)
class MissingMask:
    """Item ids missing each exact combination of modalities.

    Attributes:
        n_items: catalog size; every id is in ``[0, n_items)``.
        modalities: the modality names the mask covers, canonical order (e.g. ``("image", "text")``).
        groups: mask key → sorted int64 item ids (keys absent from the file map to empty arrays).
    """

    n_items: int
    modalities: tuple[str, ...]
    groups: dict[str, np.ndarray] = field(repr=False)

    def __post_init__(self):
        groups = {key: np.unique(np.asarray(ids, dtype=np.int64)) for key, ids in self.groups.items()}
        for key, ids in groups.items():
            if ids.size and (ids[0] < 0 or ids[-1] >= self.n_items):
                raise ValueError(f"mask key {key!r} holds item ids outside 0..{self.n_items - 1}")
        object.__setattr__(self, "groups", groups)

    # ------------------------------------------------------------------ queries
    def missing(self, modality: str) -> np.ndarray:
        """bool ``[n_items]``: the item lacks ``modality`` (alone or with others)."""
        out = np.zeros(self.n_items, dtype=bool)
        for key, ids in self.groups.items():
            if modality in _key_modalities(key, self.modalities):
                out[ids] = True
        return out

    def missing_exactly(self, modality: str) -> np.ndarray:
        """int64 ids of items missing ``modality`` and nothing else (keys ``t``, ``v``, ``a``)."""
        return self.groups.get(MODALITY_LETTERS[modality], np.empty(0, np.int64))

    def any_missing(self) -> np.ndarray:
        """bool ``[n_items]``: the item lacks at least one modality."""
        out = np.zeros(self.n_items, dtype=bool)
        for ids in self.groups.values():
            out[ids] = True
        return out

    def n_missing(self) -> np.ndarray:
        """int ``[n_items]``: how many modalities each item lacks."""
        out = np.zeros(self.n_items, dtype=np.int64)
        for key, ids in self.groups.items():
            out[ids] = len(_key_modalities(key, self.modalities))
        return out

    def counts(self) -> dict[str, int]:
        """Items per key, in level order (``t``, ``v``, ..., ``all``)."""
        return {key: int(self.groups.get(key, np.empty(0)).size) for key in combinations(self.modalities)}

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, path: str | os.PathLike, n_items: int, modalities: tuple[str, ...] | None = None,
             *, allow_pickle: bool = False) -> MissingMask:
        """Read a ``.npz`` mask (or, with ``allow_pickle=True``, the study's pickled ``.npy`` dict).

        Args:
            path: the mask file.
            n_items: catalog size the ids must fit.
            modalities: the dataset's modalities; inferred from the keys when ``None``.
            allow_pickle: permit unpickling a ``.npy`` dict (warns; only for files you trust).

        Raises:
            DataError: unreadable file, pickle without permission, unknown key, an array that is not 1-D
                integer, id out of range, an item listed under two keys.
        """
        path = os.fspath(path)
        raw = cls._read_groups(path, allow_pickle)
        groups: dict[str, np.ndarray] = {}
        for key, ids in raw.items():
            norm = cls._normalise_key(path, key)
            ids = np.asarray(ids)
            if ids.ndim != 1:
                raise DataError(path, f"key '{key}'", f"holds an array of shape {ids.shape}, expected a 1-D "
                                "array of item ids", "store one 1-D int64 array of item ids per key")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise DataError(path, f"key '{key}'", f"holds {ids.dtype} values, expected integer item ids",
                                "store int64 arrays of item ids")
            ids = ids.astype(np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= n_items):
                bad = ids[(ids < 0) | (ids >= n_items)][0]
                raise DataError(path, f"key '{key}'", f"item id {bad} is outside 0..{n_items - 1}",
                                "use the mask made for this dataset, or regenerate it with `dgmrec-dgl data mask`")
            groups[norm] = np.unique(ids)
        if modalities is None:
            letters = {c for key in groups if key != "all" for c in key}
            modalities = tuple(m for m in ("image", "text", "audio") if MODALITY_LETTERS[m] in letters)
        if not modalities:
            raise DataError(path, "keys", "no key names a modality (t, v, a)",
                            "pass the dataset's modalities, or use keys such as t, v, tv, all")
        for key in groups:
            unknown = [m for m in _key_modalities(key, modalities) if m not in modalities]
            if unknown:
                raise DataError(path, f"key '{key}'", f"names modality {unknown[0]!r}, which the dataset lacks",
                                f"use a mask over the dataset's modalities {list(modalities)}")
        # An item may sit under one key only.
        counts = np.zeros(n_items, dtype=np.int64)
        for ids in groups.values():
            counts[ids] += 1
        if (counts > 1).any():
            item = int(np.argmax(counts > 1))
            raise DataError(path, "keys", f"item {item} is listed under more than one key",
                            "list each item once, under the exact set of modalities it lacks")
        # Keys naming every modality (e.g. 'tv' for two) are the same as 'all'.
        for key in list(groups):
            if key != "all" and _key_modalities(key, modalities) == frozenset(modalities):
                groups["all"] = np.union1d(groups.get("all", np.empty(0, np.int64)), groups.pop(key))
        return cls(int(n_items), tuple(modalities), groups)

    @staticmethod
    def _read_groups(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
        if path.endswith(".npz"):
            if os.path.isfile(path) and not zipfile.is_zipfile(path):
                raise DataError(path, "file", "is not a .npz archive (not a zip file, or a truncated one)",
                                "re-create it with numpy.savez")
            try:
                with np.load(path, allow_pickle=False) as archive:
                    return {key: archive[key] for key in archive.files}
            except FileNotFoundError:
                raise DataError(path, "file", "does not exist", "check the mask path") from None
            except ValueError as exc:
                if "pickle" in str(exc).lower():
                    raise DataError(path, "file", "holds pickled objects, which are not loaded",
                                    "store one int64 array per key with numpy.savez") from None
                raise DataError(path, "file", f"is not a valid .npz archive ({exc})",
                                "re-create it with numpy.savez") from None
            except (OSError, EOFError) as exc:
                raise DataError(path, "file", f"is unreadable or truncated ({exc})",
                                "re-create it with numpy.savez") from None
        if not allow_pickle:
            try:
                arr = load_npy(path, field="file")
            except DataError as err:
                if "pickled" in err.problem:
                    raise DataError(path, "file", "holds pickled Python objects (the study's masks are pickled "
                                    "dicts), which are not loaded by default (unpickling can execute code)",
                                    "pass --allow-pickle (allow_pickle=True) for a file you trust, "
                                    "or convert it to .npz") from None
                raise
            raise DataError(path, "file", f"holds a plain {arr.dtype} array, not a dict of item ids",
                            "store the mask as .npz with one array per key (t, v, tv, all, ...)")
        warnings.warn(f"{path}: unpickling a mask file; this can execute code, so only do it for files you trust",
                      stacklevel=3)
        try:
            obj = np.load(path, allow_pickle=True)
        except FileNotFoundError:
            raise DataError(path, "file", "does not exist", "check the mask path") from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
            raise DataError(path, "file", f"cannot be unpickled ({type(exc).__name__})",
                            "re-create the mask, preferably as .npz") from None
        if not (isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ()
                and isinstance(obj.item(), dict)):
            raise DataError(path, "file", "is not a pickled dict of item-id arrays",
                            "store the mask as .npz with one array per key")
        return dict(obj.item())

    @staticmethod
    def _normalise_key(path: str, key: str) -> str:
        if key == "all":
            return key
        if not key or any(c not in _LETTER_ORDER for c in key) or len(set(key)) != len(key):
            raise DataError(path, f"key '{key}'", "is not a mask key",
                            "use t, v, a (one modality), tv, ta, va (two) or all")
        return "".join(sorted(key, key=_LETTER_ORDER.index))

    def save(self, path: str | os.PathLike) -> None:
        """Write the mask as ``.npz`` atomically (temporary file, then rename)."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **{key: ids.astype(np.int64) for key, ids in self.groups.items()})

    # ------------------------------------------------------------------ generation
    @classmethod
    def generate(cls, n_items: int, modalities: tuple[str, ...], ratio: float, seed: int) -> MissingMask:
        """Draw a mask with the reference protocol, nested across ratios for a fixed seed.

        Items get a random rank (from ``seed``). At ratio ``r`` the ``round(r·n)`` lowest ranks miss something;
        that prefix is cut into M equal blocks, the lowest block missing all M modalities, the next M−1, ...,
        the last one. An item's combination at level ℓ is the first ℓ modalities of a rotation of the
        modality list chosen by its rank, so consecutive ranks cycle through the C(M, ℓ) combinations
        (C(M, ℓ) ∈ {1, M} for M ≤ 3) and each combination's count is within one of an even split.
        Raising ``r`` only moves block boundaries up, so an item's level never drops and its missing
        set only grows: masks are nested.

        Args:
            n_items: catalog size.
            modalities: modality names, e.g. ``("image", "text")``.
            ratio: fraction of items missing at least one modality, in [0, 1].
            seed: random seed (the same seed gives nested masks for every ratio).
        """
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"missing ratio must be in [0, 1], got {ratio}")
        modalities = tuple(m for m in ("image", "text", "audio") if m in modalities)
        n_mod = len(modalities)
        if not 1 <= n_mod <= 3:
            raise ValueError(f"mask generation needs 1 to 3 of image/text/audio, got {modalities}")
        rank_to_item = np.random.default_rng(seed).permutation(n_items)
        n_missing = int(round(ratio * n_items))
        # Rotation r of the (t, v, a)-ordered list; combination at level l = its first l entries.
        ordered = sorted(modalities, key=lambda m: _LETTER_ORDER.index(MODALITY_LETTERS[m]))
        groups: dict[str, list[np.ndarray]] = {key: [] for key in combinations(modalities)}
        bounds = [int(round(n_missing * j / n_mod)) for j in range(n_mod + 1)]
        for block in range(n_mod):
            level = n_mod - block
            ranks = np.arange(bounds[block], bounds[block + 1])
            for rotation in range(n_mod):
                chosen = ranks[ranks % n_mod == rotation]
                missing = frozenset(ordered[(rotation + j) % n_mod] for j in range(level))
                groups[_combo_key(missing, modalities)].append(rank_to_item[chosen])
        merged = {key: np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)
                  for key, parts in groups.items()}
        return cls(int(n_items), modalities, merged)
