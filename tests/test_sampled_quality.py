"""Tests of bench/sampled_quality.py's driver: each mode trains the dataset's config with only its own keys
changed, ``--epochs`` / ``--patience`` reach the trained config (a bad value is one error line and exit 2),
and the summary pairs a mode with ``full`` seed by seed."""

from __future__ import annotations

import json

import pytest

from conftest import bench_script


@pytest.fixture(scope="module")
def sq():
    return bench_script("sampled_quality")


def fake_runs(sq, monkeypatch, tmp_path, recall):
    """Replace data preparation and training: record each trained config, return ``recall(mode, seed)``."""
    import dgmrec_dgl.compare as compare

    seen = []
    monkeypatch.setattr(sq, "prepare", lambda name, work: (tmp_path / name, None))

    def run_one(config, folder):
        mode = folder.parent.name
        seen.append((mode, int(folder.name[len("seed"):]), config))
        return {"best_epoch": 3, "epochs_run": 9, "seconds": 1.0,
                "test": {"recall@20": recall(mode, config.train.seed), "ndcg@20": 0.0}}

    monkeypatch.setattr(compare, "run_one", run_one)
    return seen


def test_stopping_rule_overrides_reach_the_config(sq, monkeypatch, tmp_path):
    seen = fake_runs(sq, monkeypatch, tmp_path, lambda mode, seed: 0.1)
    out = tmp_path / "out"
    assert sq.main(["--datasets", "demo", "--models", "lightgcn", "--seeds", "7", "--modes", "full,sampled",
                    "--epochs", "500", "--patience", "25", "--out", str(out)]) == 0
    assert [(m, s) for m, s, _ in seen] == [("full", 7), ("sampled", 7)]
    for mode, _, config in seen:
        assert (config.train.epochs, config.train.patience, config.train.seed) == (500, 25, 7)
        assert config.model.execution == mode
    # without the flags the demo preset's own rule is trained
    seen.clear()
    assert sq.main(["--datasets", "demo", "--models", "lightgcn", "--seeds", "7", "--modes", "full",
                    "--out", str(tmp_path / "out2")]) == 0
    assert (seen[0][2].train.epochs, seen[0][2].train.patience) == (30, 5)


def test_bad_stopping_rule_exits_2_before_training(sq, monkeypatch, tmp_path, capsys):
    seen = fake_runs(sq, monkeypatch, tmp_path, lambda mode, seed: 0.1)
    assert sq.main(["--datasets", "demo", "--models", "lightgcn", "--seeds", "7", "--modes", "full",
                    "--patience", "0", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.patience: 0" in err[0] and "fix:" in err[0]
    assert sq.main(["--datasets", "demo", "--models", "lightgcn", "--seeds", "7", "--modes", "full",
                    "--epochs", "0", "--out", str(tmp_path / "out")]) == 2
    assert "train.epochs: 0" in capsys.readouterr().err
    assert seen == []


def test_summary_pairs_modes_with_full_by_seed(sq, monkeypatch, tmp_path):
    values = {("full", 1): 0.20, ("sampled", 1): 0.19, ("full", 2): 0.10, ("sampled", 2): 0.12}
    fake_runs(sq, monkeypatch, tmp_path, lambda mode, seed: values[(mode, seed)])
    out = tmp_path / "out"
    assert sq.main(["--datasets", "demo", "--models", "lightgcn", "--seeds", "1,2", "--modes", "full,sampled",
                    "--out", str(out)]) == 0
    (row,) = json.loads((out / "sampled_quality.json").read_text())["summary"]
    assert (row["mode"], row["seeds"]) == ("sampled", 2)
    assert row["full_recall@20"] == pytest.approx(0.15) and row["recall@20"] == pytest.approx(0.155)
    assert row["ratio"] == pytest.approx(0.155 / 0.15)
