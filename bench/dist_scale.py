"""DistDGL partitions on one machine against single-machine sampled mode (issue 21): seconds per step,
peak RSS of every process and loopback bytes per step, on a partitioned catalog.

Inputs: a dataset folder ``--data`` with its mask ``--mask``, and its partition ``--parts-dir`` (what
``dgmrec-dgl partition DATA --parts N --out P --mask M`` wrote). One config serves both sides:
``configs/<model>/base.yaml`` with ``model.execution: sampled`` (``--fanouts``; ``--history-every R``:
historical embeddings refreshed every R steps, LightGCN only on partitions; 0, the default: every layer
sampled), one epoch, no validation, and ``train.epoch_steps``.

- **single machine**: ``dgmrec-dgl train`` (``--threads``, default 2), one process;
- **partitions**: ``dgmrec-dgl dist-launch --parts N``: N graph servers and N trainers, each trainer with
  ``threads / N`` threads (what ``dist-launch`` gives a trainer on a shared host).

Each side runs with ``--steps`` S1 and S2 steps (default 20 and 100; S2 ``all``: the whole epoch, measured
whole). From rank 0's ``log.jsonl``: the epoch's training seconds (``train_s``; with histories their
refreshes are inside it, also given apart) over its steps (``s_per_step``, of the S2 run). Loopback bytes
per step: the growth of ``lo``'s transmitted bytes (``/proc/net/dev``) between the S1 and the S2 launch
over S2 - S1 steps, so the fixed costs of a launch (start-up, table initialisation, shut-down) cancel; the whole machine's loopback is
counted, so nothing else should use it meanwhile. Peak RSS: every process of the run is sampled every
0.2 s (``psutil``; a trainer or server is told apart by its ``DGL_ROLE``, its partition by ``DGL_SERVER_ID``
or ``RANK``); the figure is each process's largest sample.

Writes ``dist_scale<--tag>.json``, ``.csv`` and ``.png`` (seconds per step and each process's peak RSS, single
machine against the partitions) to ``--out`` atomically and prints the ratios of the same run. The run
folders go to ``--work`` (a temporary folder by default).

    dgmrec-dgl partition /data/scale200000 --parts 2 --out /data/p200k --mask M
    python bench/dist_scale.py --data /data/scale200000 --mask M --parts-dir /data/p200k
    python bench/dist_scale.py ... --history-every 500 --steps 20,all --tag _epoch   # a whole epoch each side
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from dgmrec_dgl.io_utils import atomic_path, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
GB = 1024 ** 3


def loopback_tx_bytes() -> int:
    """Bytes ``lo`` has transmitted since boot (``/proc/net/dev``)."""
    with open("/proc/net/dev") as fh:
        for line in fh:
            name, _, data = line.partition(":")
            if name.strip() == "lo":
                return int(data.split()[8])
    raise RuntimeError("/proc/net/dev has no 'lo' interface")


class TreeRss(threading.Thread):
    """Samples the RSS of a process and all its descendants every ``interval`` seconds; keeps each one's
    peak under a label: ``server <part>``, ``trainer <part>`` or ``process`` (see the module docstring)."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.peaks: dict[str, int] = {}
        self.labels: dict[int, str] = {}
        self.stopped = threading.Event()

    def label(self, proc: psutil.Process) -> str | None:
        if proc.pid not in self.labels:
            try:
                env = proc.environ()
                cmd = proc.cmdline()
            except (psutil.Error, OSError):
                return None
            if "train" not in cmd:
                return None                          # the launcher itself, or a helper shell
            if env.get("DGL_ROLE") == "server":
                self.labels[proc.pid] = f"server {env.get('DGL_SERVER_ID', '?')}"
            elif "RANK" in env and "--dist-config" in cmd:
                self.labels[proc.pid] = f"trainer {env['RANK']}"
            else:
                self.labels[proc.pid] = "process"
        return self.labels[proc.pid]

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            for proc in procs:
                name = self.label(proc)
                if name is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            self.stopped.wait(self.interval)

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.join()
        return {name: rss / GB for name, rss in sorted(self.peaks.items())}


