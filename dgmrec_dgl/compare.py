"""``dgmrec-dgl compare``: train several models on the same data, seeds, sampler and evaluator; report.

Every model is trained by the one trainer (:func:`dgmrec_dgl.train.train`) on the same dataset folder,
mask, new-items split, injection and seeds, so the only difference between rows is the model.

Outputs in ``--out``::

    runs/<setting>/<model>/seed<S>/   run folders (resumable; a finished run is reused: result.json)
    runs.csv                         one row per (setting, model, seed): test metrics, best epoch, seconds, threads
    report.csv                       one row per (setting, model): mean and std over seeds of each metric
    report.md                        Table 2 layout: R@20, R@50, N@20, N@50, mean ± std, best in bold, and
                                     a popularity ranker's row as a reference (not trained, not in bold)
    report.png                       grouped bars (metrics × models, std error bars) of the first setting
    robustness.csv / robustness.png  with --missing-ratios: Fig. 4 layout, the metric and its relative drop
                                     from the ratio-0 value ((m_0 − m_r) / m_0, in %) against the ratio

A *setting* is ``mask`` (the --mask file, or the configs' own data section) or ``ratio<r>`` (a mask
generated with ratio r and ``data.mask_seed``; nested across ratios, so an item missing at 0.2 is missing
at 0.4 too). ``std`` is the sample standard deviation (ddof = 1) over seeds (0 for one seed).

Configs: each model starts from ``<config-dir>/<model>/<dataset-config>.yaml`` if it exists, else
``<config-dir>/<model>/base.yaml``, else the dataclass defaults; the command line overrides data.dir, the
mask, new items, injection, seed and (if given) epochs. ``--quick`` generates the synthetic ``toy`` preset
and a 2/3 mask into ``OUT/data`` and trains every model for 6 epochs with 2 seeds on one thread.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np

from .io_utils import atomic_path, atomic_write_json, atomic_write_text

MODELS = ("dgmrec", "ci2mg", "lightgcn", "mfbpr")
METRICS = ("recall@20", "recall@50", "ndcg@20", "ndcg@50")
SHORT = {"recall@20": "R@20", "recall@50": "R@50", "ndcg@20": "N@20", "ndcg@50": "N@50",
         "recall@10": "R@10", "ndcg@10": "N@10"}
#: the reference row of every setting: items scored by their train interaction counts (no training, no seeds)
REFERENCE = "popularity"
LABELS = {"dgmrec": "DGMRec", "ci2mg": "CI2MG", "lightgcn": "LightGCN", "mfbpr": "MF-BPR",
          REFERENCE: "Popularity (reference)"}
DEFAULT_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICK = {"preset": "toy", "ratio": 2 / 3, "seeds": (999, 42), "epochs": 6}
#: ``train:`` settings that decide how a run executes, not what it computes (beyond the summation order of
#: multi-threaded kernels): a finished run is reused whatever they were, and runs.csv records its threads
EXECUTION_KEYS = ("threads", "keep_freed_memory", "checkpoint_steps")


# ---------------------------------------------------------------------- configs and runs
def model_config(model: str, overrides: dict, config_dir: str | os.PathLike | None = None,
                 dataset_config: str | None = None):
    """The resolved :class:`~dgmrec_dgl.config.Config` of ``model`` (see the module docstring)."""
    from .config import load_config

    path = None
    if config_dir is not None:
        folder = Path(config_dir) / model
        for name in ([dataset_config] if dataset_config else []) + ["base"]:
            if (folder / f"{name}.yaml").exists():
                path = folder / f"{name}.yaml"
                break
    merged = {section: dict(values) for section, values in overrides.items()}
    if path is None:
        merged.setdefault("model", {})["name"] = model
    return load_config(path, merged)


def run_one(config, run_dir: str | os.PathLike, progress: bool = False) -> dict:
    """Train ``config`` into ``run_dir`` unless a finished run of the same config is there; return its result.

    "The same config" leaves out :data:`EXECUTION_KEYS`, so a run finished on one thread is reused by a call
    with two (the result's ``threads`` says what it ran with). The recorded config is read like a YAML
    config, so a key added to the package after the run counts at its default: a run is not retrained
    because the code grew a switch it did not use. A killed run is continued from its ``last.pt`` only under
    the very same config, execution keys included; a folder holding a different config is started afresh.
    """
    from .config import load_config
    from .train import train

    run_dir = os.fspath(run_dir)
    done = os.path.join(run_dir, "result.json")
    wanted = config.to_dict()
    if os.path.exists(done):
        with open(done) as fh:
            previous = json.load(fh)
        if _experiment(_recorded_config(previous.get("config", {}))) == _experiment(_jsonable(wanted)):
            return {**previous["result"], "threads": previous["config"]["train"].get("threads", 0), "reused": True}
    saved = os.path.join(run_dir, "config.yaml")
    resume = os.path.exists(saved) and load_config(saved).to_dict() == wanted
    result = train(config, run_dir, resume=resume, progress=progress)
    result["seconds"] = result.get("setup_seconds", 0.0) + _logged_seconds(os.path.join(run_dir, "log.jsonl"))
    atomic_write_json(done, {"config": _jsonable(wanted), "result": result})
    return {**result, "threads": config.train.threads}


def _recorded_config(recorded: dict) -> dict:
    """A finished run's recorded config with today's defaults for keys it predates (``{}`` if unreadable)."""
    from .config import load_config
    from .errors import DataError

    try:
        return _jsonable(load_config(None, recorded).to_dict())
    except DataError:       # a key the package no longer has: not an experiment this code can reuse
        return {}


def _experiment(config: dict) -> dict:
    """A config's dict without its :data:`EXECUTION_KEYS`."""
    train = {k: v for k, v in config.get("train", {}).items() if k not in EXECUTION_KEYS}
    return {**config, "train": train}


def _logged_seconds(log_path: str) -> float:
    """Seconds of every logged epoch (model work, training, validation), so resumed runs count in full."""
    from .train import wall_seconds

    total = 0.0
    if os.path.exists(log_path):
        with open(log_path) as fh:
            for line in fh:
                total += wall_seconds(json.loads(line))
    return total


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def compare(models, data_dir, out_dir, seeds, *, mask=None, ratios=None, new_items=False, inter=None, inject="none",
            epochs=None, train_overrides=None, config_dir=DEFAULT_CONFIG_DIR, dataset_config=None,
            metric="recall@20", progress=False, log=print) -> dict:
    """Train every (setting, model, seed) and write the reports.

    Args:
        models: model names (``dgmrec``, ``ci2mg``, ``lightgcn``, ``mfbpr``).
        data_dir: dataset folder.
        out_dir: output folder.
        seeds: training seeds.
        mask: a mask file for the single setting (ignored when ``ratios`` is given).
        ratios: missing ratios for the robustness study (0 = no missing modality).
        new_items: the new-items setting.
        inter: the ``.inter`` file in ``data_dir`` (e.g. a shipped ``<name>_del.inter`` with ``new_items``).
        inject: feature injection (``none``, ``mean``, ``nn``).
        epochs: epoch cap (default: the configs').
        train_overrides: more ``train:`` values (e.g. ``{"eval_every": 3}``).
        config_dir, dataset_config: where the per-model YAML files are (see the module docstring).
        metric: the metric of the robustness curve.
        log: a print-like function for progress lines.

    Returns:
        ``{"runs": [...], "summary": [...], "files": [...]}``.
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    os.makedirs(out_dir, exist_ok=True)
    settings: list[tuple[str, dict, float | None]] = []
    if ratios:
        for r in ratios:
            data = {"mask": None, "missing_ratio": None if r == 0 else float(r)}
            settings.append((f"ratio{r:g}", data, float(r)))
    else:
        settings.append(("mask", {"mask": os.path.abspath(mask)} if mask else {}, None))
    runs, references = [], []
    total = len(settings) * len(models) * len(seeds)
    count = 0
    for setting, data, ratio in settings:
        for model in models:
            for seed in seeds:
                count += 1
                overrides = {"data": {"dir": os.path.abspath(data_dir), "new_items": bool(new_items),
                                      "inject": inject, **({"inter": inter} if inter else {}), **data},
                             "train": {"seed": int(seed), **(train_overrides or {})}}
                if epochs is not None:
                    overrides["train"]["epochs"] = int(epochs)
                config = model_config(model, overrides, config_dir, dataset_config)
                run_dir = os.path.join(out_dir, "runs", setting, model, f"seed{seed}")
                result = run_one(config, run_dir, progress=progress)
                test = result.get("test", {})
                row = {"setting": setting, "ratio": ratio, "model": model, "seed": int(seed),
                       **{k: test.get(k, math.nan) for k in METRICS},
                       "best_epoch": result.get("best_epoch", -1), "epochs_run": result.get("epochs_run", 0),
                       "seconds": round(float(result.get("seconds", math.nan)), 2), "threads": result["threads"]}
                runs.append(row)
                how = "reused" if result.get("reused") else f"{row['seconds']:.1f} s"
                log(f"[{count}/{total}] {setting} {model} seed {seed}: "
                    + " ".join(f"{SHORT[k]} {row[k]:.4f}" for k in METRICS) + f" ({how})")
        if models:   # the data section of the setting's configs, the same for every model
            popular = popularity_reference(config)
            reference = {"setting": setting, "ratio": ratio, "model": REFERENCE, "n_seeds": 0}
            for k in METRICS:
                reference.update({f"{k}_mean": popular[k], f"{k}_std": 0.0})
            references.append(reference)
    summary = summarise(runs) + references
    files = write_reports(out_dir, runs, summary, {
        "data": os.path.abspath(data_dir), "mask": os.path.abspath(mask) if mask and not ratios else None,
        "new_items": bool(new_items), "inject": inject, "seeds": list(seeds), "epochs": epochs,
        "dataset_config": dataset_config})
    if ratios:
        files += write_robustness(out_dir, summary, metric)
    return {"runs": runs, "summary": summary, "files": files}


def popularity_reference(config) -> dict[str, float]:
    """Test metrics of the popularity ranker on ``config``'s data, through the trainer's loader and evaluator."""
    from .evaluate import evaluate, popularity_scores
    from .train import load_dataset

    dataset = load_dataset(config, prepare_features=False)   # the splits are all it reads
    return evaluate(popularity_scores(dataset), dataset, "test", config.eval.ks,
                    budget_bytes=config.eval.budget_mb << 20, masks_valid=config.eval.test_masks_valid)


# ---------------------------------------------------------------------- tables
def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds for each (setting, model), in the order the runs came."""
    groups: dict[tuple, list[dict]] = {}
    for row in runs:
        groups.setdefault((row["setting"], row["model"]), []).append(row)
    out = []
    for (setting, model), rows in groups.items():
        entry = {"setting": setting, "ratio": rows[0]["ratio"], "model": model, "n_seeds": len(rows)}
        for k in METRICS:
            values = np.array([r[k] for r in rows], dtype=np.float64)
            entry[f"{k}_mean"] = float(values.mean())
            entry[f"{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def markdown_table(summary: list[dict], setting: str) -> str:
    """Table 2 layout for one setting; the best mean of each column among the models in bold."""
    rows = [s for s in summary if s["setting"] == setting]
    best = {k: max((s[f"{k}_mean"] for s in rows if s["model"] != REFERENCE and not math.isnan(s[f"{k}_mean"])),
                   default=math.nan) for k in METRICS}
    lines = ["| Model | " + " | ".join(SHORT[k] for k in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for s in rows:
        cells = []
        for k in METRICS:
            text = f"{s[f'{k}_mean']:.4f}"
            if s["model"] != REFERENCE:     # the reference is not trained: no spread over seeds
                text += f" ± {s[f'{k}_std']:.4f}"
            cells.append(f"**{text}**" if s[f"{k}_mean"] == best[k] and s["model"] != REFERENCE else text)
        lines.append(f"| {LABELS.get(s['model'], s['model'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(out_dir, runs, summary, meta) -> list[str]:
    """``runs.csv``, ``report.csv``, ``report.md`` and ``report.png``; returns their paths."""
    paths = [os.path.join(out_dir, name) for name in ("runs.csv", "report.csv", "report.md", "report.png")]
    atomic_write_text(paths[0], _csv(runs))
    atomic_write_text(paths[1], _csv(summary))
    settings = list(dict.fromkeys(s["setting"] for s in summary))
    seeds = ", ".join(str(s) for s in meta["seeds"])
    head = [
        "# Model comparison (Table 2 layout)",
        "",
        f"- data: `{meta['data']}`; mask: "
        + (f"`{meta['mask']}`" if meta.get("mask") else "per setting below, or the configs' data section"),
        f"- setting: missing modality{' + new items' if meta['new_items'] else ''}; "
        f"feature injection: {meta['inject']}",
        f"- seeds: {seeds} (mean ± sample std over seeds); epochs: "
        + (f"at most {meta['epochs']}" if meta.get("epochs") else "the configs' (early stopping)"),
        "- metrics: test split, full ranking, model selected on valid Recall@20; best mean in bold",
        f"- {LABELS[REFERENCE]}: every user's scores are the items' train interaction counts (not trained)",
        "",
    ]
    body = []
    for setting in settings:
        body += [f"## {setting}", "", markdown_table(summary, setting), "",
                 "Best epoch / epochs run per seed, and the torch threads they ran on (0: torch's default):", ""]
        for model in dict.fromkeys(r["model"] for r in runs if r["setting"] == setting):
            mine = [r for r in runs if r["setting"] == setting and r["model"] == model]
            threads = ", ".join(str(t) for t in dict.fromkeys(r["threads"] for r in mine))
            body.append(f"- {LABELS.get(model, model)}: "
                        + ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in mine)
                        + (" (epoch cap reached)" if meta.get("epochs") and any(
                            r["epochs_run"] >= meta["epochs"] for r in mine) else "")
                        + f"; threads {threads}")
        body.append("")
    atomic_write_text(paths[2], "\n".join(head + body))
    first = [s for s in summary if s["setting"] == settings[0]]
    plot_bars(paths[3], first, title=f"Test metrics ({settings[0]}), mean ± std over seeds")
    return paths


def plot_bars(path, summary: list[dict], title: str = "") -> None:
    """Grouped bars: one group per metric, one bar per model, std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    width = 0.8 / max(len(summary), 1)
    x = np.arange(len(METRICS))
    for j, s in enumerate(summary):
        means = [s[f"{k}_mean"] for k in METRICS]
        stds = [s[f"{k}_std"] for k in METRICS]
        ax.bar(x + (j - (len(summary) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=LABELS.get(s["model"], s["model"]))
    ax.set_xticks(x, [SHORT[k] for k in METRICS])
    ax.set_ylabel("value")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def write_robustness(out_dir, summary: list[dict], metric: str = "recall@20") -> list[str]:
    """Fig. 4 layout: ``metric`` against the missing ratio and the relative drop from ratio 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in summary if s["ratio"] is not None and s["model"] != REFERENCE]
    models = list(dict.fromkeys(s["model"] for s in rows))
    ratios = sorted({s["ratio"] for s in rows})
    table = []
    for model in models:
        by_ratio = {s["ratio"]: s for s in rows if s["model"] == model}
        base = by_ratio.get(0.0, {}).get(f"{metric}_mean", math.nan)
        for r in ratios:
            s = by_ratio[r]
            value = s[f"{metric}_mean"]
            drop = 100.0 * (base - value) / base if base and not math.isnan(base) else math.nan
            table.append({"model": model, "ratio": r, f"{metric}_mean": value, f"{metric}_std": s[f"{metric}_std"],
                          "relative_drop_pct": drop})
    csv_path, png_path = os.path.join(out_dir, "robustness.csv"), os.path.join(out_dir, "robustness.png")
    atomic_write_text(csv_path, _csv(table))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.0))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(ratios))
    for j, model in enumerate(models):
        mine = [t for t in table if t["model"] == model]
        ax1.bar(x + (j - (len(models) - 1) / 2) * width, [t[f"{metric}_mean"] for t in mine], width,
                yerr=[t[f"{metric}_std"] for t in mine], capsize=3, label=LABELS.get(model, model))
        ax2.plot(ratios, [t["relative_drop_pct"] for t in mine], marker="o", label=LABELS.get(model, model))
    ax1.set_xticks(x, [f"{r:g}" for r in ratios])
    ax1.set_xlabel("missing ratio")
    ax1.set_ylabel(SHORT.get(metric, metric))
    ax1.set_title(f"(a) {SHORT.get(metric, metric)} by missing ratio", fontsize=10)
    ax2.set_xlabel("missing ratio")
    ax2.set_ylabel("relative drop from ratio 0 (%)")
    ax2.set_title("(b) relative performance drop", fontsize=10)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, png_path)
    plt.close(fig)
    return [csv_path, png_path]


