"""Table 5 of the DGMRec paper on this machine: train seconds per epoch, inference seconds, total seconds.

For each model, in its own subprocess (so peak RSS is the model's own), on one dataset:

- **train s/epoch**: median over the epochs after the first (at least 3 of them) of the epoch's training
  time, including the model's per-epoch work (DGMRec's generation and graph refinement, CI2MG's block
  redraw) but not validation;
- **inference s**: one full-ranking pass over every test user (forward pass, scores of all items, masking,
  top-K, metrics) with the best checkpoint; the median of 3 passes;
- **total s**: wall time of the training call (data loading, graph building, training, validation every
  ``eval_every`` epochs) until early stopping, or until the stated epoch cap;
- **peak RSS**: the subprocess's maximum resident set size.

Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless ``--omp-wait-policy inherit``: with OpenMP's default
policy the worker threads left by the Numba BPR sampler spin between parallel regions and, on a loaded
2-core machine, made LightGCN's epochs 4–40x slower (0.3 s vs 1–12 s on the quick data). With
``--threads N`` the workers also get ``NUMBA_NUM_THREADS=N``: Numba's OpenMP layer sets the process's
OpenMP thread count on every parallel call, which silently undoes ``torch.set_num_threads(N)``.

The paper's own figures (one GPU, Table 5) are printed beside ours, labelled as such; they are not
comparable in absolute terms (GPU vs this CPU), only in ratios between models.

Writes ``timing_table.json``, ``timing_table.md`` and ``timing_table.png`` (bars) into ``--out``.

    python bench/timing_table.py --quick                       # < 3 min: scaled synthetic baby-shaped data
    python bench/timing_table.py --data DIR --missing-ratio 2/3 --epochs 30 --out bench/results/baby
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

from dgmrec_dgl.compare import DEFAULT_CONFIG_DIR, LABELS, MODELS, model_config
from dgmrec_dgl.io_utils import atomic_path, atomic_write_json, atomic_write_text

#: DGMRec paper, Table 5 (one GPU), seconds: (train per epoch, inference, total).
PAPER_GPU = {
    "baby": {"DGMRec": (2.63, 3.38, 210.4), "LGMRec": (2.81, 3.39, 171.5), "GUME": (2.74, 2.94, 152.1),
             "DAMRS": (3.56, 3.33, 238.7)},
    "sports": {"DGMRec": (8.83, 6.18, 666.5)},
    "clothing": {"DGMRec": (9.91, 7.32, 802.4)},
}
#: --quick: the baby preset scaled to 15% of its users and items (same feature dims, same density).
QUICK_SCALE = 0.15
QUICK_EPOCHS = 4


# ---------------------------------------------------------------------- one model (subprocess)
def measure(model: str, overrides: dict, run_dir: str, config_dir: str | None, dataset_config: str | None,
            inference_repeats: int = 3) -> dict:
    """Train ``model`` into ``run_dir`` and time it (see the module docstring)."""
    import torch

    from dgmrec_dgl.train import evaluate_model, load_run, train

    config = model_config(model, overrides, config_dir, dataset_config)
    start = time.perf_counter()
    result = train(config, run_dir, progress=False)
    total = time.perf_counter() - start
    with open(os.path.join(run_dir, "log.jsonl")) as fh:
        log = [json.loads(line) for line in fh]
    epoch_seconds = [r["seconds"]["train"] + r["seconds"]["before_epoch"] for r in log]
    timed = epoch_seconds[1:]
    inference = []
    if "test" in result:
        run_config, dataset, net, g = load_run(run_dir)
        for _ in range(inference_repeats):
            t0 = time.perf_counter()
            evaluate_model(net, g, dataset, "test", run_config)
            inference.append(time.perf_counter() - t0)
        n_test_users = int(len(set(dataset.test[:, 0].tolist())))
    else:
        n_test_users = 0
    return {
        "model": model,
        "train_s_per_epoch": statistics.median(timed) if timed else None,
        "n_timed_epochs": len(timed),
        "first_epoch_s": epoch_seconds[0] if epoch_seconds else None,
        "inference_s": statistics.median(inference) if inference else None,
        "total_s": total,
        "epochs_run": result.get("epochs_run", len(log)),
        "epoch_cap": config.train.epochs,
        "early_stopped": result.get("epochs_run", len(log)) < config.train.epochs,
        "best_epoch": result.get("best_epoch"),
        "test": result.get("test", {}),
        "n_test_users": n_test_users,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "torch_threads": torch.get_num_threads(),
    }


def _worker(args) -> int:
    with open(args.worker) as fh:
        job = json.load(fh)
    row = measure(job["model"], job["overrides"], job["run_dir"], job["config_dir"], job["dataset_config"])
    atomic_write_json(job["result"], row)
    return 0


def _run_in_subprocess(job: dict, scratch: str, omp_wait_policy: str = "inherit") -> dict:
    job_path = os.path.join(scratch, f"job-{job['model']}.json")
    job["result"] = os.path.join(scratch, f"result-{job['model']}.json")
    atomic_write_json(job_path, job)
    env = dict(os.environ)
    if omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    threads = job["overrides"]["train"].get("threads")
    if threads:   # Numba's OpenMP sampler would reset torch's thread count to Numba's after every call
        env["NUMBA_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", job_path], check=True, env=env)
    with open(job["result"]) as fh:
        return json.load(fh)


# ---------------------------------------------------------------------- report
def _fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def table_markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Time complexity (DGMRec paper, Table 5 layout)",
        "",
        f"- data: `{meta['data']}` ({meta['n_users']:,} users, {meta['n_items']:,} items, "
        f"{meta['n_train']:,} train interactions); mask: {meta['mask']}",
        f"- machine: {meta['machine']}; torch threads {meta['threads']}; "
        f"OMP_WAIT_POLICY {meta['omp_wait_policy']}; "
        f"train.keep_freed_memory {meta.get('keep_freed_memory', False)}",
        f"- epoch cap: {meta['epochs'] or 'the configs (early stopping)'}; seed {meta['seed']}",
        "- Train = median seconds per epoch after the first (training + per-epoch model work, no validation); "
        "Inference = one full-ranking pass over all test users (median of 3); Total = the whole training call.",
        "",
        "| Model | Train (s/epoch) | Inference (s) | Total (s) | Epochs | Peak RSS (MB) | R@20 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        epochs = f"{r['epochs_run']}" + (" (stopped)" if r["early_stopped"] else f" (cap {r['epoch_cap']})")
        lines.append(f"| {LABELS.get(r['model'], r['model'])} (this machine, CPU) | {_fmt(r['train_s_per_epoch'])} | "
                     f"{_fmt(r['inference_s'])} | {_fmt(r['total_s'], 1)} | {epochs} | {r['peak_rss_mb']:.0f} | "
                     f"{_fmt(r['test'].get('recall@20'), 4)} |")
    paper = PAPER_GPU.get(meta.get("paper_dataset") or "", {})
    for name, (tr, inf, tot) in paper.items():
        lines.append(f"| {name} (paper, GPU, {meta['paper_dataset']}) | {tr:.2f} | {inf:.2f} | {tot:.1f} | — | — | — |")
    lines += ["", "## Ratios (train s/epoch)", ""]
    lines += [f"- {line}" for line in ratio_lines(rows, paper)]
    return "\n".join(lines) + "\n"


def ratio_lines(rows: list[dict], paper: dict) -> list[str]:
    by = {r["model"]: r for r in rows if r["train_s_per_epoch"]}
    out = []
    for ref in ("dgmrec", "lightgcn"):
        if ref not in by:
            continue
        for r in rows:
            if r["model"] != ref and r["train_s_per_epoch"]:
                out.append(f"{LABELS[r['model']]} / {LABELS[ref]} = "
                           f"{r['train_s_per_epoch'] / by[ref]['train_s_per_epoch']:.2f}x")
    if "dgmrec" in by and "DGMRec" in paper:
        out.append(f"DGMRec here / DGMRec paper GPU = {by['dgmrec']['train_s_per_epoch'] / paper['DGMRec'][0]:.1f}x "
                   "(train s/epoch)")
    return out


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = (("train_s_per_epoch", "train (s/epoch)"), ("inference_s", "inference (s)"), ("total_s", "total (s)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    names = [LABELS.get(r["model"], r["model"]) for r in rows]
    for ax, (key, label) in zip(axes, keys):
        values = [r[key] or 0.0 for r in rows]
        ax.bar(np.arange(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(np.arange(len(rows)), names, rotation=20)
        ax.set_title(label, fontsize=10)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _machine() -> str:
    import platform

    import psutil

    return (f"{platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} logical cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GB RAM, load average {os.getloadavg()[0]:.1f} at start")


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder")
    p.add_argument("--mask", help="missing-modality mask file")
    p.add_argument("--missing-ratio", help="generate a mask with this ratio instead (e.g. 2/3)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--epochs", type=int, help="epoch cap (default: the configs', with early stopping)")
    p.add_argument("--eval-every", type=int, help="validation interval (default: the configs')")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--threads", type=int, default=0,
                   help="torch (and Numba) threads; 0: torch's default, or 1 with --quick")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="train.keep_freed_memory in every run: faster steps, same metrics, more RSS (glibc only)")
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR))
    p.add_argument("--dataset-config", help="per-model config name, e.g. baby (default: base)")
    p.add_argument("--omp-wait-policy", default="passive", choices=("inherit", "passive", "active"),
                   help="OMP_WAIT_POLICY of the workers (default passive: with the OpenMP default, idle "
                        "Numba/DGL worker threads spin and slow small models several-fold on a busy machine)")
    p.add_argument("--paper-dataset", default="baby", help="which Table 5 block to print beside ours")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "timing"))
    p.add_argument("--quick", action="store_true",    # "%%": argparse %-formats help strings
                   help=f"baby preset scaled to {QUICK_SCALE:.0%}%, 2/3 missing, {QUICK_EPOCHS} epochs (< 3 min)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)

    from dgmrec_dgl.data.dataset import Dataset

    os.makedirs(args.out, exist_ok=True)
    data, epochs, eval_every, ratio = args.data, args.epochs, args.eval_every, args.missing_ratio
    if args.quick:
        from dgmrec_dgl.data.synthetic import generate, preset

        data = data or os.path.join(args.out, "data", "baby_quick")
        if not os.path.exists(os.path.join(data, "synthetic.json")):
            base = preset("baby")
            generate(data, preset("baby", n_users=int(base.n_users * QUICK_SCALE),
                                  n_items=int(base.n_items * QUICK_SCALE)), progress=False)
        epochs = epochs or QUICK_EPOCHS
        args.threads = args.threads or 1
        eval_every = eval_every or epochs
        ratio = ratio or "2/3"
    if not data:
        p.error("--data DIR is required (or --quick)")
    if epochs is not None and epochs < 4:
        p.error("--epochs must be >= 4: the median is over at least 3 epochs after the first")
    # the mask is what the flags say, never a --dataset-config's own data.mask or missing_ratio
    overrides = {"data": {"dir": os.path.abspath(data), "mask": os.path.abspath(args.mask) if args.mask else None,
                          "missing_ratio": float(Fraction(ratio)) if ratio and not args.mask else None},
                 "train": {"seed": args.seed}}
    if epochs:
        overrides["train"]["epochs"] = epochs
    if eval_every:
        overrides["train"]["eval_every"] = eval_every
    if args.threads:
        overrides["train"]["threads"] = args.threads
    if args.keep_freed_memory:
        overrides["train"]["keep_freed_memory"] = True

    ds = Dataset.load(data)
    meta = {"data": os.path.abspath(data), "n_users": ds.n_users, "n_items": ds.n_items, "n_train": len(ds.train),
            "mask": args.mask or (f"generated, ratio {ratio}" if ratio else "none (complete modalities)"),
            "machine": _machine(), "threads": args.threads or "default",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset") if args.omp_wait_policy == "inherit"
            else args.omp_wait_policy.upper(), "keep_freed_memory": args.keep_freed_memory,
            "epochs": epochs, "seed": args.seed,
            "paper_dataset": args.paper_dataset}
    rows = []
    with tempfile.TemporaryDirectory(prefix="timing-", dir=args.out) as scratch:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            job = {"model": model, "overrides": overrides, "run_dir": os.path.join(args.out, "runs", model),
                   "config_dir": args.config_dir, "dataset_config": args.dataset_config}
            row = _run_in_subprocess(job, scratch, args.omp_wait_policy)
            rows.append(row)
            print(f"{model:>9}: train {_fmt(row['train_s_per_epoch'])} s/epoch, "
                  f"inference {_fmt(row['inference_s'])} s, total {row['total_s']:.1f} s over "
                  f"{row['epochs_run']} epochs, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    text = table_markdown(rows, meta)
    atomic_write_json(os.path.join(args.out, "timing_table.json"), {"meta": meta, "rows": rows,
                                                                     "paper_gpu": PAPER_GPU})
    atomic_write_text(os.path.join(args.out, "timing_table.md"), text)
    plot(rows, os.path.join(args.out, "timing_table.png"),
         f"{os.path.basename(os.path.normpath(data))}: {ds.n_users:,} users, {ds.n_items:,} items (CPU)")
    print()
    print(text)
    print(f"wrote {args.out}/timing_table.json, timing_table.md, timing_table.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