def write_config(work: Path, args, steps: int | None) -> Path:
    """The config of a run of ``steps`` steps (None: the whole epoch)."""
    path = work / f"{args.model}-{steps or 'epoch'}.yaml"
    fanouts = f"fanouts: [{', '.join(str(f) for f in args.fanouts)}], " if args.fanouts else ""
    cap = f"epoch_steps: {steps}, " if steps else ""
    path.write_text(f"extends: {ROOT / 'configs' / args.model / 'base.yaml'}\n"
                    f"model: {{execution: sampled, {fanouts}history_every: {args.history_every}}}\n"
                    f"train: {{epochs: 1, eval_every: 2, {cap}seed: {args.seed}}}\n")
    return path


def run_side(kind: str, steps: int | None, args, work: Path) -> dict:
    """One run (``single`` or ``dist``) of ``steps`` steps (None: the whole epoch); its seconds per step, peaks
    and loopback bytes."""
    out = work / f"{kind}-{steps or 'epoch'}"
    config = write_config(work, args, steps)
    common = ["--config", str(config), "--data", str(args.data), "--mask", str(args.mask), "--out", str(out),
              "--quiet"]
    exe = [sys.executable, "-m", "dgmrec_dgl.cli"]
    if kind == "single":
        cmd = exe + ["train", *common, "--threads", str(args.threads)]
    else:
        cmd = exe + ["dist-launch", "--parts", str(args.parts), "--part-config", str(args.part_config), *common,
                     "--threads", str(args.threads)]
    lo = loopback_tx_bytes()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    monitor = TreeRss(proc.pid)
    monitor.start()
    log, _ = proc.communicate(timeout=args.timeout)
    peaks = monitor.stop()
    wall = time.perf_counter() - t
    sent = loopback_tx_bytes() - lo
    if proc.returncode != 0:
        raise SystemExit(f"error: {kind} run of {steps} steps failed (exit {proc.returncode}):\n{log[-2000:]}")
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    ran = record.get("steps", steps)
    history = record.get("history", {})
    return {"side": kind, "steps": ran, "whole_epoch": steps is None, "wall_s": wall,
            "train_s": record["seconds"]["train"], "s_per_step": record["seconds"]["train"] / ran,
            "history_refreshes": history.get("refreshes", 0), "history_refresh_s": history.get("seconds", 0.0),
            "loopback_bytes": sent, "peak_rss_gb": peaks}


def summarize(rows: list[dict]) -> dict:
    """Ratios of the longer runs (the S2 ones); loopback bytes per step differenced between the dist runs."""
    dists = sorted((r for r in rows if r["side"] == "dist"), key=lambda r: r["steps"])
    single = max((r for r in rows if r["side"] == "single"), key=lambda r: r["steps"])
    low, dist = dists[0], dists[-1]
    per_step = (dist["loopback_bytes"] - low["loopback_bytes"]) / (dist["steps"] - low["steps"])
    return {"steps": dist["steps"], "whole_epoch": dist["whole_epoch"],
            "single_train_s": single["train_s"], "dist_train_s": dist["train_s"],
            "single_s_per_step": single["s_per_step"], "dist_s_per_step": dist["s_per_step"],
            "dist_over_single": dist["s_per_step"] / single["s_per_step"],
            "loopback_bytes_per_step": per_step,
            "single_peak_rss_gb": max(single["peak_rss_gb"].values()),
            "dist_peak_rss_gb": dist["peak_rss_gb"],
            "dist_total_rss_gb": sum(dist["peak_rss_gb"].values())}


