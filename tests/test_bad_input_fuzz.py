"""Fuzz-style bad input: a corpus of bad config values, command-line numbers, files and run-folder misuse.

Every case must end with exit status 2 and exactly one stderr line, ``error: <file or key>: <field>: <problem>;
fix: <fix>``, that names the culprit (the key, the flag or the file), and no traceback. Cases run in-process
through :func:`dgmrec_dgl.cli.main` (an exception escaping it fails the test with its traceback); a few run
the real console command to check what a user sees on stderr.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import CONFIGS, assert_rejected, run_cli, tiny_rows, train_argv, write_inter


# ---------------------------------------------------------------------- config values
#: (model, section, key, YAML value): one bad value each; model None = the DGMRec base config
CONFIG_CASES = [
    # train: counts, rates, seeds, enums
    (None, "train", "epochs", "0"), (None, "train", "epochs", "-3"),
    (None, "train", "batch_size", "0"), (None, "train", "batch_size", "-5"),
    (None, "train", "lr", "-0.01"), (None, "train", "lr", "0"), (None, "train", "lr", ".nan"),
    (None, "train", "lr", ".inf"),
    (None, "train", "weight_decay", "-1.0e-4"), (None, "train", "weight_decay", ".nan"),
    (None, "train", "lr_decay", "0"), (None, "train", "lr_decay", "1.5"), (None, "train", "lr_decay", "-.inf"),
    (None, "train", "lr_decay_every", "0"),
    (None, "train", "eval_every", "0"), (None, "train", "patience", "0"), (None, "train", "patience", "-1"),
    (None, "train", "seed", "-1"), (None, "train", "seed", str(2**32)),
    (None, "train", "threads", "-2"),
    (None, "train", "device", "cuda"), (None, "train", "precision", "fp16"),
    (None, "train", "keep_freed_memory", "maybe"),
    # data: fractions, seeds, enums, sizes
    (None, "data", "missing_ratio", "1.5"), (None, "data", "missing_ratio", "-0.1"),
    (None, "data", "missing_ratio", ".nan"),
    (None, "data", "mask_seed", "-3"), (None, "data", "new_items_seed", "-1"), (None, "data", "reduce_seed", "-1"),
    (None, "data", "imputation", "median"), (None, "data", "inject", "knn"),
    (None, "data", "feature_dtype", "float64"),
    (None, "data", "reduce_dims", "0"), (None, "data", "reduce_sample", "0"),
    (None, "data", "new_items", "3"), (None, "data", "new_items_protocol", "paper"),
    # eval: cut-offs and the selection metric
    (None, "eval", "ks", "[0]"), (None, "eval", "ks", "[]"), (None, "eval", "ks", "[10, -20]"),
    (None, "eval", "ks", "20"),
    (None, "eval", "budget_mb", "0"), (None, "eval", "test_masks_valid", "1"),
    (None, "eval", "select_metric", "hit@20"), (None, "eval", "select_metric", "recall"),
    (None, "eval", "select_metric", "recall@30"), (None, "eval", "select_metric", "recall@020"),
    # DGMRec
    (None, "model", "name", "svd"), (None, "model", "embedding_dim", "0"), (None, "model", "n_ui_layers", "-1"),
    (None, "model", "n_mm_layers", "-1"), (None, "model", "knn_k", "0"),
    (None, "model", "reg_id", "-1.0e-5"), (None, "model", "reg", "-0.1"), (None, "model", "recon", ".nan"),
    (None, "model", "additive", "-1"), (None, "model", "sampler", ".inf"),
    (None, "model", "inter_modal", "-0.01"), (None, "model", "intra_modal", ".nan"),
    (None, "model", "align_bm", "-0.01"),
    (None, "model", "inter_modal_temp", "0"), (None, "model", "intra_modal_temp", "-0.1"),
    (None, "model", "align_bm_temp", ".inf"),
    (None, "model", "avg_lambda", "1.2"), (None, "model", "avg_lambda", "-0.2"),
    (None, "model", "refresh_every", "0"), (None, "model", "perturb_eps", "-0.1"),
    (None, "model", "club_hidden", "0"), (None, "model", "club_lr", "0"), (None, "model", "club_steps", "-1"),
    (None, "model", "club_batch", "0"),
    (None, "model", "refine_sources", "some"), (None, "model", "refine_tolerance", "1.0"),
    (None, "model", "knn_index", "annoy"),
    (None, "model", "execution", "minibatch"), (None, "model", "sampled_min_items", "-1"),
    (None, "model", "blocks_min_items", "-1"),
    (None, "model", "fanouts", "[10, 0, 10]"), (None, "model", "fanouts", "[-2, 10, 10]"),
    (None, "model", "user_items_sample", "0"), (None, "model", "item_users_sample", "-5"),
    (None, "model", "history_every", "-1"), ("lightgcn", "model", "history_every", "2.5"),
    (None, "train", "sample_ahead", "-1"), (None, "train", "epoch_steps", "-1"), (None, "eval", "user_sample", "-100"),
    (None, "train", "checkpoint_steps", "-2"),
    (None, "model", "generate", "1"),
    # the release-vs-paper switches (config.FIDELITY)
    (None, "model", "fidelity", "journal"), (None, "model", "knn_candidates", "missing"),
    (None, "model", "generation_input", "raw"), (None, "model", "loss_items", "negatives"),
    (None, "model", "club_items", "batch"), (None, "model", "refine_count_from", "2"),
    (None, "model", "refine_count_from", "-1"), (None, "model", "refine_count_from", "true"),
    (None, "model", "perturb_over", "each"), (None, "model", "linear_bias_init", "xavier"),
    (None, "model", "ui_align_audio", "both"), (None, "model", "refine_rows", "all"),
    (None, "model", "score_with_refined_graph", "maybe"), (None, "train", "patience_rule", "'>'"),
    (None, "train", "negatives", "new_items"),
    # LightGCN, MF-BPR
    ("lightgcn", "model", "n_layers", "-1"), ("lightgcn", "model", "embedding_dim", "0"),
    ("lightgcn", "model", "reg", "-1.0e-4"),
    ("mfbpr", "model", "embedding_dim", "-64"), ("mfbpr", "model", "reg", ".nan"),
    # CI2MG
    ("ci2mg", "model", "ui_norm", "sum"), ("ci2mg", "model", "n_prototypes", "0"),
    ("ci2mg", "model", "n_hyper_layers", "-1"), ("ci2mg", "model", "incidence", "dot"),
    ("ci2mg", "model", "ot_epsilon", "0"), ("ci2mg", "model", "ot_epsilon", ".nan"),
    ("ci2mg", "model", "ot_iterations", "-1"), ("ci2mg", "model", "ot_block", "0"),
    ("ci2mg", "model", "ot_solver", "exact"), ("ci2mg", "model", "contrastive", "both"),
    ("ci2mg", "model", "temperature", "0"), ("ci2mg", "model", "task_activation", "relu"),
    ("ci2mg", "model", "generated_for", "some"),
    ("ci2mg", "model", "cl_weight", "-1"), ("ci2mg", "model", "rec_weight", "-1"),
    ("ci2mg", "model", "bpr_weight", ".nan"), ("ci2mg", "model", "reg", "-0.1"),
]


def _config_id(case) -> str:
    model, section, key, value = case
    return f"{model or 'dgmrec'}-{section}.{key}={value}"


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[_config_id(c) for c in CONFIG_CASES])
def test_bad_config_value_fails_before_any_data_is_read(case, tmp_path, capsys):
    model, section, key, value = case
    config = tmp_path / "bad.yaml"
    config.write_text(f"extends: {CONFIGS / (model or 'dgmrec') / 'base.yaml'}\n{section}:\n  {key}: {value}\n")
    run = tmp_path / "run"
    # the data folder does not exist: had the config passed, the error would name the folder, not the key
    code, lines = run_cli(capsys, ["train", "--config", config, "--data", tmp_path / "no-data", "--out", run,
                                   "--quiet"])
    assert_rejected(code, lines, f"bad.yaml: {section}.{key}: ")
    assert not run.exists()


def test_the_corpus_has_a_bad_value_for_every_checked_key():
    from dgmrec_dgl.config import ANY, RULES

    checked = {(section, key) for section, rules in RULES.items() for key, rule in rules.items() if rule is not ANY}
    covered = {(section, key) for _, section, key, _ in CONFIG_CASES}
    assert not checked - covered, f"add bad values for {sorted(checked - covered)} to CONFIG_CASES"


def test_bad_value_in_an_extended_file_names_that_file(tmp_path, capsys):
    (tmp_path / "parent.yaml").write_text("train:\n  batch_size: 0\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\ntrain:\n  epochs: 2\n")
    code, lines = run_cli(capsys, ["train", "--config", tmp_path / "child.yaml", "--data", tmp_path / "no-data"])
    assert_rejected(code, lines, "parent.yaml: train.batch_size: ", "0 is not an integer >= 1")


def test_select_metric_and_ks_from_different_files_are_checked_together(tmp_path, capsys):
    (tmp_path / "parent.yaml").write_text("eval:\n  select_metric: ndcg@50\n")
    (tmp_path / "child.yaml").write_text("extends: parent.yaml\neval:\n  ks: [10, 20]\n")
    code, lines = run_cli(capsys, ["train", "--config", tmp_path / "child.yaml", "--data", tmp_path / "no-data"])
    assert_rejected(code, lines, "child.yaml: eval.select_metric: ", "ndcg@50")


# ---------------------------------------------------------------------- command-line numbers
def _existing_file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


#: (arguments after the command, the flag the error must name); "{dir}" is the tiny dataset, "{file}" a file
CLI_CASES = [
    (["train", "--epochs", "0"], "--epochs"), (["train", "--epochs", "-3"], "--epochs"),
    (["train", "--epochs", "1.5"], "--epochs"), (["train", "--epochs", "ten"], "--epochs"),
    (["train", "--seed", "-1"], "--seed"), (["train", "--seed", str(2**32)], "--seed"),
    (["train", "--seed", "abc"], "--seed"),
    (["train", "--nproc", "0"], "--nproc"), (["train", "--nproc", "-2"], "--nproc"),
    (["train", "--missing-ratio", "1.5"], "--missing-ratio"), (["train", "--missing-ratio", "x"], "--missing-ratio"),
    (["train", "--missing-ratio", "1/0"], "--missing-ratio"),
    (["train", "--inject", "knn"], "--inject"),
    (["train", "--out", "{file}"], "--out"),
    (["train", "--mask", "m.npz", "--missing-ratio", "0.5"], "--missing-ratio"),
    (["data", "synth", "--out", "{tmp}/s", "--users", "0"], "--users"),
    (["data", "synth", "--out", "{tmp}/s", "--items", "-5"], "--items"),
    (["data", "synth", "--out", "{tmp}/s", "--seed", "-1"], "--seed"),
    (["data", "synth", "--out", "{tmp}/s", "--dims", "image=0"], "--dims"),
    (["data", "synth", "--out", "{tmp}/s", "--dims", "video=3"], "--dims"),
    (["data", "synth", "--out", "{file}"], "--out"),
    (["data", "synth", "--out", "{tmp}/s", "--users", "3", "--items", "2"], "data synth"),   # below the 5-core
    (["data", "synth", "--out", "{tmp}/s", "--preset", "huge"], "data synth"),
    (["data", "mask", "{dir}", "--ratio", "0.5", "--seed", "-1"], "--seed"),
    (["data", "mask", "{dir}", "--ratio", "2"], "--ratio"),
    (["data", "mask", "{dir}", "--ratio", "half"], "--ratio"),
    (["data", "mask", "{dir}", "--ratio", "0.5", "--out", "{file}"], "--out"),
    (["data", "check", "{dir}", "--imputation", "median"], "--imputation"),
    (["compare", "--out", "{tmp}/c", "--threads", "-2"], "--threads"),
    (["compare", "--out", "{tmp}/c", "--seeds", "1,-2"], "--seeds"),
    (["compare", "--out", "{tmp}/c", "--seeds", "a,b"], "--seeds"),
    (["compare", "--out", "{tmp}/c", "--seeds", ","], "--seeds"),
    (["compare", "--out", "{tmp}/c", "--epochs", "0"], "--epochs"),
    (["compare", "--out", "{tmp}/c", "--missing-ratios", "0,1"], "--missing-ratios"),
    (["compare", "--out", "{file}"], "--out"),
    (["compare", "--out", "{tmp}/c", "--metric", "hit@20"], "--metric"),
    # argparse's own errors are one line too
    (["frobnicate"], "command"),
    (["train", "--bogus"], "--bogus"),
    (["data", "mask", "{dir}"], "--ratio"),          # a required flag missing
]


@pytest.mark.parametrize("argv, flag", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_command_line_number(argv, flag, tiny_dir, tmp_path, capsys):
    values = {"dir": str(tiny_dir), "file": str(_existing_file(tmp_path)), "tmp": str(tmp_path)}
    argv = [a.format(**values) for a in argv]
    if argv[0] == "train":      # a valid run of one epoch, then the case's arguments (the last value wins)
        argv = ["train", "--config", str(CONFIGS / "dgmrec" / "base.yaml"), "--data", str(tiny_dir), "--epochs", "1",
                "--quiet", *argv[1:]]
    code, lines = run_cli(capsys, argv)
    assert_rejected(code, lines, f"<command line>: {flag}: ")
    assert not any(Path(tmp_path, name).exists() for name in ("s", "c", "run"))


# ---------------------------------------------------------------------- files
def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\x01 this is not numpy \xff\xfe")


def _features(name: str, array) -> Callable[[Path], None]:
    return lambda folder: np.save(folder / name, array, allow_pickle=True)


def _inter_row(row: int, user=None, item=None, label=None, drop_features: bool = False):
    """Rewrite the tiny .inter with one row changed (and the feature files removed if asked)."""
    def mutate(folder: Path) -> None:
        rows = tiny_rows()
        u, i, lab = rows[row]
        rows[row] = (u if user is None else user, i if item is None else item, lab if label is None else label)
        write_inter(folder / "tiny.inter", rows)
        if drop_features:
            for name in ("image_feat.npy", "text_feat.npy"):
                (folder / name).unlink()
    return mutate


def _truncate(name: str, keep: int):
    def mutate(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[:keep])
    return mutate


#: (name, how to spoil the tiny dataset, file the error must name, field, words of the problem)
DATA_CASES = [
    ("features of width 0", _features("text_feat.npy", np.zeros((8, 0), np.float32)), "text_feat.npy",
     "text features", "width 0"),
    ("1-D features", _features("text_feat.npy", np.ones(8, np.float32)), "text_feat.npy", "text features", "shape"),
    ("too few feature rows", _features("image_feat.npy", np.ones((5, 16), np.float32)), "image_feat.npy",
     "image features", "rows"),
    ("integer features", _features("image_feat.npy", np.ones((8, 16), np.int32)), "image_feat.npy",
     "image features", "dtype"),
    ("NaN features", _features("image_feat.npy", np.full((8, 16), np.nan, np.float32)), "image_feat.npy",
     "image features", "NaN"),
    ("pickled object features", _features("text_feat.npy", np.array([{"a": 1}] * 8, dtype=object)),
     "text_feat.npy", "text features", "holds pickled Python objects"),
    ("a text file as features", lambda f: (f / "text_feat.npy").write_text("this is not numpy"), "text_feat.npy",
     "text features", "not a .npy file"),
    ("binary garbage as features", lambda f: _garbage(f / "image_feat.npy"), "image_feat.npy",
     "image features", "not a .npy file"),
    ("truncated features", _truncate("image_feat.npy", 200), "image_feat.npy", "image features", "truncated"),
    ("empty feature file", _truncate("image_feat.npy", 0), "image_feat.npy", "image features", "not a .npy file"),
    ("item id 1e11", _inter_row(0, item=10**11, drop_features=True), "tiny.inter", "itemID", "2**31"),
    ("user id 2**31", _inter_row(0, user=2**31), "tiny.inter", "userID", "2**31"),
    ("item id far beyond the catalog", _inter_row(0, item=10**6, drop_features=True), "tiny.inter", "itemID",
     "far beyond"),
    ("user id far beyond the users", _inter_row(0, user=10**6), "tiny.inter", "userID", "far beyond"),
    ("item id beyond the feature rows", _inter_row(0, item=9), "image_feat.npy", "image features", "rows"),
    ("non-integer user id", _inter_row(3, user="1.5"), "tiny.inter", "userID", "not an integer"),
    ("negative item id", _inter_row(0, item=-1), "tiny.inter", "itemID", "negative"),
    ("label 3", _inter_row(5, label=3), "tiny.inter", "x_label", "not 0, 1 or 2"),
    ("a header-only .inter", lambda f: write_inter(f / "tiny.inter", []), "tiny.inter", "file", "no interactions"),
    ("a renamed column", lambda f: write_inter(f / "tiny.inter", tiny_rows(), header="user\titemID\tx_label"),
     "tiny.inter", "userID", "missing"),
]


def _truncated_npz(path: Path) -> None:
    np.savez(path, t=np.arange(50))
    path.write_bytes(path.read_bytes()[:60])


def _mask(name: str, write: Callable[[Path], None]) -> tuple[str, Callable[[Path], None]]:
    return name, lambda folder: write(folder / name)


#: (name, mask file name, how to write it, field, words of the problem); passed with --mask
MASK_CASES = [
    ("a 2-D array", *_mask("m.npz", lambda p: np.savez(p, t=np.array([[1, 2], [3, 4]]))), "key 't'", "1-D"),
    ("a 0-D array", *_mask("m.npz", lambda p: np.savez(p, t=np.int64(3))), "key 't'", "1-D"),
    ("float ids", *_mask("m.npz", lambda p: np.savez(p, t=np.array([1.0, 2.0]))), "key 't'", "float64"),
    ("an id beyond the catalog", *_mask("m.npz", lambda p: np.savez(p, t=np.array([8]))), "key 't'", "item id 8"),
    ("a negative id", *_mask("m.npz", lambda p: np.savez(p, v=np.array([-1]))), "key 'v'", "item id -1"),
    ("an unknown key", *_mask("m.npz", lambda p: np.savez(p, x=np.array([1]))), "key 'x'", "not a mask key"),
    ("an item under two keys", *_mask("m.npz", lambda p: np.savez(p, t=np.array([1]), v=np.array([1]))), "keys",
     "more than one key"),
    ("a .npz that is not a zip", *_mask("m.npz", lambda p: p.write_text("t: 1, 2, 3")), "file", "not a .npz"),
    ("a truncated .npz", *_mask("m.npz", lambda p: _truncated_npz(p)), "file", "not a .npz"),
    ("pickled objects in a .npz",
     *_mask("m.npz", lambda p: np.savez(p, t=np.array([{"a": 1}], dtype=object))), "file", "pickled objects"),
    ("a pickled dict .npy without --allow-pickle",
     *_mask("m.npy", lambda p: np.save(p, {"t": np.array([1])}, allow_pickle=True)), "file", "--allow-pickle"),
    ("a plain .npy array", *_mask("m.npy", lambda p: np.save(p, np.array([1, 2]))), "file", "not a dict"),
    ("a text file as .npy", *_mask("m.npy", lambda p: p.write_text("t: 1")), "file", "not a .npy file"),
    ("a missing mask file", "m.npz", lambda folder: None, "file", "does not exist"),
]


#: cases only `data check` reaches: train refuses a folder without feature files before it looks at item ids
CHECK_ONLY = {"item id far beyond the catalog"}
DATA_PARAMS = [pytest.param(*case, command, id=f"{case[0]}-{command}") for case in DATA_CASES
               for command in ("check", "train") if command == "check" or case[0] not in CHECK_ONLY]


@pytest.mark.parametrize("name, spoil, culprit, field, words, command", DATA_PARAMS)
def test_bad_data_file(name, spoil, culprit, field, words, command, tiny_dir, tmp_path, capsys):
    spoil(tiny_dir)
    if command == "check":
        argv = ["data", "check", tiny_dir]
    else:   # train reads the data the same way; the error must come before any model is built
        argv = ["train", "--config", CONFIGS / "dgmrec" / "base.yaml", "--data", tiny_dir, "--epochs", "1",
                "--out", tmp_path / "run", "--quiet"]
    code, lines = run_cli(capsys, argv)
    assert_rejected(code, lines, f"{culprit}: {field}: ", words)


@pytest.mark.parametrize("name, file, write, field, words", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_bad_mask_file(name, file, write, field, words, tiny_dir, capsys):
    write(tiny_dir)
    code, lines = run_cli(capsys, ["data", "check", tiny_dir, "--mask", tiny_dir / file])
    assert_rejected(code, lines, f"{file}: {field}: ", words)


# ---------------------------------------------------------------------- run folder
def _hold_lock(run: Path):
    """Lock the run folder as a trainer would (fcntl.flock on train.lock, holding our PID); returns the open file."""
    fh = open(run / "train.lock", "a+")
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def _remove(*names: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for name in names:
            (run / name).unlink()
    return change


def _corrupt(*names: str) -> Callable[[Path], None]:
    def change(run: Path) -> None:
        for name in names:
            (run / name).write_bytes(b"PK\x03\x04 not a checkpoint")
    return change


#: (name, how to change the finished tiny run first, train arguments, what the error must name); "{run}" is the
#: run folder, "{pid}" this process
RUN_FOLDER_CASES = [
    ("a folder holding a run", None, [], ["{run}: --out: ", "holds the files of another run", "--overwrite"]),
    ("a folder another trainer holds", _hold_lock, ["--overwrite"], ["train.lock: lock: ", "held by process {pid}"]),
    ("a locked folder, resumed", _hold_lock, ["--resume"], ["train.lock: lock: ", "held by process {pid}"]),
    ("--resume without a checkpoint", _remove("last.pt", "last.prev.pt"), ["--resume"],
     ["{run}: --resume: ", "no checkpoint"]),
    ("--resume on a folder without files", _remove(*["config.yaml", "data_fingerprint.json", "log.jsonl", "last.pt",
                                                     "last.prev.pt", "best.pt", "metrics.json", "curves.png"]),
     ["--resume"], ["{run}: --resume: ", "no checkpoint"]),
    ("--resume with another seed", None, ["--resume", "--seed", "5"],
     ["config.yaml: --resume: ", "train.seed 999 -> 5"]),
    ("--resume with another mask", None, ["--resume", "--missing-ratio", "0.5"],
     ["config.yaml: --resume: ", "data.missing_ratio None -> 0.5"]),
    ("--resume with another precision", None, ["--resume", "--precision", "bf16"],
     ["config.yaml: --resume: ", "train.precision 'fp32' -> 'bf16'"]),
    ("--resume without the run's config", _remove("config.yaml"), ["--resume"],
     ["config.yaml: file: ", "does not exist"]),
    ("--resume when no checkpoint loads", _corrupt("last.pt", "last.prev.pt"), ["--resume"],
     ["last.pt: checkpoint: ", "does not load", "last.prev.pt"]),
    ("--resume and --overwrite", None, ["--resume", "--overwrite"], ["--overwrite"]),
]


@pytest.mark.parametrize("name, change, args, culprits", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_run_folder_misuse(name, change, args, culprits, tiny_run, tmp_path, capsys):
    config, data, finished = tiny_run
    run = shutil.copytree(finished, tmp_path / "run")
    held = change(run) if change is not None else None      # _hold_lock's open file: the lock lasts while it is open
    try:
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"}
        code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 3, *args))
        assert_rejected(code, lines, *[c.format(run=run, pid=os.getpid()) for c in culprits])
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"} == before  # untouched
    finally:
        if held is not None:
            held.close()


# ---------------------------------------------------------------------- what the console shows
@pytest.mark.parametrize("argv, culprit", [
    (["train", "--config", str(CONFIGS / "dgmrec" / "base.yaml"), "--epochs", "0"], "--epochs"),
    (["data", "check", "{dir}"], "width 0"),
])
def test_console_prints_one_line_and_no_traceback(argv, culprit, tiny_dir):
    np.save(tiny_dir / "text_feat.npy", np.zeros((8, 0), np.float32))
    argv = [a.format(dir=tiny_dir) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "dgmrec_dgl.cli", *argv], capture_output=True, text=True)
    assert_rejected(proc.returncode, proc.stderr.splitlines(), culprit)
    assert proc.stdout == ""
