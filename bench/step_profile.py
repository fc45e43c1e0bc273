"""Where one DGMRec training step spends its time: a per-term profile, forward and backward, 1 and 2 threads.

For every dataset and thread count, the release's best config of the dataset (``configs/dgmrec/<name>.yaml``;
another synthetic preset: ``base.yaml``) is built as training builds it (:func:`dgmrec_dgl.train.load_dataset`,
:func:`~dgmrec_dgl.models.build_model`, ``model.make_graph``, :func:`~dgmrec_dgl.train.main_optimizer`), BPR
triples are drawn (:func:`~dgmrec_dgl.train.epoch_triples`) and batched (:func:`~dgmrec_dgl.train.epoch_batches`),
and steps run exactly as :func:`dgmrec_dgl.train.training_step` runs them (fp32): ``zero_grad``, ``loss(
batch_forward(...))``, ``backward``, ``optimizer.step``. The first ``--warmup`` steps are not timed; then

- ``--steps`` steps without a profiler give the step's wall time and its phases (``perf_counter``);
- ``--steps`` more steps under ``torch.profiler`` (CPU) give the terms. The model marks each term of its
  step with a ``record_function`` range (:func:`dgmrec_dgl.models.dgmrec.model.term`; nothing when no
  profiler runs): ``id_propagation`` (LightGCN), per modality ``encoders`` (Eq. 1), ``preference`` (Eq. 2–3
  and the filtering), ``modality_propagation`` (kNN, Eq. 4–5), ``user_features`` (Eq. 6), then in the loss
  ``fusion`` (Eq. 17–18), ``bpr``, ``reg``, ``ui_align`` (with the general sums ``bm_align`` reads),
  ``bm_align``, ``inter_modal``, ``club``, ``recon``, ``gen`` and ``host_sync`` (``scalar_parts``: one
  ``float()`` per loss part). A term's forward time is the length of its ranges (summed over modalities).
  Its backward time is the time of the autograd nodes its forward ops created: the profiler gives each
  backward node (``autograd::engine::evaluate_function: ...``) the sequence number of the forward op that
  recorded it, and that op sits inside one term's range. Forward time outside every range is ``other``
  (e.g. ``torch.unique``, the loss sum); backward time in no term's nodes is ``other`` too (gradient
  accumulation into leaves, the engine itself). Both datasets' sizes select full mode; blocks and sampled
  mode mark the same terms in ``batch_forward`` (``bench/scale.py --profile-steps`` uses them at scale).

Every figure is the median over the timed steps, in seconds (``per_step`` in the JSON keeps each profiled
step's); shares are of the profiled step's median.

**GEMM floor.** The profiler also counts the FLOPs of each term's dense matrix products (``aten::mm`` and
kin, forward and backward; sparse propagation and elementwise work are not counted). Divided by the fastest
fp32 product rate measured on the same threads right after the steps (:func:`gemm_rate`: the InfoNCE
shapes and a 1024³ product), that is the time no implementation of the same maths could beat on this CPU
in fp32: ``gemm_floor`` per term, and ``x floor`` in the table says how far the term is from it.
The profiler adds a little per op, so the profiled step is somewhat longer than the unprofiled one
(both are reported). Per-epoch work (CLUB steps, generation, refinement) is not part of a step.

Datasets (made once under ``--work`` by :func:`bench/sampled_quality.prepare <sampled_quality.prepare>`):

- ``tiktok``: the shared TikTok interactions (``../shared/data/dgmrec-splits/tiktok/tiktok.inter``, 9,308 users,
  6,710 items) with generated 128-d image and 128-d audio features and the shipped 0.6 mask restricted to
  those two modalities;
- ``baby`` (and any other :mod:`dgmrec_dgl.data.synthetic` preset): the synthetic preset (Baby: 4096-d image,
  384-d text), a 2/3 mask drawn with seed 2024.

Writes ``step_profile.json`` and ``step_profile.png`` (per dataset, the terms' forward and backward seconds,
one bar per thread count) into ``--out``, atomically, and prints a table per run. Threads: ``torch`` and
Numba (whose OpenMP layer would reset torch's count) both get ``N``; run as a script, ``OMP_WAIT_POLICY``
defaults to ``PASSIVE`` (see ``bench/timing_table.py``). ``--keep-freed-memory`` is the training option of the
same name (the README's timing figures use it).

    python bench/step_profile.py --quick                  # TikTok-shaped only, 5 steps each: about a minute
    python bench/step_profile.py                          # tiktok and baby, 1 and 2 threads, 10 steps each
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":      # before torch loads OpenMP: idle Numba/OpenMP threads must not spin (timing_table)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sampled_quality  # noqa: E402  (the sibling script: its prepare() makes the datasets)

from dgmrec_dgl.io_utils import atomic_path, atomic_write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ROOT / "configs" / "dgmrec"
DATASETS = ("tiktok", "baby")
#: the model's terms (record_function ranges ``dgmrec.<term>``), in step order
TERMS = ("id_propagation", "encoders", "preference", "modality_propagation", "user_features", "fusion", "bpr",
         "reg", "ui_align", "bm_align", "inter_modal", "club", "recon", "gen", "host_sync")
PHASES = ("zero_grad", "forward", "backward", "optimizer")
PREFIX = "dgmrec."
EVALUATE = "autograd::engine::evaluate_function: "
QUICK = {"datasets": "tiktok", "steps": 5, "warmup": 2}
#: the dense matrix products whose FLOPs the profiler counts (aten::matmul and linear dispatch to these)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


# ---------------------------------------------------------------------- the step
def step(model, g, batch, optimizer, generator, phases: dict | None = None) -> dict[str, float]:
    """:func:`dgmrec_dgl.train.training_step` (fp32, one process), each phase timed into ``phases`` and marked
    ``step.<phase>`` for the profiler. Returns the loss parts."""
    from torch.profiler import record_function

    times = [time.perf_counter()]
    with record_function("step.zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    times.append(time.perf_counter())
    with record_function("step.forward"):
        loss, parts = model.loss(*model.batch_forward(g, batch), generator)
    times.append(time.perf_counter())
    with record_function("step.backward"):
        loss.backward()
    times.append(time.perf_counter())
    with record_function("step.optimizer"):
        optimizer.step()
    times.append(time.perf_counter())
    if phases is not None:
        phases.update({p: b - a for p, a, b in zip(PHASES, times, times[1:])})
    return parts


def _ancestors(event):
    while event is not None:
        yield event
        event = event.cpu_parent


def attribute(events) -> tuple[dict, dict, dict, dict]:
    """One profiled step's events → (forward seconds per term, backward seconds per term, phase seconds,
    dense matrix-product FLOPs per term: ``{"forward": {term: flops}, "backward": {term: flops}}``).

    Forward: the summed length of each term's ranges, ``other`` the rest of ``step.forward``. Backward:
    each top-level autograd node's time goes to the term whose range held the forward op of the same
    sequence number; ``other`` is the rest of ``step.backward``. FLOPs: the profiler's count (``with_flops``)
    of every :data:`GEMM_OPS` op, forward ones by the range they ran in, backward ones by their node's term.
    """
    fwd = dict.fromkeys(TERMS, 0.0)
    bwd = dict.fromkeys(TERMS, 0.0)
    flops = {"forward": dict.fromkeys((*TERMS, "other"), 0.0), "backward": dict.fromkeys((*TERMS, "other"), 0.0)}
    phases = dict.fromkeys(PHASES, 0.0)
    owner: dict[int, str] = {}              # forward sequence number → term
    nodes = []
    products = []
    for e in events:
        if e.name in GEMM_OPS and getattr(e, "flops", 0):
            products.append(e)
        if e.name.startswith("step.") and e.name[5:] in phases:
            phases[e.name[5:]] += e.cpu_time_total * 1e-6
        elif e.name.startswith(PREFIX):
            name = e.name[len(PREFIX):]
            if name not in fwd:
                raise ValueError(f"profiler range {e.name!r} is not a known term ({', '.join(TERMS)})")
            if any(a.name.startswith(PREFIX) for a in _ancestors(e.cpu_parent)):
                raise ValueError(f"profiler range {e.name!r} is nested in another term's: it would be counted twice")
            fwd[name] += e.cpu_time_total * 1e-6
        elif e.name.startswith(EVALUATE):
            if not any(a.name.startswith(EVALUATE) for a in _ancestors(e.cpu_parent)):
                nodes.append(e)
        elif e.sequence_nr >= 0 and e.sequence_nr not in owner:
            chain = [a.name for a in _ancestors(e.cpu_parent)]
            if "step.forward" in chain:
                terms = [n[len(PREFIX):] for n in chain if n.startswith(PREFIX)]
                owner[e.sequence_nr] = terms[0] if terms else "other"
    if not any(fwd.values()):
        import dgmrec_dgl

        raise RuntimeError(f"the step ran no dgmrec.<term> profiler range: is {dgmrec_dgl.__file__} a package "
                           "version without them (dgmrec_dgl.models.dgmrec.model.term)?")
    for e in nodes:
        term = owner.get(e.sequence_nr, "other")
        if term != "other":
            bwd[term] += e.cpu_time_total * 1e-6
    for e in products:
        chain = list(_ancestors(e.cpu_parent))
        node = next((a for a in reversed(chain) if a.name.startswith(EVALUATE)), None)
        if node is not None:
            flops["backward"][owner.get(node.sequence_nr, "other")] += float(e.flops)
        else:
            term = next((a.name[len(PREFIX):] for a in chain if a.name.startswith(PREFIX)), "other")
            flops["forward"][term] += float(e.flops)
    fwd["other"] = phases["forward"] - sum(fwd.values())
    bwd["other"] = phases["backward"] - sum(bwd.values())
    return fwd, bwd, phases, flops


def median_dict(rows: list[dict]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


# ---------------------------------------------------------------------- one dataset
def build(name: str, work: Path, seed: int):
    """``(config, dataset, model, g, triples)`` of dataset ``name`` with its release config."""
    import numpy as np
    import torch

    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.models import build_model
    from dgmrec_dgl.train import epoch_triples, load_dataset, train_switch

    folder, mask = sampled_quality.prepare(name, work)
    path = CONFIGS / f"{name}.yaml"
    config = load_config(path if path.exists() else CONFIGS / "base.yaml",
                         {"data": {"dir": str(folder), "mask": mask}, "train": {"seed": seed}})
    torch.manual_seed(seed)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    triples = epoch_triples(dataset, seed, 0, train_switch(config, "negatives"))
    return config, dataset, model, g, triples


def set_threads(n: int) -> None:
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def profile_run(config, model, g, triples, threads: int, steps: int, warmup: int) -> dict:
    """``warmup`` untimed steps, ``steps`` plain ones and ``steps`` profiled ones on ``threads`` threads."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dgmrec_dgl.train import epoch_batches, main_optimizer

    set_threads(threads)
    optimizer = main_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.train.seed)
    model.train()
    n_steps = warmup + 2 * steps

    def batches():
        epoch = 0
        while True:     # another pass over the triples if an epoch has fewer batches than the run needs
            yield from epoch_batches(model, g, triples, config.train.batch_size, config.train.seed, epoch)
            epoch += 1

    plain, fwd, bwd, profiled, flops = [], [], [], [], []
    for k, batch in zip(range(n_steps), batches()):
        if k < warmup:
            step(model, g, batch, optimizer, generator)
        elif k < warmup + steps:
            phases = {}
            step(model, g, batch, optimizer, generator, phases)
            plain.append(dict(phases, step=sum(phases.values())))
        else:
            phases = {}
            with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
                step(model, g, batch, optimizer, generator, phases)
            f, b, _, fl = attribute(prof.events())
            fwd.append(f)
            bwd.append(b)
            flops.append(fl)
            profiled.append(dict(phases, step=sum(phases.values())))
    rate = gemm_rate(config.train.batch_size, config.model.embedding_dim)
    gemm_fwd, gemm_bwd = median_dict([f["forward"] for f in flops]), median_dict([f["backward"] for f in flops])
    gemm = {t: gemm_fwd[t] + gemm_bwd[t] for t in gemm_fwd}
    return {"threads": threads, "torch_threads": torch.get_num_threads(), "steps": steps, "warmup": warmup,
            "plain": median_dict(plain), "profiled": median_dict(profiled),
            "forward": median_dict(fwd), "backward": median_dict(bwd),
            "gemm_flops": gemm, "gemm_flops_backward": gemm_bwd, "gemm_rate": rate,
            "gemm_floor": {t: v / rate["best_flops_per_s"] for t, v in gemm.items()},
            "per_step": [{"phases": ph, "forward": f, "backward": b} for ph, f, b in zip(profiled, fwd, bwd)]}


