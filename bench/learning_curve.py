"""Learning curve of DGMRec trained in sampled mode on a large synthetic catalog (issue 18).

Valid Recall@20 and NDCG@20 on one seeded sample of valid users (``--user-sample``, 20,000): of the untrained
model (built exactly as the trainer builds it: same seed, same order), after each of ``--epochs`` (3) epochs
of :func:`dgmrec_dgl.train.train` (``eval_every: 1``, ``eval.user_sample``), and of the popularity ranker on
the same users. A curve that rises from the untrained model's towards (or past) the popularity ranker's
shows the sampled steps learn; on data whose held-out items follow popularity the ranker is a high bar, and
the table says so.

Data: a folder made by ``bench/scale.py`` (``--sizes 200000 --work W --stages generate --keep-data`` gives
``W/scale200000``: 200K items, 400K users, 4096-d image + 384-d text, float16), a 2/3 mask (seed 2024), both
modalities PCA-reduced to ``--reduce-dims`` (256). Config: ``configs/dgmrec/base.yaml`` with
``model.execution: sampled`` and ``model.history_every`` (``--history-every``, 500; 0 = every layer sampled).

Writes ``learning_curve.json``, ``.csv`` and ``.png`` (valid R@20 against cumulative wall-clock seconds,
the popularity ranker as a line) to ``--out`` (``bench/results``) and the run folder to ``--run``.

    python bench/scale.py --sizes 200000 --work /data/scale --stages generate --keep-data --out /data/scale/results
    python bench/learning_curve.py --data /data/scale/scale200000          # ~1.5 h on 2 cores
    python bench/learning_curve.py --data /data/scale/scale200000 --resume # continue a stopped run's epochs
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BASE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dgmrec" / "base.yaml"
METRICS = ("recall@20", "ndcg@20")


def build_config(args):
    from dgmrec_dgl.config import load_config

    return load_config(str(BASE_CONFIG), {
        "data": {"dir": str(args.data), "missing_ratio": 2 / 3, "mask_seed": 2024, "reduce_dims": args.reduce_dims,
                 "feature_dtype": "float16"},
        "train": {"epochs": args.epochs, "eval_every": 1, "seed": args.seed, "threads": args.threads},
        "eval": {"user_sample": args.user_sample},
        "model": {"execution": "sampled", "history_every": args.history_every}})


def untrained_and_popularity(config) -> tuple[dict, dict, dict]:
    """Valid metrics of the model the trainer would start from and of the popularity ranker, and data counts."""
    import torch

    from dgmrec_dgl.evaluate import evaluate, popularity_scores
    from dgmrec_dgl.models import build_model
    from dgmrec_dgl.train import evaluate_model, load_dataset

    import numba

    torch.set_num_threads(config.train.threads)                # the trainer's order: threads, seed, data, model
    numba.set_num_threads(min(config.train.threads, numba.config.NUMBA_NUM_THREADS))
    torch.manual_seed(config.train.seed)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    untrained = evaluate_model(model, model.scoring_graph(g), dataset, "valid", config,
                               user_sample=config.eval.user_sample)
    popular = evaluate(popularity_scores(dataset), dataset, "valid", config.eval.ks,
                       budget_bytes=config.eval.budget_mb << 20, user_sample=config.eval.user_sample,
                       seed=config.train.seed)
    counts = {"n_users": dataset.n_users, "n_items": dataset.n_items, "n_train": len(dataset.train)}
    return untrained, popular, counts


def curve_rows(run: Path, untrained: dict, popular: dict) -> list[dict]:
    """One row per point: epoch 0 (untrained), then every validated epoch, each with the popularity ranker's."""
    from dgmrec_dgl.train import wall_seconds

    rows = [{"epoch": 0, "seconds": 0.0, **{k: untrained[k] for k in METRICS}}]
    total = 0.0
    for line in (run / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        total += wall_seconds(record)
        if "valid" in record:
            rows.append({"epoch": record["epoch"] + 1, "seconds": total,
                         **{k: record["valid"][k] for k in METRICS}})
    for row in rows:
        row.update({f"popularity_{k}": popular[k] for k in METRICS})
    return rows


def write(rows: list[dict], meta: dict, out: Path) -> None:
    from dgmrec_dgl.io_utils import atomic_path, atomic_write_json, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "learning_curve.json", {"meta": meta, "rows": rows})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "learning_curve.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["seconds"] for r in rows], [r["recall@20"] for r in rows], "-o", label="DGMRec, sampled")
    ax.axhline(rows[0]["popularity_recall@20"], color="C3", linestyle="--", label="popularity ranker")
    for r in rows:
        ax.annotate(f"epoch {r['epoch']}", (r["seconds"], r["recall@20"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("wall-clock seconds (training + per-epoch work + validation)")
    ax.set_ylabel(f"valid Recall@20 ({meta['user_sample']:,} users)")
    ax.set_title(f"{meta['n_items']:,} items, {meta['n_users']:,} users")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "learning_curve.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a bench/scale.py data folder (scale<n>)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--user-sample", type=int, default=20_000)
    p.add_argument("--history-every", type=int, default=500)
    p.add_argument("--reduce-dims", type=int, default=256)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", type=Path, default=Path("runs/learning_curve"), help="the training's run folder")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true",
                   help="continue the training in --run from its last checkpoint (a run stopped part-way, e.g. at a "
                        "session's end); without it --run is started afresh")
    args = p.parse_args(argv)
    if not (args.data / "synthetic.json").exists():
        print(f"error: {args.data}: synthetic.json: not found; fix: make the data with bench/scale.py "
              "--sizes N --work W --stages generate --keep-data and pass --data W/scaleN", file=sys.stderr)
        return 2

    from dgmrec_dgl.run_folder import claimed
    from dgmrec_dgl.train import train

    config = build_config(args)
    t = time.perf_counter()
    untrained, popular, counts = untrained_and_popularity(config)
    print(f"untrained valid R@20 {untrained['recall@20']:.4f}, popularity {popular['recall@20']:.4f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    with claimed(config, args.run, overwrite=not args.resume, resume=args.resume):
        train(config, str(args.run), resume=args.resume, progress=True)
    rows = curve_rows(args.run, untrained, popular)
    meta = {**counts, "user_sample": args.user_sample, "epochs": args.epochs, "history_every": args.history_every,
            "reduce_dims": args.reduce_dims, "seed": args.seed, "threads": args.threads, "data": str(args.data),
            "execution": "sampled", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write(rows, meta, args.out)
    for r in rows:
        print(f"epoch {r['epoch']}: valid R@20 {r['recall@20']:.4f} (popularity {r['popularity_recall@20']:.4f}), "
              f"{r['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
