"""A Table-1 style summary of a dataset (users, items, interactions, sparsity, modalities, missing items)."""

from __future__ import annotations

from .dataset import Dataset
from .masks import LETTER_MODALITIES, combinations


def _combo_label(key: str, modalities: tuple[str, ...]) -> str:
    if key == "all":
        return ("both" if len(modalities) == 2 else "all") + " (" + "+".join(modalities) + ")"
    return "+".join(LETTER_MODALITIES[c] for c in key) + (" only" if len(key) == 1 else "")


def summary_rows(dataset: Dataset) -> list[tuple[str, str]]:
    """(label, value) rows describing ``dataset``; numbers use thousands separators."""
    rows = [
        ("dataset", dataset.name),
        ("users", f"{dataset.n_users:,}"),
        ("items", f"{dataset.n_items:,}"),
        ("interactions", f"{dataset.n_file_rows:,}"),
        ("sparsity", f"{100 * dataset.sparsity:.2f}%"),
        ("train / valid / test", f"{len(dataset.train):,} / {len(dataset.valid):,} / {len(dataset.test):,}"),
    ]
    if dataset.n_dropped_cold:
        rows.append(("valid/test rows of users without train (dropped)", f"{dataset.n_dropped_cold:,}"))
    no_train = int((dataset.item_train_counts() == 0).sum())
    rows.append(("items without train interactions", f"{no_train:,}"))
    if dataset.modalities:
        dims = ", ".join(f"{m} {dataset.features[m].shape[1]}" for m in dataset.modalities)
        rows.append(("modalities (dim)", dims))
    else:
        rows.append(("modalities (dim)", "none (no *_feat.npy files)"))
    mask = dataset.mask
    if mask is not None:
        rows.append(("mask modalities", ", ".join(mask.modalities)))
        counts = mask.counts()
        for key in combinations(mask.modalities):
            rows.append((f"missing {_combo_label(key, mask.modalities)}", f"{counts[key]:,}"))
        n_any = int(mask.any_missing().sum())
        rows.append(("missing any modality", f"{n_any:,} ({100 * n_any / mask.n_items:.1f}%)"))
        for modality in mask.modalities:
            rows.append((f"lacking {modality} (alone or with others)", f"{int(mask.missing(modality).sum()):,}"))
        if dataset.imputation:
            rows.append(("imputation of missing rows", dataset.imputation))
    return rows


def format_summary(dataset: Dataset) -> str:
    """The summary as an aligned two-column text table."""
    rows = summary_rows(dataset)
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