def write(doc: dict, out: Path, tag: str = "") -> None:
    """``dist_scale<tag>.json``, ``.csv`` and ``.png`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"dist_scale{tag}"
    atomic_write_json(out / f"{name}.json", doc)
    buf = io.StringIO()
    fields = ["side", "steps", "whole_epoch", "wall_s", "train_s", "s_per_step", "history_refreshes",
              "history_refresh_s", "loopback_bytes", "peak_rss_gb"]
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in doc["rows"]:
        writer.writerow({**r, "peak_rss_gb": json.dumps({k: round(v, 3) for k, v in r["peak_rss_gb"].items()})})
    atomic_write_text(out / f"{name}.csv", buf.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["summary"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    epoch = s.get("whole_epoch", False)
    a.bar(["one machine", f"{doc['meta']['parts']} partitions"],
          [s["single_train_s"], s["dist_train_s"]] if epoch else [s["single_s_per_step"], s["dist_s_per_step"]],
          color=["C0", "C1"])
    a.set_ylabel("seconds per epoch" if epoch else "seconds per step")
    a.set_title(f"{doc['meta']['model']}, {doc['meta']['n_items']:,} items"
                + (f", a whole epoch ({s['steps']:,} steps)" if epoch else ""), fontsize=10)
    names = ["one machine"] + list(s["dist_peak_rss_gb"])
    b.bar(names, [s["single_peak_rss_gb"]] + list(s["dist_peak_rss_gb"].values()),
          color=["C0"] + ["C1"] * len(s["dist_peak_rss_gb"]))
    b.set_ylabel("peak RSS (GB)")
    b.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(out / f"{name}.png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="the dataset folder the partition was made from")
    p.add_argument("--mask", type=Path, required=True, help="its missing-modality mask (the partition's)")
    p.add_argument("--parts-dir", type=Path, required=True, help="the partition folder (dgmrec-dgl partition --out)")
    p.add_argument("--model", default="lightgcn", choices=("lightgcn", "dgmrec"))
    p.add_argument("--steps", default="20,100", help="the two step counts S1,S2 (S1 < S2; S2 'all': a whole epoch)")
    p.add_argument("--history-every", type=int, default=0,
                   help="model.history_every (historical embeddings refreshed every R steps; 0: off)")
    p.add_argument("--tag", default="", help="suffix of the result files (dist_scale<TAG>.json)")
    p.add_argument("--fanouts", type=lambda t: [int(v) for v in t.split(",")], default=None,
                   help="model.fanouts (default: the config's)")
    p.add_argument("--threads", type=int, default=2, help="threads of the single process (the trainers share them)")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        low, high = (None if v == "all" else int(v) for v in args.steps.split(","))
    except ValueError:
        p.error(f"--steps {args.steps!r}: give two step counts S1,S2, e.g. 20,100 (or 20,all)")
    if low is None or not 0 < low < (high or low + 1):
        p.error(f"--steps {args.steps!r}: need 0 < S1 < S2")
    if args.history_every < 0:
        p.error(f"--history-every {args.history_every}: give 0 (off) or a positive step count")
    summary_file = args.parts_dir / "partition_summary.json"
    if not summary_file.exists():
        print(f"error: {summary_file}: not found; fix: pass the folder `dgmrec-dgl partition --out` wrote",
              file=sys.stderr)
        return 2
    part = json.loads(summary_file.read_text())
    args.parts, args.part_config = int(part["num_parts"]), args.parts_dir / part["part_config"]
    counts = {nt: sum(r["nodes"].get(nt, 0) for r in part["parts"]) for nt in ("user", "item")}

    with tempfile.TemporaryDirectory(prefix="dist-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for steps in (low, high):
            for side in ("single", "dist"):
                rows.append(run_side(side, steps, args, work))
                r = rows[-1]
                print(f"{side:6s} {r['steps']:4d} steps: {r['s_per_step']:.3f} s/step, train {r['train_s']:.0f} s "
                      f"({r['history_refreshes']} refreshes, {r['history_refresh_s']:.0f} s), wall {r['wall_s']:.0f} s, "
                      f"loopback {r['loopback_bytes'] / 1e6:.1f} MB, peaks "
                      + ", ".join(f"{k} {v:.2f} GB" for k, v in r["peak_rss_gb"].items()), flush=True)
    summary = summarize(rows)
    meta = {"model": args.model, "parts": args.parts, "data": str(args.data), "parts_dir": str(args.parts_dir),
            "steps": [low, high or "all"], "fanouts": args.fanouts, "history_every": args.history_every,
            "threads": args.threads, "seed": args.seed,
            "n_items": counts["item"], "n_users": counts["user"],
            "load_average_end": os.getloadavg(), "run": time.strftime("%Y-%m-%d %H:%M:%S")}
    write({"meta": meta, "rows": rows, "summary": summary}, args.out, args.tag)
    print(f"{args.parts} partitions / one machine, seconds per step: {summary['dist_over_single']:.2f} "
          f"({summary['dist_s_per_step']:.3f} / {summary['single_s_per_step']:.3f}); loopback "
          f"{summary['loopback_bytes_per_step'] / 1e6:.2f} MB per step; peak RSS one machine "
          f"{summary['single_peak_rss_gb']:.2f} GB, partitions {summary['dist_total_rss_gb']:.2f} GB in all")
    if summary["whole_epoch"]:
        print(f"a whole epoch ({summary['steps']:,} steps): one machine {summary['single_train_s']:.0f} s, "
              f"{args.parts} partitions {summary['dist_train_s']:.0f} s")
    print(f"wrote {args.out / f'dist_scale{args.tag}.json'}, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