# ---------------------------------------------------------------------- command line
def _prepare_quick(out_dir: str, preset_name: str) -> tuple[str, str]:
    """Generate the synthetic dataset and a 2/3 mask under ``out_dir/data`` (reused when present)."""
    from .data.dataset import Dataset
    from .data.masks import MissingMask, ratio_label
    from .data.synthetic import generate, preset

    data_dir = os.path.join(out_dir, "data", preset_name)
    if not os.path.exists(os.path.join(data_dir, "synthetic.json")):
        generate(data_dir, preset(preset_name), progress=False)
    mask_path = os.path.join(data_dir, f"missing_items_{ratio_label(QUICK['ratio'])}.npz")
    if not os.path.exists(mask_path):
        ds = Dataset.load(data_dir)
        MissingMask.generate(ds.n_items, ds.modalities, QUICK["ratio"], 2024).save(mask_path)
    return data_dir, mask_path


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _float_list(text: str) -> list[float]:
    from fractions import Fraction

    try:
        values = [float(Fraction(v)) for v in _list(text)]
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ratios; "
                                         "fix: give e.g. 0,0.2,0.4,0.6,0.8") from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"missing ratios must be in [0, 1), got {text!r}; "
                                         "fix: give ratios in [0, 1), e.g. 0,0.2,0.4,0.6,0.8")
    return values