def gemm_rate(batch: int, dim: int, repeats: int = 7) -> dict:
    """This machine's fp32 matrix-product speed on the current threads: FLOP/s (median of ``repeats``) of the
    in-batch InfoNCE shapes, ``[B, d] @ [d, B]`` (logits) and ``[B, B] @ [B, d]`` (their backward), and of a
    1024³ product; ``best_flops_per_s`` is the fastest, the rate a term's products could at best reach."""
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = {"logits": (batch, dim, batch), "logits_backward": (batch, batch, dim), "square_1024": (1024, 1024, 1024)}
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        torch.mm(a, b)                                   # warm-up: first-call allocation and dispatch
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t)
        out[name] = 2.0 * m * k * n / statistics.median(times)
    out["best_flops_per_s"] = max(out.values())
    return out


# ---------------------------------------------------------------------- report
def table(run: dict) -> str:
    """Per-term forward, backward, total seconds and share of the profiled step."""
    step_s = run["profiled"]["step"]
    lines = [f"{run['dataset']}, {run['threads']} thread(s): step {run['plain']['step']:.4f} s "
             f"(profiled {step_s:.4f} s; forward {run['profiled']['forward']:.4f}, backward "
             f"{run['profiled']['backward']:.4f}, optimizer {run['profiled']['optimizer']:.4f}), "
             f"median of {run['steps']}; GEMM floor at {run['gemm_rate']['best_flops_per_s'] / 1e9:.1f} GFLOP/s",
             f"  {'term':<22}{'forward s':>11}{'backward s':>12}{'total s':>10}{'share':>8}{'GEMM floor s':>14}"
             f"{'x floor':>9}"]
    rows = [(t, run["forward"][t], run["backward"][t]) for t in (*TERMS, "other")]
    rows += [("zero_grad", 0.0, 0.0), ("optimizer", 0.0, 0.0)]
    for name, f, b in rows:
        if name in ("zero_grad", "optimizer"):
            f = run["profiled"][name]
        total = f + b
        floor = run["gemm_floor"].get(name, 0.0)
        ratio = f"{total / floor:>9.1f}" if floor > 0 else f"{'-':>9}"
        lines.append(f"  {name:<22}{f:>11.4f}{b:>12.4f}{total:>10.4f}{total / step_s:>8.1%}{floor:>14.4f}{ratio}")
    f_sum, b_sum = sum(run["forward"].values()), sum(run["backward"].values())
    total = f_sum + b_sum + run["profiled"]["zero_grad"] + run["profiled"]["optimizer"]
    floor = sum(run["gemm_floor"].values())
    lines.append(f"  {'sum':<22}{f_sum:>11.4f}{b_sum:>12.4f}{total:>10.4f}{total / step_s:>8.1%}{floor:>14.4f}"
                 f"{total / floor if floor > 0 else 0:>9.1f}")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    labels = [*TERMS, "other", "optimizer"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        mine = [r for r in runs if r["dataset"] == dataset]
        y = np.arange(len(labels))
        height = 0.8 / len(mine)
        for k, r in enumerate(mine):
            f = [r["profiled"]["optimizer"] if t == "optimizer" else r["forward"][t] for t in labels]
            b = [0.0 if t == "optimizer" else r["backward"][t] for t in labels]
            at = y - 0.4 + height * (k + 0.5)
            ax.barh(at, f, height, color=f"C{k}", label=f"{r['threads']} thread(s): forward")
            ax.barh(at, b, height, left=f, color=f"C{k}", alpha=0.45, hatch="//",
                    label=f"{r['threads']} thread(s): backward")
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per step (median)")
        steps = ", ".join(f"{r['threads']}t {r['plain']['step']:.3f} s" for r in mine)
        ax.set_title(f"{dataset}: step {steps}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("DGMRec training step by term (torch.profiler, CPU)", fontsize=11)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _keep_freed_memory() -> bool:
    from dgmrec_dgl.train import _keep_freed_memory as keep

    return keep()


def _machine() -> dict:
    import platform

    import psutil
    import torch

    return {"cpu": platform.processor() or platform.machine(), "logical_cores": psutil.cpu_count(logical=True),
            "load_average_at_start": os.getloadavg()[0], "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS),
                   help="comma-separated: tiktok, baby or another synthetic preset (e.g. toy)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run, plain and profiled each")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--seed", type=int, default=999)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="train.keep_freed_memory (glibc keeps freed memory: no page faults on each step's large "
                        "tensors; process-wide, cannot be undone), as bench/timing_table.py offers")
    p.add_argument("--work", type=Path, default=Path("runs/step_profile_data"), help="where the datasets are made")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK['datasets']} only, {QUICK['steps']} steps after {QUICK['warmup']} warm-up "
                        "(about a minute)")
    args = p.parse_args(argv)
    if args.quick:
        defaults = {a.dest: a.default for a in p._actions}
        for key, value in QUICK.items():
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        p.error(f"--threads {args.threads!r}: give comma-separated counts >= 1, e.g. 1,2")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    for name in datasets:           # every dataset made (or found) before any timing
        try:
            sampled_quality.prepare(name, args.work)
        except SystemExit as exc:   # the shared TikTok data is missing
            print(exc if isinstance(exc.code, str) else f"error: {name}: data not available", file=sys.stderr)
            return 2
        except ValueError as exc:   # not a synthetic preset
            p.error(f"--datasets: {exc}")

    import numba
    import torch

    if args.keep_freed_memory and not _keep_freed_memory():
        p.error("--keep-freed-memory needs glibc's mallopt, which this system lacks")
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        runs, info = profile_datasets(datasets, threads, args)
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "step_profile.json",
                      {"meta": {"machine": _machine(), "steps": args.steps, "warmup": args.warmup, "seed": args.seed,
                                "quick": args.quick, "keep_freed_memory": args.keep_freed_memory, "datasets": info,
                                "terms": list(TERMS), "phases": list(PHASES),
                                "units": "seconds, median over the timed steps"},
                       "runs": runs})
    plot(runs, args.out / "step_profile.png")
    print(f"wrote {args.out / 'step_profile.json'}, {args.out / 'step_profile.png'}")
    return 0


def profile_datasets(datasets: list[str], threads: list[int], args) -> tuple[list[dict], dict]:
    """Every run's record (printed as it finishes) and every dataset's shape."""
    runs, info = [], {}
    for name in datasets:
        config, dataset, model, g, triples = build(name, args.work, args.seed)
        info[name] = {"n_users": dataset.n_users, "n_items": dataset.n_items, "n_train": len(dataset.train),
                      "dims": {m: int(f.shape[1]) for m, f in dataset.features.items()},
                      "mask": config.data.mask, "batch_size": config.train.batch_size,
                      "execution": model.execution(), "steps_per_epoch": -(-len(triples[0]) // config.train.batch_size)}
        initial = copy.deepcopy(model.state_dict())
        for n in threads:
            model.load_state_dict(initial)      # every thread count starts from the same parameters
            run = dict(dataset=name, **profile_run(config, model, g, triples, n, args.steps, args.warmup))
            runs.append(run)
            print(table(run), flush=True)
            print(flush=True)
    return runs, info


if __name__ == "__main__":
    sys.exit(main())
