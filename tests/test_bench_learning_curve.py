"""bench/learning_curve.py on a tiny synthetic catalog: the curve's points, the popularity ranker's line, the files."""

from __future__ import annotations

import argparse
import json

from conftest import bench_script


def load():
    return bench_script("learning_curve")


def test_learning_curve_starts_untrained_and_follows_the_validations(sparse_dir, tmp_path):
    curve = load()
    out, run = tmp_path / "out", tmp_path / "run"
    assert curve.main(["--data", str(sparse_dir), "--epochs", "2", "--user-sample", "60", "--reduce-dims", "16",
                       "--history-every", "3", "--threads", "1", "--run", str(run), "--out", str(out)]) == 0
    doc = json.loads((out / "learning_curve.json").read_text())
    rows = doc["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["seconds"] == 0 < rows[1]["seconds"] < rows[2]["seconds"]
    assert len({r["popularity_recall@20"] for r in rows}) == 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["valid"]["recall@20"] for r in log] == [r["recall@20"] for r in rows[1:]]
    assert all(r["valid"]["n_users"] == 60 for r in log)
    assert [r["execution"] for r in log] == ["sampled", "sampled"]
    # the ranker's line is the valid split's, on the validations' users
    from dgmrec_dgl.evaluate import evaluate, popularity_scores
    from dgmrec_dgl.train import load_dataset

    config = curve.build_config(argparse.Namespace(data=sparse_dir, epochs=2, user_sample=60, history_every=3,
                                                   reduce_dims=16, seed=999, threads=1))
    ds = load_dataset(config, prepare_features=False)
    direct = evaluate(popularity_scores(ds), ds, "valid", config.eval.ks, user_sample=60, seed=999)
    assert rows[0]["popularity_recall@20"] == direct["recall@20"]
    assert (out / "learning_curve.png").stat().st_size > 0 and (out / "learning_curve.csv").exists()


def test_a_folder_without_synthetic_data_is_refused_in_one_line(tmp_path, capsys):
    assert load().main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "synthetic.json" in err[0]


def test_resume_continues_a_stopped_run_and_keeps_its_epochs(sparse_dir, tmp_path):
    curve = load()
    out, run = tmp_path / "out", tmp_path / "run"
    common = ["--data", str(sparse_dir), "--user-sample", "60", "--reduce-dims", "16", "--history-every", "3",
              "--threads", "1", "--run", str(run), "--out", str(out)]
    assert curve.main(common + ["--epochs", "1"]) == 0
    first = (run / "log.jsonl").read_text().splitlines()
    assert curve.main(common + ["--epochs", "2", "--resume"]) == 0
    log = (run / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and log[0] == first[0]          # epoch 1 kept as it ran (its seconds too), not retrained
    rows = json.loads((out / "learning_curve.json").read_text())["rows"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[1]["recall@20"] == json.loads(first[0])["valid"]["recall@20"]
