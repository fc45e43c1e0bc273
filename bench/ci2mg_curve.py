"""CI2MG's early learning curve under the release's choices and under each one reverted (issue 19, item 4).

The release's CI2MG (``configs/ci2mg/<dataset>.yaml``: no lr decay, stopping_step 25, TikTok's batch 4096,
``generated_for: all``, one BatchNorm shared by the modalities) against the earlier defaults (``today``: lr
decay 0.96, batch 2048, ``generated_for: missing``, one BatchNorm per modality) and against the release with one
choice changed at a time, so the curve says which choice moves it. Every variant trains ``--epochs`` epochs
(15) from the same seed with a validation after each (patience out of the way) on the TikTok-shaped set of
``bench/sampled_quality.py`` (the shared TikTok interactions, generated 128-d image and audio features, the
shipped 0.6 mask on those two modalities) or another of its datasets (``--dataset``, e.g. ``toy``).

Writes ``ci2mg_curve.json``, ``.csv`` (valid R@20 per variant and epoch) and ``.png`` into ``--out``; the run
folders go to ``--runs`` and a finished one (``metrics.json`` says so, same config) is read instead of
trained again, so a long comparison can be stopped and continued.

    python bench/ci2mg_curve.py                                # 7 variants x 15 epochs: ~1.5 h on 1 thread
    python bench/ci2mg_curve.py --variants release,today --epochs 6
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sampled_quality  # noqa: E402  (the sibling script: its prepare() makes the datasets)

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ci2mg"
#: overrides of each variant on top of the dataset's release config
VARIANTS = {
    "release": {},
    "today": {"train": {"lr_decay": 0.96, "batch_size": 2048},
              "model": {"generated_for": "missing", "shared_norm": False}},
    "release-batch2048": {"train": {"batch_size": 2048}},
    "release-generated_missing": {"model": {"generated_for": "missing"}},
    "release-own_norm": {"model": {"shared_norm": False}},
    "release-contrastive_release": {"model": {"contrastive": "release"}},
    "release-full_ot": {"model": {"ot_block": 8192}},       # >= the items of TikTok (6,710): one I x I problem
}


def variant_config(name: str, dataset: str, folder: Path, mask: str | None, epochs: int, seed: int, threads: int):
    from dgmrec_dgl.config import load_config

    path = CONFIGS / f"{dataset}.yaml"
    overrides = {"data": {"dir": str(folder), "mask": mask},
                 "train": {"epochs": epochs, "eval_every": 1, "patience": 100, "seed": seed,
                           "threads": threads},
                 "model": {}}
    for section, values in VARIANTS[name].items():
        overrides[section] = {**overrides[section], **values}
    return load_config(str(path if path.exists() else CONFIGS / "base.yaml"), overrides)


def run_variant(config, run: Path) -> list[float]:
    """Valid R@20 after each epoch of ``config``'s training in ``run`` (trained unless already finished)."""
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.train import train

    metrics = run / "metrics.json"
    done = metrics.exists() and json.loads(metrics.read_text()).get("finished")
    if done and load_config(str(run / "config.yaml")).to_dict() == config.to_dict():
        print(f"  {run.name}: finished before with this config, read", flush=True)
    else:
        train(config, str(run), progress=False)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["valid"]["recall@20"] for r in rows if "valid" in r]


def plot(curves: dict[str, list[float]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgmrec_dgl.io_utils import atomic_path

    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, values) in enumerate(curves.items()):
        style = "-" if name in ("release", "today") else "--"
        ax.plot(range(1, len(values) + 1), values, style, marker="o", ms=3, color=f"C{k}", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("valid Recall@20")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="tiktok", help="tiktok, or a synthetic preset of bench/sampled_quality")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("runs/quality_data"), help="where the dataset is made")
    p.add_argument("--runs", type=Path, default=Path("runs/ci2mg_curve"), help="the variants' run folders")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants {args.variants!r}: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if args.epochs < 1 or args.threads < 1:
        p.error("--epochs and --threads must be >= 1")
    try:
        folder, mask = sampled_quality.prepare(args.dataset, args.work)
    except SystemExit as exc:       # the shared TikTok data is missing
        print(exc if isinstance(exc.code, str) else f"error: {args.dataset}: data not available", file=sys.stderr)
        return 2
    curves = {}
    for name in names:
        config = variant_config(name, args.dataset, folder, mask, args.epochs, args.seed, args.threads)
        curves[name] = run_variant(config, args.runs / args.dataset / name)
        print(f"{name:<30}" + " ".join(f"{v:.4f}" for v in curves[name]), flush=True)

    from dgmrec_dgl.io_utils import atomic_write_json, atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "ci2mg_curve.json", {
        "meta": {"dataset": args.dataset, "epochs": args.epochs, "seed": args.seed, "threads": args.threads,
                 "metric": "valid recall@20 after each epoch", "variants": {n: VARIANTS[n] for n in names}},
        "curves": curves})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", *(f"epoch{e}" for e in range(1, args.epochs + 1))])
    for name, values in curves.items():
        w.writerow([name, *(f"{v:.6f}" for v in values)])
    atomic_write_text(args.out / "ci2mg_curve.csv", buf.getvalue())
    plot(curves, f"CI2MG on {args.dataset}: the release's choices, each reverted (seed {args.seed})",
         args.out / "ci2mg_curve.png")
    print(f"wrote {args.out / 'ci2mg_curve.json'}, .csv, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
