"""``dgmrec-dgl``: the command-line interface.

Bad input ends with exit status 2 and one line naming the file, the field and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from fractions import Fraction

from . import arguments
from .errors import DataError


def _ratio(text: str) -> float:
    """A missing ratio: a decimal (``0.6``) or a fraction (``2/3``)."""
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a ratio; fix: give a ratio such as 0.6 or 2/3") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio {text} is outside [0, 1]; fix: give a ratio in [0, 1]")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0; fix: give e.g. 60")
    return value


def _ratios(text: str) -> list[float]:
    return [_ratio(part) for part in text.split(",") if part.strip()]


def _dims(text: str) -> dict[str, int]:
    """``image=4096,text=384`` → dict."""
    out = {}
    for part in text.split(","):
        name, _, dim = part.partition("=")
        if name not in ("image", "text", "audio") or not dim.isdigit() or int(dim) < 1:
            raise argparse.ArgumentTypeError(f"{part!r} is not modality=dim; fix: give e.g. image=4096,text=384 "
                                             "(modality image, text or audio; dim >= 1)")
        out[name] = int(dim)
    return out


# ---------------------------------------------------------------------- data commands
def _cmd_synth(args) -> int:
    from .data import synthetic

    overrides = {}
    if args.users is not None:
        overrides["n_users"] = args.users
    if args.items is not None:
        overrides["n_items"] = args.items
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.dims is not None:
        overrides["dims"] = args.dims
    if args.feature_dtype is not None:
        overrides["feature_dtype"] = args.feature_dtype
    try:
        config = synthetic.preset(args.preset, **overrides)
    except ValueError as exc:     # an unknown preset, or sizes the preset's generator cannot meet
        raise DataError("<command line>", "data synth", str(exc),
                        "choose --preset, --users, --items and --dims as `dgmrec-dgl data synth --help` says") from None
    info = synthetic.generate(args.out, config, progress=not args.quiet)
    print(f"wrote {args.out}: {info['n_users']:,} users, {info['n_items']:,} items, "
          f"{info['n_interactions']:,} interactions, {config.feature_dtype} features")
    return 0


def _load(args, mask=None):
    from .data.dataset import Dataset

    return Dataset.load(args.dir, inter=args.inter, mask=mask, allow_pickle=args.allow_pickle,
                        imputation=getattr(args, "imputation", "mean"))


def _cmd_check(args) -> int:
    from .data.summary import format_summary

    dataset = _load(args, mask=args.mask)
    print(format_summary(dataset))
    return 0


def _cmd_mask(args) -> int:
    from .data.masks import MissingMask, ratio_label

    dataset = _load(args)
    modalities = tuple(args.modalities.split(",")) if args.modalities else dataset.modalities
    if not modalities:
        raise DataError(args.dir, "features", "no feature file, so the modalities are unknown",
                        "pass --modalities image,text (or add *_feat.npy files)")
    out_dir = args.out or args.dir
    for ratio in args.ratio:
        mask = MissingMask.generate(dataset.n_items, modalities, ratio, args.seed)
        path = os.path.join(out_dir, f"missing_items_{ratio_label(ratio)}.npz")
        mask.save(path)
        counts = ", ".join(f"{k} {v:,}" for k, v in mask.counts().items())
        print(f"wrote {path}: {counts}")
    return 0


def _cmd_partition(args) -> int:
    from .graphs.partition import format_summary, partition_dataset

    dataset = _load(args, mask=args.mask)
    summary = partition_dataset(dataset, args.out, args.parts, method=args.method, knn_k=args.knn_k,
                                knn_index=args.knn_index, seed=args.seed, name=args.name, mask=args.mask,
                                overwrite=args.overwrite, progress=not args.quiet)
    print(format_summary(summary))
    print(f"wrote {os.path.join(args.out, summary['part_config'])} (DistGraph {summary['graph_name']!r}, "
          f"{summary['num_parts']} parts, {summary['method']}) and {os.path.join(args.out, 'partition_summary.json')}")
    return 0


# ---------------------------------------------------------------------- model commands
def _metrics_table(rows: dict[str, dict[str, float]], ks=(10, 20, 50)) -> str:
    names = [f"{m}@{k}" for m in ("recall", "ndcg") for k in ks]
    width = max([7, *map(len, rows)])
    lines = [f"{'split':<{width}} " + "  ".join(f"{n:>9}" for n in names)]
    for split, metrics in rows.items():
        lines.append(f"{split:<{width}} " + "  ".join(f"{metrics.get(n, float('nan')):>9.4f}" for n in names))
    return "\n".join(lines)


def _train_config(args):
    """The config of ``train``'s arguments: the YAML file with the command line's overrides."""
    from .config import load_config

    overrides: dict[str, dict] = {"data": {}, "train": {}}
    if args.data:
        overrides["data"]["dir"] = args.data
    if args.inter:
        overrides["data"]["inter"] = args.inter
    if args.mask:
        overrides["data"]["mask"] = args.mask
    if args.missing_ratio is not None:       # a generated mask instead of the config's mask file
        overrides["data"]["missing_ratio"] = args.missing_ratio
        overrides["data"]["mask"] = args.mask
    if args.new_items:
        overrides["data"]["new_items"] = True
    if args.allow_pickle:
        overrides["data"]["allow_pickle"] = True
    if args.inject:
        overrides["data"]["inject"] = args.inject
    if args.seed is not None:
        overrides["train"]["seed"] = args.seed
    if args.epochs is not None:
        overrides["train"]["epochs"] = args.epochs
    if args.threads is not None:
        overrides["train"]["threads"] = args.threads
    if args.precision is not None:
        overrides["train"]["precision"] = args.precision
    return load_config(args.config, overrides)


def _cmd_train(args) -> int:
    from .api import default_run_dir
    from .plots import write_curves
    from .run_folder import claimed
    from .train import train

    config = _train_config(args)
    out = args.out or default_run_dir(config)
    if args.dist_config or args.ip_config:
        return _train_on_partitions(args, config, out)
    _check_launch(args)                 # before the run folder is touched
    with claimed(config, out, resume=args.resume, overwrite=args.overwrite):   # lock; data_fingerprint.json
        result = _run_train(train, args, config, out)
        if result is None:              # a rank other than 0 under torchrun: rank 0 reports
            return 0
        curves = write_curves(out)
    _report(out, result, config, curves)
    return 0


def _report(out: str, result: dict, config, curves: str) -> None:
    if "test" not in result:
        print(f"{out}: no validation ran yet (epochs < eval_every?)")
    else:
        print(f"run folder: {out}   best epoch: {result['best_epoch']}")
        print(_metrics_table({"valid": result["valid"], "test": result["test"]}, tuple(config.eval.ks)))
    print(f"curves: {curves}")


def _train_on_partitions(args, config, out: str) -> int:
    """``train --dist-config P --ip-config F``: a graph server (``DGL_ROLE=server``) or one trainer."""
    from . import dist_train
    from ._dgl import dgl
    from .plots import write_curves
    from .run_folder import claimed, writes_run_folder

    for flag, value in (("--dist-config", args.dist_config), ("--ip-config", args.ip_config)):
        if not value:
            raise DataError("<command line>", flag, "is required with --dist-config / --ip-config",
                            "give both the partition config <name>.json and the graph servers' ip_config")
    if args.nproc != 1:
        raise DataError("<command line>", "--nproc", "cannot be combined with --dist-config",
                        "one trainer per partition: start them with dgmrec-dgl dist-launch (or DGL's launcher)")
    kwargs = {"resume": args.resume, "progress": not args.quiet}
    if dist_train.serving():
        with contextlib.redirect_stdout(sys.stderr):
            dist_train.run(config, args.dist_config, args.ip_config, out, **kwargs)
        return 0
    dist_train.check_request(config, args.dist_config, args.ip_config)
    try:
        with claimed(config, out, resume=args.resume, overwrite=args.overwrite):
            with contextlib.redirect_stdout(sys.stderr):      # DGL's progress lines
                result = dist_train.run(config, args.dist_config, args.ip_config, out, **kwargs)
            if not writes_run_folder():
                return 0
            curves = write_curves(out)
    except BaseException as exc:
        if not dgl.distributed.dist_context.is_initialized():
            raise
        # Connected to the servers: DGL's exit hook would wait for every other trainer, which wait for this
        # one in a collective. Leave at once; the launcher ends the others.
        if isinstance(exc, DataError):
            print(f"error: {exc}", file=sys.stderr)
        else:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2 if isinstance(exc, DataError) else 1)
    _report(out, result, config, curves)
    return 0


def _cmd_dist_launch(args) -> int:
    from .dist_launch import launch
    from .dist_train import check_request
    from .graphs.partition import read_partition_config

    own = {"--dist-config", "--ip-config", "--nproc"}
    given = sorted({a.split("=", 1)[0] for a in args.train_argv} & own)
    if given:
        raise DataError("<command line>", given[0], "is set by dist-launch",
                        "drop it: dist-launch passes the partition and its own ip_config to every process")
    train_args = build_parser().parse_args(["train", *args.train_argv])   # train's options, checked
    config = _train_config(train_args)
    partition = read_partition_config(args.part_config)
    if int(partition["num_parts"]) != args.parts:
        raise DataError(args.part_config, "--parts", f"is {args.parts}, but the partition has "
                        f"{partition['num_parts']} parts", f"give --parts {partition['num_parts']}")
    check_request(config, args.part_config, None)
    output = launch(args.part_config, args.parts, args.train_argv, threads=config.train.threads,
                    server_timeout=args.server_timeout, timeout=args.timeout)
    sys.stdout.write(output)
    return 0


def _check_launch(args) -> None:
    """``--nproc`` only outside torchrun (whose ``--nproc-per-node`` sets the ranks)."""
    from . import distributed

    if distributed.launched_by_torchrun() and args.nproc != 1:
        raise DataError("<command line>", "--nproc", "cannot be combined with torchrun",
                        "drop --nproc and give torchrun --nproc-per-node instead")


def _run_train(train, args, config, out):
    """``train`` in this process, in ``--nproc`` spawned ranks, or as one rank of a ``torchrun`` group."""
    from . import distributed

    kwargs = {"resume": args.resume, "progress": not args.quiet}
    if distributed.launched_by_torchrun():
        result = distributed.run_from_env(train, config, out, **kwargs)
        return result if int(os.environ["RANK"]) == 0 else None
    return distributed.launch(train, args.nproc, config, out, **kwargs)


def _cmd_evaluate(args) -> int:
    from .api import load
    from .io_utils import atomic_write_json

    run = load(args.run_dir)
    ks = tuple(args.ks or run.config.eval.ks)
    splits = ("valid", "test") if args.split == "both" else (args.split,)
    results = {split: run.evaluate(split, ks, progress=not args.quiet) for split in splits}
    overall = {split: {k: v for k, v in r.items() if "/group=" not in k} for split, r in results.items()}
    by_level: dict[str, dict[str, dict[str, float]]] = {}   # split -> missing modalities -> metrics
    for split, r in results.items():
        for key, value in r.items():
            name, found, level = key.partition("/group=")
            if found:
                by_level.setdefault(split, {}).setdefault(level, {})[name] = value
    best = run.metrics.get("best_epoch")
    print(f"run folder: {args.run_dir}   best epoch: {best if best is not None else '-'}")
    print(_metrics_table(overall, ks))
    if by_level:
        print("\nheld-out items by how many modalities they lack (paper Fig. 3)")
        print(_metrics_table({f"{split} missing {level}": metrics for split, levels in by_level.items()
                              for level, metrics in sorted(levels.items())}, ks))
    else:
        print("\n(no per-missing-level table: the run was trained without missing modalities)")
    path = os.path.join(args.run_dir, "evaluation.json")
    atomic_write_json(path, {"run_dir": os.path.abspath(args.run_dir), "best_epoch": best, "ks": list(ks),
                             "splits": list(splits), "overall": overall, "by_missing_level": by_level})
    print(f"wrote {path}")
    if args.retrieval:
        _retrieval(args, run.config, run.dataset, run.model, run.graph)
    return 0


def _retrieval(args, config, dataset, model, g) -> None:
    """``evaluate --retrieval``: Table 3 of the paper, printed and written to RUN_DIR/retrieval.json."""
    from .data.dataset import Dataset
    from .io_utils import atomic_write_json
    from .retrieval import model_retrieval

    if dataset.mask is None:
        raise DataError(args.run_dir, "data.mask", "the run was trained without missing modalities",
                        "train with --mask FILE or --missing-ratio R to evaluate cross-modal retrieval")
    if getattr(config.data, "reduce_dims", None):
        raise DataError(args.run_dir, "data.reduce_dims", "retrieval compares raw features, but this run "
                        "reduced them", "evaluate retrieval on a run trained without reduce_dims")
    truth = Dataset.load(dataset.root, inter=f"{dataset.name}.inter", require_features=True).features
    report = model_retrieval(model, g, dataset, truth, max_queries=args.max_queries or None,
                             seed=config.train.seed)
    levels = sorted({key.split("/")[0] for table in report.values() for key in table if key.startswith("missing=")})
    print("\ncross-modal retrieval (Hit@K of the item's own true feature; paper Table 3)")
    print(f"{'method':<8} " + "  ".join(f"{lv + ' ' + h:>18}" for lv in levels for h in ("hit@10", "hit@20")))
    for method, table in report.items():
        cells = [table.get(f"{lv}/{h}") for lv in levels for h in ("hit@10", "hit@20")]
        print(f"{method:<8} " + "  ".join(f"{c:>18.4f}" if c is not None else f"{'-':>18}" for c in cells))
    path = os.path.join(args.run_dir, "retrieval.json")
    atomic_write_json(path, report)
    print(f"wrote {path}")


#: users per chunk of `recommend`: the rows written at a time (scores inside a chunk follow eval.budget_mb)
RECOMMEND_CHUNK = 4096
RECOMMEND_FORMATS = (".csv", ".parquet")


def _recommend_users(args, run):
    import numpy as np

    if args.all_users:
        return np.arange(run.dataset.n_users, dtype=np.int64)
    if args.users is not None:
        return run.check_ids(args.users, "users", field="--users")
    try:
        with open(args.users_file) as fh:
            text = fh.read()
    except OSError as exc:
        raise DataError(args.users_file, "--users-file", f"cannot be read ({exc.strerror})",
                        "pass a file of user ids, one per line") from None
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        for part in line.replace(",", " ").split():
            if not part.lstrip("-").isdigit():
                raise DataError(args.users_file, f"line {number}", f"{part!r} is not a user id",
                                "write integer user ids, one per line")
            ids.append(int(part))
    if not ids:
        raise DataError(args.users_file, "--users-file", "holds no user id", "write user ids, one per line")
    return run.check_ids(np.asarray(ids, dtype=np.int64), "users", field=f"--users-file {args.users_file}")


@contextlib.contextmanager
def _recommendation_writer(out: str | None):
    """A ``write(frame, first)`` for CSV on stdout, or a CSV or Parquet file that appears only when complete."""
    if out is None:
        yield lambda frame, first: frame.to_csv(sys.stdout, header=first, index=False, float_format="%.6g")
        return
    from .io_utils import atomic_path

    suffix = os.path.splitext(out)[1].lower()
    with atomic_path(out, suffix=suffix) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                yield lambda frame, first: frame.to_csv(fh, header=first, index=False, float_format="%.6g")
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("user", pa.int64()), ("rank", pa.int64()), ("item", pa.int64()),
                            ("score", pa.float32()), ("missing", pa.string())])
        with pq.ParquetWriter(tmp, schema) as writer:
            yield lambda frame, first: writer.write_table(pa.Table.from_pandas(frame, schema=schema,
                                                                               preserve_index=False))


def _cmd_recommend(args) -> int:
    from tqdm.auto import tqdm

    from .api import load

    if args.out is not None:
        suffix = os.path.splitext(args.out)[1].lower()
        if suffix not in RECOMMEND_FORMATS:
            raise DataError(args.out, "--out", f"unknown format {suffix or '(no extension)'!r}",
                            "name a .csv or .parquet file")
        if suffix == ".parquet":
            try:
                import pyarrow.parquet  # noqa: F401
            except ImportError:
                raise DataError(args.out, "--out", "writing Parquet needs pyarrow, which is not installed",
                                "write .csv instead, or pip install pyarrow") from None
    run = load(args.run_dir)
    users = _recommend_users(args, run)
    rows = 0
    with _recommendation_writer(args.out) as write, \
            tqdm(total=len(users), unit="user", desc="recommend", file=sys.stderr, disable=args.quiet) as bar:
        for start in range(0, len(users), RECOMMEND_CHUNK):
            chunk = users[start:start + RECOMMEND_CHUNK]
            frame = run.recommend(chunk, args.k, exclude_seen=not args.include_seen, approximate=args.approximate)
            write(frame, start == 0)
            rows += len(frame)
            bar.update(len(chunk))
    how = ("train items included" if args.include_seen else "train items excluded") + \
        (", approximate (HNSW)" if args.approximate else ", exact")
    summary = f"{rows:,} rows for {len(users):,} users, k={args.k}, {how}"
    print(f"wrote {args.out}: {summary}" if args.out else summary, file=sys.stdout if args.out else sys.stderr)
    return 0


def _cmd_plot(args) -> int:
    from .plots import plot_curves

    if not args.out.lower().endswith(".png"):
        raise DataError(args.out, "--out", "is not a .png file", "name the output F.png")
    print(f"wrote {plot_curves(args.run_dirs, args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = arguments.OneLineParser(prog="dgmrec-dgl", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make, check and mask datasets in the MMRec layout")
    data_cmds = data.add_subparsers(dest="data_command", required=True)

    synth = data_cmds.add_parser("synth", help="write a synthetic multimodal dataset")
    synth.add_argument("--out", type=arguments.folder, required=True, help="output folder")
    synth.add_argument("--preset", default="toy", help="toy, demo, baby, sports, clothing, tiktok, large")
    synth.add_argument("--users", type=arguments.count, help="number of users before 5-core filtering")
    synth.add_argument("--items", type=arguments.count, help="number of items before 5-core filtering")
    synth.add_argument("--dims", type=_dims, help="feature dims, e.g. image=4096,text=384")
    synth.add_argument("--seed", type=arguments.seed, help="random seed (default: the preset's)")
    synth.add_argument("--feature-dtype", choices=("float32", "float16"),
                       help="dtype of the *_feat.npy files (default float32; float16 halves them)")
    synth.add_argument("--quiet", action="store_true", help="no progress bars")
    synth.set_defaults(run=_cmd_synth)

    def dataset_args(p):
        p.add_argument("dir", help="dataset folder")
        p.add_argument("--inter", help=".inter file name inside DIR (default: the folder's only one)")
        p.add_argument("--allow-pickle", action="store_true",
                       help="allow reading a pickled .npy mask (can execute code: trusted files only)")

    check = data_cmds.add_parser("check", help="validate a dataset and print a Table-1 style summary")
    dataset_args(check)
    check.add_argument("--mask", help="missing-modality mask (.npz; pickled .npy needs --allow-pickle)")
    check.add_argument("--imputation", default="mean", choices=("mean", "zero", "nn"),
                       help="fill of missing feature rows (default mean, as the reference)")
    check.set_defaults(run=_cmd_check)

    mask = data_cmds.add_parser("mask", help="write missing-modality masks (nested across ratios)")
    dataset_args(mask)
    mask.add_argument("--ratio", type=_ratios, required=True,
                      help="fraction(s) of items missing a modality, e.g. 2/3 or 0.2,0.4,0.6,0.8")
    mask.add_argument("--seed", type=arguments.seed, default=2024, help="random seed (same seed → nested masks)")
    mask.add_argument("--modalities", help="e.g. image,text (default: the dataset's feature files)")
    mask.add_argument("--out", type=arguments.folder, help="folder for the masks (default DIR)")
    mask.set_defaults(run=_cmd_mask)

    from .config import DGMRecConfig

    part = commands.add_parser(
        "partition", help="split a dataset's user-item-kNN graph into DistDGL partitions (dgl.distributed)",
        description="Build the heterograph the models train on (train interactions, one kNN relation per "
        "modality, raw modality rows and missing masks as item data) and write it as N DistDGL partitions "
        "with dgl.distributed.partition_graph, train edges balanced across the parts. Prints and writes "
        "(DIR/partition_summary.json) what each part holds.")
    dataset_args(part)
    part.add_argument("--parts", type=arguments.count, required=True, help="number of partitions (>= 1)")
    part.add_argument("--out", type=arguments.folder, required=True, help="output folder (new or empty)")
    part.add_argument("--method", choices=("metis", "random"), default="metis",
                      help="node assignment: METIS (small edge cut; default) or uniformly random")
    part.add_argument("--mask", help="missing-modality mask (.npz; pickled .npy needs --allow-pickle)")
    part.add_argument("--imputation", default="mean", choices=("mean", "zero", "nn"),
                      help="fill of missing feature rows (default mean, as the reference)")
    part.add_argument("--knn-k", type=arguments.count, default=DGMRecConfig.knn_k,
                      help=f"neighbours per kNN row (model.knn_k; default {DGMRecConfig.knn_k})")
    part.add_argument("--knn-index", choices=("auto", "exact", "ivf", "hnsw"), default=DGMRecConfig.knn_index,
                      help="FAISS index of the kNN graphs (model.knn_index; default auto)")
    part.add_argument("--seed", type=arguments.seed, default=0, help="seeds the kNN index and --method random")
    part.add_argument("--name", help="graph name DistGraph opens (default: the dataset's name)")
    part.add_argument("--overwrite", action="store_true",
                      help="replace the partition in --out (only the files it wrote)")
    part.add_argument("--quiet", action="store_true", help="no progress lines")
    part.set_defaults(run=_cmd_partition)

    tr = commands.add_parser("train", help="train DGMRec and write a run folder")
    tr.add_argument("--config", required=True, help="YAML config, e.g. configs/dgmrec/demo.yaml")
    tr.add_argument("--data", help="dataset folder (overrides data.dir)")
    tr.add_argument("--inter", help=".inter file inside the dataset folder")
    group = tr.add_mutually_exclusive_group()
    group.add_argument("--mask", help="missing-modality mask file")
    group.add_argument("--missing-ratio", type=_ratio, help="generate a mask with this ratio (e.g. 2/3)")
    tr.add_argument("--allow-pickle", action="store_true", help="allow a pickled .npy mask (trusted files only)")
    tr.add_argument("--inject", choices=("none", "mean", "nn"),
                    help="feature injection for items missing a modality (for models assuming complete data)")
    tr.add_argument("--new-items", action="store_true", help="the new-items setting (20%% cold-start items)")
    tr.add_argument("--seed", type=arguments.seed, help="training seed")
    tr.add_argument("--epochs", type=arguments.count, help="maximum epochs")
    tr.add_argument("--out", type=arguments.folder, help="run folder (default runs/<model>-<data>-seed<S>)")
    reuse = tr.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its last epoch (same config but train.epochs/threads)")
    reuse.add_argument("--overwrite", action="store_true",
                       help="replace the run in --out: remove the files it wrote first (else such a folder is refused)")
    tr.add_argument("--nproc", type=arguments.count, default=1,
                    help="data-parallel worker processes on this machine (gloo; see README)")
    tr.add_argument("--quiet", action="store_true",
                    help="no progress bars (epochs; steps of a long epoch; chunks of a long evaluation)")
    tr.add_argument("--threads", type=arguments.threads, help="torch and Numba threads (train.threads; 0: torch's default)")
    tr.add_argument("--precision", choices=("fp32", "bf16"),
                    help="arithmetic of the training steps (train.precision; bf16: not for ci2mg)")
    tr.add_argument("--dist-config", metavar="P.json",
                    help="train on DistDGL partitions (dgmrec-dgl partition's <name>.json) as one trainer, or "
                    "serve one under DGL_ROLE=server; with --ip-config (README, DistDGL partitions)")
    tr.add_argument("--ip-config", metavar="F", help="the graph servers: one 'IP PORT' line per partition")
    tr.set_defaults(run=_cmd_train)

    dl = commands.add_parser(
        "dist-launch", help="train on DistDGL partitions on this machine: a graph server and a trainer per part",
        description="Start one graph server and one trainer per partition on this machine (loopback addresses "
        "127.0.0.1, 127.0.0.2, ...), as DGL's launcher does on a cluster, wait for them and end them all. "
        "Every other option is passed to `dgmrec-dgl train` (--config, --out, --data, --epochs, ...).")
    dl.add_argument("--parts", type=arguments.count, required=True, help="the partition count")
    dl.add_argument("--part-config", required=True, metavar="P.json", help="the partition's <name>.json")
    dl.add_argument("--server-timeout", type=_seconds, default=120.0,
                    help="seconds within which every graph server must listen (default 120)")
    dl.add_argument("--timeout", type=_seconds, default=0.0, help="seconds for the whole run (default 0: no limit)")
    dl.set_defaults(run=_cmd_dist_launch)

    ev = commands.add_parser("evaluate", help="full-ranking metrics of a run's best checkpoint, overall and by "
                             "missing level; writes RUN/evaluation.json")
    ev.add_argument("run_dir")
    ev.add_argument("--split", choices=("valid", "test", "both"), default="both", help="default both")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.add_argument("--ks", type=arguments.integer_list(1), help="cut-offs, e.g. 10,20,50 (default: the run's eval.ks)")
    ev.add_argument("--retrieval", action="store_true",
                    help="also cross-modal retrieval Hit@10/20 of generated features vs the NN baseline")
    ev.add_argument("--max-queries", type=arguments.integer(0), default=5000, metavar="N",
                    help="retrieval queries per modality and missing level, a seeded sample (0 = all)")
    ev.set_defaults(run=_cmd_evaluate)

    rec = commands.add_parser(
        "recommend", help="top-k items per user as CSV/Parquet (train items excluded unless --include-seen)",
        description="Top-k items per user from a run's best checkpoint. Each user's train items are excluded "
        "unless --include-seen. Columns: user, rank, item, score, missing (the modalities the item lacks, "
        f"e.g. image+text). Users are processed in chunks of {RECOMMEND_CHUNK:,}.")
    rec.add_argument("run_dir")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--users", type=arguments.integer_list(0), help="comma-separated user ids, e.g. 1,2,3")
    who.add_argument("--users-file", metavar="F", help="a file of user ids (one per line, or comma-separated)")
    who.add_argument("--all-users", action="store_true", help="every user of the run's dataset")
    rec.add_argument("--k", type=arguments.count, default=20, help="items per user (default 20)")
    rec.add_argument("--out", help="recs.csv or recs.parquet (Parquet needs pyarrow; default: CSV on stdout)")
    rec.add_argument("--include-seen", action="store_true", help="keep each user's train items in the ranking")
    rec.add_argument("--quiet", action="store_true", help="no progress bar")
    rec.add_argument("--approximate", action="store_true",
                     help="search an HNSW inner-product index (FAISS) instead of scoring every item "
                     "(large catalogs; its recall@K against exact is in the README)")
    rec.set_defaults(run=_cmd_recommend)

    plot = commands.add_parser("plot", help="training curves of one or more runs (overlaid) into a PNG")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN")
    plot.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    plot.set_defaults(run=_cmd_plot)

    from .compare import add_compare_parser

    add_compare_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["dist-launch"]:      # its other options are train's, passed on
        args, args.train_argv = build_parser().parse_known_args(argv)
    else:
        args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda message, *_a, **_k: print(f"warning: {message}", file=sys.stderr)
        try:
            return args.run(args)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
