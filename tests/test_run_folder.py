"""Run folders owned by one training (dgmrec_dgl.run_folder) and safe resuming (dgmrec_dgl.train).

Refusal of another run's folder, ``--overwrite``, the lock, stale temporary files, ``metrics.json``'s
``finished``, resuming only under the run's config and data, the fallback to ``last.prev.pt`` and checkpoints
that load with ``weights_only=True``. LightGCN on the tiny dataset: about a second an epoch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dgmrec_dgl
from conftest import CONFIGS, assert_rejected, run_cli, tiny_lightgcn_config, train_argv
from dgmrec_dgl.config import load_config
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.run_folder import claimed
from dgmrec_dgl.train import train


def copy_run(tiny_run, tmp_path) -> tuple[Path, Path, Path]:
    config, data, finished = tiny_run
    return config, data, shutil.copytree(finished, tmp_path / "run")


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def log_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- ownership
def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 1, "--seed", 7))
    assert_rejected(code, lines, f"{run}: --out: ", "best.pt", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "train.lock"} == \
        {k: v for k, v in before.items() if k != "train.lock"}


def test_a_folder_of_other_files_is_trained_into_and_overwrite_keeps_them(tiny_run, tmp_path, capsys):
    config, data, _ = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 1))[0] == 0
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 1, "--overwrite"))[0] == 0
    assert (run / "notes.txt").read_text() == "mine"


def test_a_run_stopped_by_bad_input_leaves_no_run_files(tiny_run, tmp_path, capsys):
    config, data, _ = tiny_run
    run, dgmrec = tmp_path / "run", tmp_path / "dgmrec.yaml"
    dgmrec.write_text(f"extends: {CONFIGS / 'dgmrec' / 'base.yaml'}\n")       # knn_k 10 > the tiny catalog's 8 items
    code, lines = run_cli(capsys, train_argv(dgmrec, data, run, "--epochs", 1))
    assert_rejected(code, lines, "model.knn_k")
    assert sorted(os.listdir(run)) == ["train.lock"]
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 1))[0] == 0    # not another run's folder


def test_overwrite_removes_the_old_run_so_evaluate_cannot_report_its_model(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    assert (run / "best.pt").exists()
    for name in ("evaluation.json", "retrieval.json"):          # what evaluate wrote about the old model
        (run / name).write_text("{}")
    (run / "notes.txt").write_text("not the run's")
    no_validation = tiny_lightgcn_config(tmp_path, eval_every=3)
    assert run_cli(capsys, train_argv(no_validation, data, run, "--epochs", 1, "--overwrite"))[0] == 0
    assert not any((run / name).exists() for name in ("best.pt", "evaluation.json", "retrieval.json"))
    assert log_epochs(run) == [0] and metrics(run) == {"finished": True}
    assert (run / "notes.txt").exists()
    code, lines = run_cli(capsys, ["evaluate", run])
    assert_rejected(code, lines, "best.pt")


def test_a_second_trainer_on_a_locked_folder_exits_2_naming_the_holder(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    with open(run / "train.lock", "a+") as held:                 # the first trainer, as its lock looks
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.seek(0)
        held.truncate()
        held.write(f"{os.getpid()}\n")
        held.flush()
        code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))
        assert_rejected(code, lines, "train.lock", f"held by process {os.getpid()}")
        assert log_epochs(run) == [0, 1]
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))[0] == 0   # released: trains


def test_the_lock_is_held_while_training(tiny_run, tmp_path, monkeypatch):
    config_file, data, _ = tiny_run
    config, run = load_config(config_file, {"data": {"dir": str(data)}, "train": {"epochs": 1}}), tmp_path / "run"
    seen = []

    def probe(*args, **kwargs):      # in the middle of training: another open file cannot take the lock
        with open(run / "train.lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("free")
            except BlockingIOError:
                seen.append(other.read().strip())
        return real(*args, **kwargs)

    import dgmrec_dgl.train as trainer

    real = trainer.run_epoch
    monkeypatch.setattr(trainer, "run_epoch", probe)
    with claimed(config, run):
        train(config, str(run), progress=False)
    assert seen == [str(os.getpid())]


def test_stale_temporary_files_are_removed_at_start(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    stale = [run / ".tmp-k1ll3d.pt", run / ".tmp-x2y3z4"]       # the names io_utils.atomic_path gives
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (run / "tmp-notes.txt").write_text("mine")
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))[0] == 0
    assert not any(path.exists() for path in stale)
    assert (run / "tmp-notes.txt").exists()


def test_metrics_say_whether_the_run_finished(tiny_run, tmp_path, capsys):
    config_file, data, finished = tiny_run
    assert metrics(finished)["finished"] is True and "best_epoch" in metrics(finished)
    config, run = load_config(config_file, {"data": {"dir": str(data)}, "train": {"epochs": 3}}), tmp_path / "run"
    with claimed(config, run):
        train(config, str(run), progress=False, max_epochs=1)           # stopped after one epoch of three
    assert metrics(run)["finished"] is False and metrics(run)["best_epoch"] == 0
    assert run_cli(capsys, train_argv(config_file, data, run, "--epochs", 3, "--resume"))[0] == 0
    assert metrics(run)["finished"] is True and log_epochs(run) == [0, 1, 2]


def test_a_run_not_finished_until_its_last_epoch(tiny_run, tmp_path, monkeypatch):
    """metrics.json of a run in progress (also one extended with --resume) says finished: false."""
    config_file, data, finished = tiny_run
    run = shutil.copytree(finished, tmp_path / "run")
    config = load_config(config_file, {"data": {"dir": str(data)}, "train": {"epochs": 3}})
    import dgmrec_dgl.train as trainer

    seen, real = [], trainer.run_epoch
    monkeypatch.setattr(trainer, "run_epoch", lambda *a, **k: seen.append(metrics(run)["finished"]) or real(*a, **k))
    with claimed(config, run, resume=True):
        train(config, str(run), resume=True, progress=False)
    assert seen == [False] and metrics(run)["finished"] is True


def test_fit_refuses_a_used_folder_unless_overwrite(tiny_run, tmp_path):
    config, data, run = copy_run(tiny_run, tmp_path)
    with pytest.raises(DataError, match="holds the files of another run"):
        dgmrec_dgl.fit(config, data=data, out=run, progress=False, train={"epochs": 1})
    fitted = dgmrec_dgl.fit(config, data=data, out=run, overwrite=True, progress=False, train={"epochs": 1})
    assert fitted.metrics["best_epoch"] == 0 and log_epochs(run) == [0]
    with pytest.raises(DataError, match="--overwrite"):
        dgmrec_dgl.fit(config, data=data, out=run, resume=True, overwrite=True, progress=False)


# ---------------------------------------------------------------------- resuming
def test_resume_under_another_config_is_refused_listing_the_keys(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(f"extends: {config}\ntrain: {{lr: 0.01}}\n")
    code, lines = run_cli(capsys, train_argv(other, data, run, "--epochs", 3, "--resume", "--seed", 5))
    assert_rejected(code, lines, "config.yaml: --resume: ", "train.lr 0.001 -> 0.01", "train.seed 999 -> 5",
                    "train.epochs")
    assert "train.epochs 2" not in lines[0] and "threads" not in lines[0].split("; fix:")[0]


def test_resume_on_other_data_is_refused(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    copy = shutil.copytree(data, tmp_path / "copy")
    code, lines = run_cli(capsys, train_argv(config, copy, run, "--epochs", 3, "--resume"))
    assert_rejected(code, lines, "config.yaml: --resume: ", f"data.dir {str(data)!r} -> {str(copy)!r}")
    own = tmp_path / "own"                               # a run on the copy, whose .inter then changes
    assert run_cli(capsys, train_argv(config, copy, own, "--epochs", 1))[0] == 0
    inter = copy / "tiny.inter"
    inter.write_text(inter.read_text().replace("\t1\n", "\t0\n", 1))
    code, lines = run_cli(capsys, train_argv(config, copy, own, "--epochs", 3, "--resume"))
    assert_rejected(code, lines, "tiny.inter: data file: ", "changed since the run was trained")


def test_resume_may_extend_the_epochs_and_change_the_threads(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    assert run_cli(capsys, train_argv(config, data, run, "--epochs", 4, "--threads", 1, "--resume"))[0] == 0
    assert log_epochs(run) == [0, 1, 2, 3] and metrics(run)["finished"] is True
    assert "epochs: 4" in (run / "config.yaml").read_text()


def test_resume_without_a_checkpoint_is_refused(tiny_run, tmp_path, capsys):
    config, data, _ = tiny_run
    for run in (tmp_path / "absent", tmp_path / "empty"):
        if run.name == "empty":
            run.mkdir()
        code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 1, "--resume"))
        assert_rejected(code, lines, f"{run}: --resume: ", "no checkpoint")
    assert not (tmp_path / "absent").exists() and list((tmp_path / "empty").iterdir()) == []


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    straight = tmp_path / "straight"
    assert run_cli(capsys, train_argv(config, data, straight, "--epochs", 3))[0] == 0
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])        # a write cut short
    code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 2, "--resume"))
    assert code == 0, lines
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1 and "last.pt: does not load" in warnings[0] and "last.prev.pt (epoch 1)" in warnings[0]
    assert log_epochs(run) == [0, 1]             # epoch 1 again, from the previous checkpoint
    epochs = {name: torch.load(run / name, weights_only=True)["state"]["epoch"]     # the broken one was not
              for name in ("last.pt", "last.prev.pt")}                             # kept as the previous one
    assert epochs == {"last.pt": 2, "last.prev.pt": 1}
    code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))
    assert code == 0 and not lines, lines
    assert log_epochs(run) == [0, 1, 2]
    assert metrics(run) == metrics(straight)     # the uninterrupted run's result
    resumed, uninterrupted = (torch.load(r / "last.pt", weights_only=True)["model"] for r in (run, straight))
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_no_checkpoint_that_loads_is_an_error_naming_the_file(tiny_run, tmp_path, capsys):
    config, data, run = copy_run(tiny_run, tmp_path)
    (run / "last.pt").write_bytes(b"garbage")
    (run / "last.prev.pt").unlink()
    code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))
    assert_rejected(code, lines, f"{run / 'last.pt'}: checkpoint: does not load", "--overwrite")


def test_a_checkpoint_holding_other_objects_does_not_load(tiny_run, tmp_path, capsys):
    """weights_only=True: a pickle of anything but tensors and plain values is refused, not run."""
    config, data, run = copy_run(tiny_run, tmp_path)
    ckpt = torch.load(run / "last.pt", weights_only=True)
    torch.save({**ckpt, "state": Path("/")}, run / "last.pt")              # an object a pickle would build
    (run / "last.prev.pt").unlink()
    code, lines = run_cli(capsys, train_argv(config, data, run, "--epochs", 3, "--resume"))
    assert_rejected(code, lines, "last.pt: checkpoint: does not load")


def test_checkpoints_hold_only_tensors_and_plain_values(tiny_dir, tmp_path, capsys):
    """DGMRec's checkpoints carry its refined kNN graphs too: as tensors, so weights_only=True loads them."""
    config = tmp_path / "dgmrec.yaml"
    config.write_text(f"extends: {CONFIGS / 'dgmrec' / 'base.yaml'}\ntrain: {{eval_every: 1}}\nmodel: {{knn_k: 3}}\n")
    run = tmp_path / "run"
    assert run_cli(capsys, train_argv(config, tiny_dir, run, "--epochs", 2, "--missing-ratio", 0.5))[0] == 0
    for name in ("last.pt", "last.prev.pt", "best.pt"):
        ckpt = torch.load(run / name, weights_only=True)
        assert set(ckpt["graph_state"]) == {"image", "text"}
        assert all(isinstance(t, torch.Tensor) for arrays in ckpt["graph_state"].values() for t in arrays)
    assert torch.load(run / "last.prev.pt", weights_only=True)["state"]["epoch"] == 1
    assert run_cli(capsys, train_argv(config, tiny_dir, run, "--epochs", 3, "--missing-ratio", 0.5, "--resume"))[0] == 0
    assert dgmrec_dgl.load(run).metrics["finished"] is True


def test_the_console_shows_one_line_for_a_used_folder(tiny_run, tmp_path):
    config, data, run = copy_run(tiny_run, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dgmrec_dgl.cli", *train_argv(config, data, run, "--epochs", 1)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert_rejected(proc.returncode, proc.stderr.splitlines(), f"{run}: --out: ")
