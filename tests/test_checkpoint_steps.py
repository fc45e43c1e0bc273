"""Checkpoints inside an epoch (``train.checkpoint_steps``): a run killed mid-epoch resumes at its last
checkpointed step, skips the per-epoch work and the steps already taken, and ends with the same log and
metrics as the run that was never stopped."""

import json

import pytest
import torch

import dgmrec_dgl.train as train_module
from dgmrec_dgl.config import load_config
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.train import train

#: (model, model keys, checkpoint_steps): sampled DGMRec with histories refreshed every 2 steps, full LightGCN
CASES = [("dgmrec", {"execution": "sampled", "history_every": 2, "fanouts": [5, 5, 5], "user_items_sample": 3,
                     "item_users_sample": 3}, 4),
         ("lightgcn", {"execution": "full"}, 3)]


def config(data_dir, name: str, model: dict, every: int):
    return load_config(f"configs/{name}/base.yaml", {
        "data": {"dir": str(data_dir), "missing_ratio": 2 / 3},
        "train": {"epochs": 2, "eval_every": 1, "batch_size": 256, "lr": 0.01, "checkpoint_steps": every},
        "eval": {"user_sample": 100},
        "model": model})


class Killed(Exception):
    pass


def log_of(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name, model, every", CASES, ids=[c[0] for c in CASES])
def test_a_run_killed_inside_an_epoch_resumes_at_its_last_checkpoint_to_the_same_result(
        sparse_dir, tmp_path, monkeypatch, name, model, every):
    whole = train(config(sparse_dir, name, model, every), str(tmp_path / "whole"), progress=False)
    steps = log_of(tmp_path / "whole")[1]["steps"]
    assert steps > every + 1
    kill_at = steps + every + 1             # epoch 1's step every + 1: its checkpoint at step `every` is the last
    step, calls = train_module.training_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", dies)
    with pytest.raises(Killed):
        train(config(sparse_dir, name, model, every), str(tmp_path / "killed"), progress=False)
    monkeypatch.setattr(train_module, "training_step", step)
    checkpoint = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    held = checkpoint["state"]
    assert (held["epoch"], held["step"]) == (1, every)
    assert len(log_of(tmp_path / "killed")) == 1
    # the epoch's memory peak is over its sittings: make the first one's higher than any this process reaches
    assert held["partial"]["record"]["peak_rss_gb"] > 0
    held["partial"]["record"]["peak_rss_gb"] = 1e6
    torch.save(checkpoint, tmp_path / "killed" / "last.pt")

    resumed = train(config(sparse_dir, name, model, every), str(tmp_path / "killed"), resume=True, progress=False)
    assert resumed["valid"] == whole["valid"] and resumed["test"] == whole["test"]
    before, after = log_of(tmp_path / "whole"), log_of(tmp_path / "killed")
    assert after[1]["resumed_at_step"] == [every] and "resumed_at_step" not in before[1]
    for a, b in zip(before, after):
        assert a["loss"] == b["loss"] and a["valid"] == b["valid"]
        assert a.get("before_epoch") == b.get("before_epoch") and a.get("history", {}).get("refreshes") == \
            b.get("history", {}).get("refreshes")
    assert "checkpoint" in after[1]["seconds"] and held["step"] < after[1]["steps"]
    assert after[1]["peak_rss_gb"] == 1e6 and 0 < after[0]["peak_rss_gb"] < 1e6
    first = before[0]                   # the first validation is the best so far: it tests too
    assert set(first["eval_seconds"]) == {"embeddings", "valid", "test"} and first["peak_rss_gb"] > 0
    assert sum(first["eval_seconds"].values()) <= first["seconds"]["eval"]


def test_checkpoint_steps_off_the_history_refreshes_is_refused_naming_both_keys(sparse_dir):
    with pytest.raises(DataError, match=r"train\.checkpoint_steps.*3 is not a multiple of model\.history_every \(2\)"):
        config(sparse_dir, "lightgcn", {"execution": "sampled", "history_every": 2}, 3)
    config(sparse_dir, "lightgcn", {"execution": "sampled", "history_every": 2}, 4)


def test_a_records_wall_seconds_leave_out_the_parts_of_its_training_seconds():
    from dgmrec_dgl.train import wall_seconds

    record = {"seconds": {"train": 10.0, "before_epoch": 2.0, "checkpoint": 0.5, "eval": 3.0,
                          "train_sample": 4.0, "train_wait": 1.0}}
    assert wall_seconds(record) == 15.5 and wall_seconds({}) == 0.0
