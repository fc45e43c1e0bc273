"""Quality cost of sampled training: full vs sampled mode, to early stopping, on data where both run.

For every dataset, model (DGMRec, LightGCN) and seed, the same config is trained once per mode through
:func:`dgmrec_dgl.compare.run_one` (so a finished run is reused and a killed one resumes from its
``last.pt``: a long measurement can be spread over several sessions): ``full`` (``model.execution: full``),
``sampled`` (``execution: sampled``, every layer sampled) and ``history`` (``sampled`` with
``history_every: --history-every``, one sampled hop and historical embeddings); everything else is the
dataset's config (``configs/<model>/<config>.yaml``).

Datasets:

- ``demo`` and ``baby``: the synthetic presets (``dgmrec-dgl data synth``) with a 2/3 mask (seed 2024);
- ``tiktok``: the study's TikTok interactions (``../shared/data/dgmrec-splits/tiktok/tiktok.inter``) with
  generated 128-d image and 128-d audio features of the real shapes (seeded Gaussian rows; the study's
  feature files are not available) and its shipped 0.6 mask restricted to those two modalities.

Writes to ``--out`` (default ``bench/results/sampled_quality``): ``sampled_quality.json`` and ``.csv`` (one
row per run: test metrics, best epoch, epochs, seconds), ``summary.csv`` (per dataset, model and approximate
mode: mean test R@20 over the seeds finished in both it and ``full``, and the ratio to ``full``) and ``sampled_quality.png`` (valid R@20
against cumulative wall-clock seconds, full and sampled, one panel per dataset and model); prints the
ratios.

    python bench/sampled_quality.py --datasets demo --seeds 999 --epochs 15      # minutes
    python bench/sampled_quality.py                                              # all, 3 seeds, to early stopping
    python bench/sampled_quality.py --datasets demo --models lightgcn --epochs 500 --patience 25 \
        --out bench/results/sampled_quality_release_stop      # demo under the release's stopping rule
    python bench/sampled_quality.py --datasets demo --models dgmrec --modes full,sampled --epochs 500 \
        --patience 30 --threads 1 --out bench/results/sampled_quality_release_stop   # the same for DGMRec
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dgmrec_dgl.io_utils import atomic_path, atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results" / "sampled_quality"
SHARED_TIKTOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "dgmrec-splits" / "tiktok"
DATASETS = ("tiktok", "baby", "demo")
MODELS = ("dgmrec", "lightgcn")
MODES = ("full", "sampled", "history")
#: the model keys of each mode (``history`` adds ``history_every`` from the command line)
MODE_KEYS = {"full": {"execution": "full"}, "sampled": {"execution": "sampled"}, "history": {"execution": "sampled"}}
SEEDS = (999, 42, 2023)
# one row of sampled_quality.csv per run, in this column order (rows read back from the JSON have sorted keys)
RUN_COLUMNS = ("dataset", "model", "mode", "seed", "history_every", "best_epoch", "epochs", "seconds", "reused",
               "test_recall@20", "test_ndcg@20")


def prepare(name: str, work: Path) -> tuple[Path, str | None]:
    """The data folder of dataset ``name`` under ``work`` (made once) and its mask file."""
    from dgmrec_dgl.data import synthetic
    from dgmrec_dgl.data.dataset import Dataset
    from dgmrec_dgl.data.masks import MissingMask

    folder = work / name
    mask = folder / "missing_items_0.666.npz"
    if name == "tiktok":
        mask = folder / "missing_items_0.6.npz"
        if not mask.exists():
            if not (SHARED_TIKTOK / "tiktok.inter").exists():
                raise SystemExit(f"error: {SHARED_TIKTOK}: tiktok.inter: not found; fix: put ../shared beside the "
                                 "repository, or leave tiktok out of --datasets")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(SHARED_TIKTOK / "tiktok.inter", folder / "tiktok.inter")
            n_items = Dataset.load(folder).n_items
            rng = np.random.default_rng(0)
            for modality in ("image", "audio"):
                np.save(folder / f"{modality}_feat.npy", rng.normal(size=(n_items, 128)).astype(np.float32))
            shipped = MissingMask.load(SHARED_TIKTOK / "missing_items_0.6.npz", n_items, ("image", "text", "audio"))
            lacks_image = np.zeros(n_items, bool)
            lacks_image[shipped.missing("image")] = True
            lacks_audio = np.zeros(n_items, bool)
            lacks_audio[shipped.missing("audio")] = True
            groups = {"v": np.flatnonzero(lacks_image & ~lacks_audio), "a": np.flatnonzero(lacks_audio & ~lacks_image),
                      "all": np.flatnonzero(lacks_image & lacks_audio)}
            MissingMask(n_items, ("image", "audio"), groups).save(mask)
        return folder, str(mask)
    if not mask.exists():
        synthetic.generate(folder, synthetic.preset(name), progress=False)
        ds = Dataset.load(folder)
        MissingMask.generate(ds.n_items, ds.modalities, 2 / 3, 2024).save(mask)
    return folder, str(mask)


def label(mode: str, history_every: int = 0) -> str:
    """A mode's name in folders and tables: ``history`` carries its refresh interval (``history500``)."""
    return f"history{history_every}" if mode == "history" else mode


def run_dir(out: Path, dataset: str, model: str, mode: str, seed: int) -> Path:
    """``mode`` as :func:`label` names it."""
    return out / "runs" / dataset / model / mode / f"seed{seed}"