def run_compare(args) -> int:
    """The ``compare`` subcommand; returns the exit status."""
    import sys

    models = _list(args.models)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        print(f"dgmrec-dgl compare: unknown model(s) {', '.join(unknown) or '(none)'}; "
              f"choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.mask and args.missing_ratios:
        print("dgmrec-dgl compare: --mask and --missing-ratios exclude each other", file=sys.stderr)
        return 2
    data, mask, seeds, epochs = args.data, args.mask, args.seeds, args.epochs
    train_overrides = {}
    threads = args.threads or (1 if args.quick else 0)     # toy data: one thread is the fastest
    if threads:
        import numba

        train_overrides["threads"] = threads
        # Numba's OpenMP sampler sets the process's OpenMP thread count on every call, undoing
        # torch.set_num_threads: give Numba the same count.
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if args.keep_freed_memory:
        train_overrides["keep_freed_memory"] = True
    if args.quick:
        if not args.missing_ratios:
            data, mask = (data, mask) if data else _prepare_quick(args.out, QUICK["preset"])
        elif not data:
            data, _ = _prepare_quick(args.out, QUICK["preset"])
        seeds = seeds or list(QUICK["seeds"])
        epochs = epochs or QUICK["epochs"]
        train_overrides.update({"eval_every": 3, "patience": 2})
    if not data:
        print("dgmrec-dgl compare: --data DIR is required (or use --quick)", file=sys.stderr)
        return 2
    seeds = seeds or [999, 42, 2023]
    result = compare(models, data, args.out, seeds, mask=mask, ratios=args.missing_ratios,
                     new_items=args.new_items, inter=args.inter, inject=args.inject, epochs=epochs,
                     train_overrides=train_overrides,
                     config_dir=args.config_dir, dataset_config=args.dataset_config, metric=args.metric,
                     progress=args.progress)
    print("wrote " + ", ".join(result["files"]))
    return 0


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` on an ``argparse`` sub-parser set (``set_defaults(run=run_compare)``)."""
    from . import arguments

    p = subparsers.add_parser("compare", help="train several models per seed and write Table-2 style reports")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    p.add_argument("--data", help="dataset folder (required unless --quick)")
    p.add_argument("--mask", help="missing-modality mask file (default: the configs' data section)")
    p.add_argument("--missing-ratios", type=_float_list,
                   help="robustness study (Fig. 4): e.g. 0,0.2,0.4,0.6,0.8 (masks generated, nested)")
    p.add_argument("--seeds", type=arguments.seeds, help="comma-separated training seeds (default 999,42,2023)")
    p.add_argument("--new-items", action="store_true", help="the new-items setting")
    p.add_argument("--inter", help="the .inter file in --data (e.g. tiktok_del.inter, the shipped new-items split)")
    p.add_argument("--inject", default="none", choices=("none", "mean", "nn"),
                   help="feature injection for items missing a modality (dgmrec_dgl.inject)")
    p.add_argument("--epochs", type=arguments.count, help="epoch cap (default: the configs', with early stopping)")
    p.add_argument("--out", type=arguments.folder, required=True, help="output folder (runs are reused from it)")
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR), help="folder with <model>/<name>.yaml")
    p.add_argument("--dataset-config", help="config name per model, e.g. baby (default: base)")
    p.add_argument("--metric", default="recall@20", choices=METRICS, help="metric of the robustness curve")
    p.add_argument("--threads", type=arguments.threads, default=0,
                   help="torch (and Numba) threads; 0: torch's default, or 1 with --quick")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="train.keep_freed_memory for every run: faster steps, same metrics, more RSS (glibc only)")
    p.add_argument("--quick", action="store_true",
                   help="synthetic toy data + 2/3 mask, 2 seeds, 6 epochs: a smoke run of the whole harness")
    p.add_argument("--progress", action="store_true", help="per-epoch progress bars")
    p.set_defaults(run=run_compare)
    return p
