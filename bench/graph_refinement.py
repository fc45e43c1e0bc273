"""Benchmark: kNN graph build + one refinement step (DGMRec Eq. 4 and 16), dense torch vs FAISS + Numba.

For each catalog size n and feature width d (synthetic clustered float32 features, k = 10, half of the
items missing the modality, mean-imputed as in the reference):

(a) ``dense`` — the reference approach in torch: n x n cosine -> top-k -> zero the rows/columns of missing
    items, diagonal 1 for them -> dense D^-1/2 S D^-1/2. Refinement: dense cosine on the generated
    features -> top-k (sources: items that have the modality) -> normalise the rebuilt graph -> blend the
    rows of missing items (alpha old + (1 - alpha) new). Written to need one n x n float32 buffer per
    stage (the product, the top-k scatter, the masks and the normalisation all reuse it; the graph is
    kept as its non-zeros between stages); skipped as "out of memory (needs X GB)" when n^2 * 4 bytes
    exceeds ``--dense-limit-gb`` (16 GB).
(b) ``faiss`` — ``build_knn`` + ``normalize_knn``; refinement ``refine_knn`` (sources="present",
    degree = raw row sums of the initial graph).

Each (variant, stage) runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is attributable; the
features are regenerated there (not timed). Recall@10 of (b) against (a): per row |A ∩ B| / |A| over the
rows of present items (build) and over the refined rows without the self-loop (refinement).

For (b) the worker also reports, after its timed region, recall@10 against exact search on 2,000 sampled
rows (column ``r.exact``), which exists at the sizes where (a) cannot run.

Writes ``bench/results/graph_refinement.{json,csv,png}`` (atomically, after every finished size) and
prints a table with the dense / FAISS ratios.

    python bench/graph_refinement.py --quick              # 7,050 and 20,000 items, d = 384, < 2 min
    python bench/graph_refinement.py                      # all sizes, d = 384 and 4096
    python bench/graph_refinement.py --sizes 50000 --dims 384
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dgmrec_dgl.io_utils import atomic_write_bytes, atomic_write_text

SIZES = [7_050, 20_000, 50_000, 200_000, 1_000_000]
DIMS = [384, 4096]
QUICK_SIZES = [7_050, 20_000]
RESULTS = Path(__file__).resolve().parent / "results"
MARK = "@@RESULT@@ "
GB = 1024 ** 3


# ------------------------------------------------------------------------------------------------ data


def make_data(n: int, d: int, missing_ratio: float, seed: int, stage: str):
    """Features for one stage, built in place: [n, d] float32, plus the present mask.

    ``build``: missing rows hold the mean of the present rows (the reference's mean imputation).
    ``refine``: missing rows hold "generated" features = the true (synthetic) features + noise of norm 0.5.
    """
    from dgmrec_dgl.graphs.knn import clustered_features

    x = clustered_features(n, d, seed=seed)
    present = present_mask(n, missing_ratio, seed)
    missing = np.flatnonzero(~present)
    rng = np.random.default_rng(seed + 2)
    if stage == "build":
        mean = np.zeros(d, dtype=np.float64)
        for start in range(0, n, 65_536):
            block = x[start:start + 65_536]
            mean += block[present[start:start + 65_536]].sum(axis=0, dtype=np.float64)
        mean /= max(1, int(present.sum()))
        x[missing] = mean.astype(np.float32)
    else:
        for start in range(0, missing.size, 65_536):
            rows = missing[start:start + 65_536]
            noise = rng.standard_normal((rows.size, d), dtype=np.float32)
            noise *= np.float32(0.5 / np.sqrt(d))
            x[rows] += noise
    return x, present


def present_mask(n: int, missing_ratio: float, seed: int) -> np.ndarray:
    """bool [n]: False for a random ``missing_ratio`` of the items."""
    present = np.ones(n, dtype=bool)
    present[np.random.default_rng(seed + 1).choice(n, size=int(round(missing_ratio * n)), replace=False)] = False
    return present


def warm_up():
    """Load the Numba kernels (compiled once, cached on disk) outside the timed region."""
    from dgmrec_dgl.graphs.knn import KnnGraph, normalize_knn
    from kernels.ivf import ivf_topk
    from kernels.refine import refine_rows

    g = normalize_knn(KnnGraph(np.array([0, 1, 2]), np.array([0, 1]), np.ones(2, np.float32)))
    refine_rows(g.indptr, g.indices, g.weights, np.array([1]), np.array([0, 1]), np.array([0]),
                np.ones(1, np.float32), 0.5)
    ivf_topk(np.ones((2, 4), np.float32), np.array([0]), np.ones(1, np.float32), np.array([0, 2]),
             np.array([0, 1]), np.ones(2, np.float32), np.zeros((1, 1), np.int64), 1)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def save_graph(path: Path, indptr, indices, weights, degree=None):
    arrays = dict(indptr=indptr, indices=indices, weights=weights)
    if degree is not None:
        arrays["degree"] = degree
    np.savez(path, **arrays)


# ----------------------------------------------------------------------------------------- (a) dense


def _dense_cosine_topk(x: np.ndarray, k: int, sources: np.ndarray | None = None):
    """Dense n x n cosine similarities with all but each row's top-k (among ``sources``) zeroed, in place."""
    import torch

    n = x.shape[0]
    xt = torch.from_numpy(x)
    xn = xt / xt.norm(dim=1, keepdim=True)
    sim = torch.empty(n, n, dtype=torch.float32)
    torch.mm(xn, xn.T, out=sim)
    del xn
    if sources is not None:
        sim.index_fill_(1, torch.from_numpy(np.flatnonzero(~sources)), float("-inf"))
    vals, idx = torch.topk(sim, k, dim=1)
    sim.zero_()
    sim.scatter_(1, idx, vals)
    return sim


def dense_build(x: np.ndarray, present: np.ndarray, k: int):
    """Reference initial graph in dense torch; returns the normalised n x n tensor (one n x n buffer)."""
    import torch

    sim = _dense_cosine_topk(x, k)
    keep = torch.from_numpy(present.astype(np.float32))
    sim.mul_(keep[:, None])
    sim.mul_(keep[None, :])
    missing = torch.from_numpy(np.flatnonzero(~present))
    sim[missing, missing] = 1.0
    _dense_sym_norm_(sim)
    return sim


def _dense_sym_norm_(sim):
    """In place: sim <- D^-1/2 sim D^-1/2 with D = row sums (0 where a row sums to 0)."""
    import torch

    deg = sim.sum(dim=1)
    inv = deg.pow(-0.5)
    inv[torch.isinf(inv)] = 0.0
    sim.mul_(inv[:, None])
    sim.mul_(inv[None, :])


def dense_refine(x: np.ndarray, present: np.ndarray, old, k: int, alpha: float):
    """Reference refinement in dense torch; ``old`` is the initial graph's CSR. Returns the n x n result."""
    import torch

    n = x.shape[0]
    sim = _dense_cosine_topk(x, k, sources=present)  # sources: items that have the modality
    _dense_sym_norm_(sim)  # the rebuilt, normalised graph
    # blend: present rows <- old rows; missing rows <- alpha * old + (1 - alpha) * rebuilt (in place)
    indptr, indices, weights = (torch.from_numpy(a) for a in old)
    miss = torch.from_numpy(~present)
    keep_new = torch.where(miss, 1.0 - alpha, 0.0)
    old_coef = torch.where(miss, alpha, 1.0)
    chunk = max(64, (1 << 26) // n)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        block = sim[start:stop]
        block.mul_(keep_new[start:stop, None])
        lo, hi = int(indptr[start]), int(indptr[stop])
        local = torch.repeat_interleave(torch.arange(stop - start), indptr[start + 1:stop + 1] - indptr[start:stop])
        block.index_put_((local, indices[lo:hi]), weights[lo:hi] * old_coef[start + local], accumulate=True)
    return sim


def dense_to_csr(sim):
    """Non-zeros of a dense n x n tensor as CSR arrays, block by block (bounded extra memory)."""
    import torch

    n = sim.shape[0]
    chunk = max(64, (1 << 26) // n)
    counts, cols, vals = [], [], []
    for start in range(0, n, chunk):
        block = sim[start:start + chunk]
        r, c = block.nonzero(as_tuple=True)
        counts.append(torch.bincount(r, minlength=block.shape[0]).numpy())
        cols.append(c.numpy())
        vals.append(block[r, c].numpy())
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    return indptr, np.concatenate(cols).astype(np.int64), np.concatenate(vals).astype(np.float32)


# ------------------------------------------------------------------------------------------------- worker


def worker(spec: dict) -> dict:
    """Run one (variant, stage) and return its measurements (in a fresh process)."""
    n, d, k, variant, stage = spec["n"], spec["d"], spec["k"], spec["variant"], spec["stage"]
    workdir = Path(spec["workdir"])
    if variant == "dense":
        import torch  # noqa: F401  (imported before the baseline RSS is read)
    from dgmrec_dgl.graphs.knn import KnnGraph, build_knn, normalize_knn
    from dgmrec_dgl.graphs.refine import refine_knn

    if variant == "faiss":
        warm_up()
    x, present = make_data(n, d, spec["missing_ratio"], spec["seed"], stage)
    old = None
    if stage == "refine":
        z = np.load(workdir / f"{variant}_build.npz")
        old = (z["indptr"], z["indices"], z["weights"])
        degree = z["degree"] if "degree" in z else None
    rss_before = rss_gb()
    out = workdir / f"{variant}_{stage}.npz"
    extra = {}
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    if variant == "dense":
        sim = dense_build(x, present, k) if stage == "build" else dense_refine(x, present, old, k, spec["alpha"])
        seconds = time.perf_counter() - t0
        extra["cpu_seconds"] = cpu_seconds() - c0
        peak = rss_gb()
        save_graph(out, *dense_to_csr(sim))
    else:
        progress = spec["progress"]
        if stage == "build":
            raw = build_knn(x, k, present, seed=spec["seed"], progress=progress)
            g = normalize_knn(raw)
            seconds = time.perf_counter() - t0
            extra["cpu_seconds"] = cpu_seconds() - c0
            peak = rss_gb()
            save_graph(out, g.indptr, g.indices, g.weights, raw.row_degree())
        else:
            g = refine_knn(KnnGraph(*old), x, np.flatnonzero(~present), spec["alpha"], k, sources="present",
                           present=present, degree=degree, seed=spec["seed"], progress=progress)
            seconds = time.perf_counter() - t0
            extra["cpu_seconds"] = cpu_seconds() - c0
            peak = rss_gb()
            save_graph(out, g.indptr, g.indices, g.weights)
        extra["recall_vs_exact_sampled"] = sampled_recall(g, x, present, k, stage, spec["seed"])
    return dict(seconds=seconds, rss_before_gb=rss_before, peak_rss_gb=peak, **extra)


def sampled_recall(g, x, present, k, stage, seed, n_sample=2000) -> float:
    """Recall@k of the FAISS graph against exact search on a sample of rows (after the timed region).

    Build: present rows vs the exact top-k among present items. Refine: missing rows (self-loop left out)
    vs the exact top-k among present items on the generated features.
    """
    from dgmrec_dgl.graphs.knn import query_rows

    sources = np.flatnonzero(present)
    pool = sources if stage == "build" else np.flatnonzero(~present)
    rows = np.sort(np.random.default_rng(seed + 3).choice(pool, size=min(n_sample, pool.size), replace=False))
    exact = query_rows(x, rows, sources, k, index="exact", progress=False)
    hits = total = 0
    for t, i in enumerate(rows):
        want = set(exact.indices[exact.indptr[t]:exact.indptr[t + 1]].tolist())
        got = set(g.indices[g.indptr[i]:g.indptr[i + 1]].tolist())
        if stage == "refine":
            got.discard(int(i))
        hits += len(want & got)
        total += len(want)
    return hits / max(1, total)


def run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status=f"timeout after {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
        return dict(status=f"failed: {why}")
    return dict(status="ok", **json.loads(lines[-1][len(MARK):]))


# ------------------------------------------------------------------------------------------------- recall


def load_csr(path: Path):
    import scipy.sparse as sp

    z = np.load(path)
    n = z["indptr"].size - 1
    return sp.csr_matrix((z["weights"], z["indices"], z["indptr"]), shape=(n, n))


def pattern_recall(ref, got, rows, drop_self: bool) -> float:
    """Mean over ``rows`` of |A ∩ B| / |A| for the column sets A of ``ref`` and B of ``got``."""
    import scipy.sparse as sp

    a = (ref[rows] != 0).astype(np.float32).tocsr()
    b = (got[rows] != 0).astype(np.float32).tocsr()
    if drop_self:
        eye = sp.csr_matrix((np.ones(rows.size, np.float32), (np.arange(rows.size), rows)), shape=a.shape)
        a = (a - a.multiply(eye)).tocsr()
        b = (b - b.multiply(eye)).tocsr()
        a.eliminate_zeros()
        b.eliminate_zeros()
    size = np.asarray(a.sum(axis=1)).ravel()
    hits = np.asarray(a.multiply(b).sum(axis=1)).ravel()
    ok = size > 0
    return float(np.mean(hits[ok] / size[ok])) if ok.any() else float("nan")


# ------------------------------------------------------------------------------------------------- driver


def write_results(rows: list[dict], meta: dict, out: Path):
    atomic_write_text(out / "graph_refinement.json", json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    fields = ["n", "d", "stage", "dense_status", "dense_s", "dense_cpu_seconds", "dense_peak_rss_gb",
              "faiss_status", "faiss_s", "faiss_cpu_seconds",
              "faiss_peak_rss_gb", "faiss_rss_before_gb", "dense_rss_before_gb", "speedup", "recall_at_10",
              "faiss_recall_vs_exact_sampled", "max_abs_weight_diff"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(out / "graph_refinement.csv", buf.getvalue())
    plot(rows, out / "graph_refinement.png")


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, style in (("dense", "--"), ("faiss", "-")):
        for stage, marker in (("build", "o"), ("refine", "s")):
            for d in sorted({r["d"] for r in rows}):
                pts = [r for r in rows if r["d"] == d and r["stage"] == stage and r.get(f"{variant}_s")]
                if not pts:
                    continue
                ns = [r["n"] for r in pts]
                label = f"{variant} {stage} d={d}"
                axes[0].plot(ns, [r[f"{variant}_s"] for r in pts], style, marker=marker, label=label)
                axes[1].plot(ns, [r[f"{variant}_peak_rss_gb"] for r in pts], style, marker=marker, label=label)
    for ax, ylabel in zip(axes, ("wall seconds", "peak RSS (GB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items n")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("kNN build and one refinement step")
    axes[1].set_title("peak RSS of the stage's process")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def fmt(v, spec="{:.2f}"):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else spec.format(v)


def print_table(rows: list[dict]):
    head = (f"{'n':>9} {'d':>5} {'stage':>6} | {'dense s':>9} {'faiss s':>8} {'ratio':>7} | "
            f"{'dense GB':>8} {'faiss GB':>8} | {'recall':>6} {'r.exact':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        dense = fmt(r.get("dense_s")) if r.get("dense_status") == "ok" else r.get("dense_status", "-")[:24]
        print(f"{r['n']:>9} {r['d']:>5} {r['stage']:>6} | {dense:>9} {fmt(r.get('faiss_s')):>8} "
              f"{fmt(r.get('speedup'), '{:.1f}x'):>7} | {fmt(r.get('dense_peak_rss_gb')):>8} "
              f"{fmt(r.get('faiss_peak_rss_gb')):>8} | {fmt(r.get('recall_at_10'), '{:.4f}'):>6} "
              f"{fmt(r.get('faiss_recall_vs_exact_sampled'), '{:.4f}'):>7}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sizes 7,050 and 20,000 at d = 384 only")
    p.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--dims", type=lambda s: [int(v) for v in s.split(",")], default=None)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.6, help="weight of the old graph (Baby: 1 - 0.4)")
    p.add_argument("--missing-ratio", type=float, default=0.5,
                   help="fraction of items missing the modality; 0.5 is what a 2/3 mask (1/6 lack only the "
                        "image, 1/6 only the text, 1/3 both) leaves each modality")
    p.add_argument("--dense-limit-gb", type=float, default=16.0, help="skip dense above this n^2 memory")
    p.add_argument("--faiss-limit-gb", type=float, default=12.0, help="skip FAISS above this feature memory")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="tqdm bars from the FAISS workers")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(MARK + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    dims = args.dims or ([384] if args.quick else DIMS)
    meta = dict(note="wall seconds on a machine shared with other jobs: see load_average_*; CPU seconds "
                     "(all threads) are less sensitive to the load", k=args.k, alpha=args.alpha, missing_ratio=args.missing_ratio, seed=args.seed,
                dense_limit_gb=args.dense_limit_gb, dense_nxn_buffers=1, cpus=os.cpu_count(),
                started=time.strftime("%Y-%m-%d %H:%M:%S"), argv=sys.argv[1:],
                load_average_at_start=os.getloadavg())
    rows: list[dict] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="graph_refinement_") as tmp:
        for d in dims:
            for n in sizes:
                workdir = Path(tmp) / f"{n}_{d}"
                workdir.mkdir()
                base = dict(n=n, d=d, k=args.k, alpha=args.alpha, missing_ratio=args.missing_ratio,
                            seed=args.seed, workdir=str(workdir), progress=args.progress)
                dense_gb = n * n * 4 / GB
                faiss_gb = n * d * 4 / GB
                for stage in ("build", "refine"):
                    row = dict(n=n, d=d, stage=stage)
                    for variant in ("dense", "faiss"):
                        need, limit = (dense_gb, args.dense_limit_gb) if variant == "dense" \
                            else (faiss_gb, args.faiss_limit_gb)
                        if need > limit:
                            res = dict(status=f"out of memory (needs {need:.0f} GB)")
                        elif stage == "refine" and rows[-1].get(f"{variant}_status") != "ok":
                            res = dict(status="skipped (no initial graph)")
                        else:
                            print(f"[{time.time() - t_start:7.1f}s] n={n:,} d={d} {variant} {stage} ...", flush=True)
                            res = run_worker(dict(base, variant=variant, stage=stage), args.timeout)
                        row[f"{variant}_status"] = res["status"]
                        for key in ("seconds", "cpu_seconds", "peak_rss_gb", "rss_before_gb", "recall_vs_exact_sampled"):
                            if key in res:
                                row[f"{variant}_{'s' if key == 'seconds' else key}"] = res[key]
                        if res["status"] == "ok":
                            print(f"           {res['seconds']:.2f} s ({res['cpu_seconds']:.1f} CPU s), "
                                  f"peak RSS {res['peak_rss_gb']:.2f} GB "
                                  f"(before the stage {res['rss_before_gb']:.2f} GB)", flush=True)
                        else:
                            print(f"           {res['status']}", flush=True)
                    if row["dense_status"] == "ok" and row["faiss_status"] == "ok":
                        row["speedup"] = row["dense_s"] / row["faiss_s"]
                        ref = load_csr(workdir / f"dense_{stage}.npz")
                        got = load_csr(workdir / f"faiss_{stage}.npz")
                        present = present_mask(n, args.missing_ratio, args.seed)
                        rows_eval = np.flatnonzero(present if stage == "build" else ~present)
                        row["recall_at_10"] = pattern_recall(ref, got, rows_eval, drop_self=stage == "refine")
                        ref, got = ref[rows_eval], got[rows_eval]
                        diff = abs(ref.multiply(got != 0) - got.multiply(ref != 0))
                        row["max_abs_weight_diff"] = float(diff.max()) if diff.nnz else 0.0
                    rows.append(row)
                    write_results(rows, meta, args.out)
                for f in workdir.iterdir():
                    f.unlink()
    meta["wall_seconds"] = time.time() - t_start
    meta["load_average_at_end"] = os.getloadavg()
    write_results(rows, meta, args.out)
    print()
    print_table(rows)
    print(f"\nwrote {args.out / 'graph_refinement.json'}, .csv and .png in {meta['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