def curve(folder: Path) -> list[tuple[float, float]]:
    """(cumulative wall seconds, valid R@20) at every validation of a run's ``log.jsonl``."""
    from dgmrec_dgl.train import wall_seconds

    points, total = [], 0.0
    log = folder / "log.jsonl"
    if not log.exists():
        return points
    for line in log.read_text().splitlines():
        record = json.loads(line)
        total += wall_seconds(record)
        if "valid" in record:
            points.append((total, record["valid"]["recall@20"]))
    return points


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--history-every", type=int, default=500, help="model.history_every of the history mode")
    p.add_argument("--epochs", type=int, default=None, help="cap on epochs (default: the config's, to early stopping)")
    p.add_argument("--patience", type=int, default=None,
                   help="train.patience, in validations (default: the config's; the demo preset's 5 is for a one-minute "
                        "demo, the release's stopping rule is LightGCN's 25 and DGMRec's 30)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("runs/sampled_quality_data"), help="where the datasets are made")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from dgmrec_dgl.compare import DEFAULT_CONFIG_DIR, model_config, run_one
    from dgmrec_dgl.errors import DataError

    rows = []          # earlier calls' rows are kept (a call may cover some datasets, models or seeds only)
    if (args.out / "sampled_quality.json").exists():
        rows = json.loads((args.out / "sampled_quality.json").read_text())["runs"]
    for dataset in args.datasets.split(","):
        folder, mask = prepare(dataset, args.work)
        for model in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for mode in args.modes.split(","):
                    # the stopping rule as given; a value below 1 reaches the config check, which refuses it
                    train = {"seed": seed, "threads": args.threads,
                             **{k: v for k, v in (("epochs", args.epochs), ("patience", args.patience)) if v is not None}}
                    keys = dict(MODE_KEYS[mode], **({"history_every": args.history_every} if mode == "history" else {}))
                    try:
                        config = model_config(model, {"data": {"dir": str(folder), "mask": mask}, "train": train,
                                                      "model": keys}, DEFAULT_CONFIG_DIR, dataset_config=dataset)
                    except DataError as exc:                # e.g. --epochs 0: one line, exit 2
                        print(f"error: {exc}", file=sys.stderr)
                        return 2
                    name = label(mode, args.history_every)
                    folder_out = run_dir(args.out, dataset, model, name, seed)
                    t = time.time()
                    result = run_one(config, folder_out)
                    rows = [r for r in rows if (r["dataset"], r["model"], row_label(r), r["seed"]) != (dataset, model, name, seed)]
                    rows.append({"dataset": dataset, "model": model, "mode": mode, "seed": seed,
                                 "history_every": keys.get("history_every", 0),
                                 "best_epoch": result.get("best_epoch"), "epochs": result.get("epochs_run"),
                                 "seconds": result.get("seconds"), "reused": bool(result.get("reused")),
                                 **{f"test_{k}": result.get("test", {}).get(k) for k in ("recall@20", "ndcg@20")}})
                    print(f"{dataset} {model} {mode} seed {seed}: test R@20 {rows[-1]['test_recall@20']:.4f} "
                          f"({'reused' if rows[-1]['reused'] else f'{time.time() - t:.0f} s'})", flush=True)
                    write(rows, args.out)
    return 0


def row_label(row: dict) -> str:
    return label(row["mode"], row.get("history_every", 0))


def summary(rows: list[dict]) -> list[dict]:
    """Per (dataset, model, approximate mode): mean test R@20 over the seeds finished in it and in ``full``."""
    out = []
    for dataset, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        by_seed = {}
        for r in rows:
            if r["dataset"] == dataset and r["model"] == model and r["test_recall@20"] is not None:
                by_seed.setdefault(r["seed"], {})[row_label(r)] = r["test_recall@20"]
        for mode in dict.fromkeys(row_label(r) for r in rows if r["mode"] != "full"):
            both = [v for v in by_seed.values() if {"full", mode} <= set(v)]
            if both:
                full, approx = (float(np.mean([v[m] for v in both])) for m in ("full", mode))
                out.append({"dataset": dataset, "model": model, "mode": mode, "seeds": len(both),
                            "full_recall@20": full, "recall@20": approx,
                            "ratio": approx / full if full else float("nan")})
    return out


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = summary(rows)
    atomic_write_json(out / "sampled_quality.json", {"runs": rows, "summary": table})
    for name, data, columns in (("sampled_quality.csv", rows, RUN_COLUMNS), ("summary.csv", table, None)):
        if data:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=list(columns or data[0]))
            writer.writeheader()
            writer.writerows(data)
            atomic_write_text(out / name, buf.getvalue())
    plot(rows, out)
    for r in table:
        print(f"  {r['dataset']:<7} {r['model']:<9} {r['seeds']} seed(s): test R@20 full {r['full_recall@20']:.4f}, "
              f"{r['mode']} {r['recall@20']:.4f}, {r['mode']} / full {r['ratio']:.3f}")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    labels = list(dict.fromkeys(row_label(r) for r in sorted(rows, key=lambda r: MODES.index(r["mode"]))))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dataset, model) in zip(axes[0], panels):
        for r in rows:
            if (r["dataset"], r["model"]) != (dataset, model):
                continue
            points = curve(run_dir(out, dataset, model, row_label(r), r["seed"]))
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, {"full": "-o", "sampled": "--s", "history": ":^"}[r["mode"]], markersize=3,
                        color=f"C{labels.index(row_label(r))}", label=f"{row_label(r)}, seed {r['seed']}")
        ax.set_title(f"{dataset}: {model}")
        ax.set_xlabel("wall-clock seconds (training + per-epoch work + validation)")
        ax.set_ylabel("valid Recall@20")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "sampled_quality.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
