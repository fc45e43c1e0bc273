"""The comparison harness: per-seed runs through the one trainer, Table-2 / Fig.-4 reports, resumability."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import torch

from dgmrec_dgl.compare import METRICS, REFERENCE, add_compare_parser, compare, markdown_table, summarise
from dgmrec_dgl.config import TrainConfig
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.synthetic import generate, preset
from dgmrec_dgl.evaluate import evaluate, popularity_scores

FAST = {"eval_every": 2, "patience": 2, "batch_size": 1024, "threads": 1}


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "toy"
    generate(out, preset("toy", n_users=150, n_items=120), progress=False)
    return out


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_summary_and_bold_best():
    runs = [{"setting": "mask", "ratio": None, "model": m, "seed": s, "recall@20": v, "recall@50": v,
             "ndcg@20": v, "ndcg@50": v} for m, vals in (("lightgcn", (0.2, 0.4)), ("mfbpr", (0.1, 0.1)))
            for s, v in zip((1, 2), vals)]
    summary = summarise(runs)
    assert summary[0]["recall@20_mean"] == pytest.approx(0.3)
    assert summary[0]["recall@20_std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))
    assert summary[1]["recall@20_std"] == 0.0
    table = markdown_table(summary, "mask")
    assert "| LightGCN | **0.3000 ± 0.1414** |" in table and "| MF-BPR | 0.1000 ± 0.0000 |" in table
    # the reference row is shown but never bold, even when it beats every model
    reference = {"setting": "mask", "ratio": None, "model": REFERENCE, "n_seeds": 0}
    for k in METRICS:
        reference.update({f"{k}_mean": 0.5, f"{k}_std": 0.0})
    table = markdown_table(summary + [reference], "mask")
    assert "| Popularity (reference) | 0.5000 | 0.5000 |" in table and "**0.3000 ± 0.1414**" in table


def test_popularity_scores_are_the_train_counts(tiny_dir):
    ds = Dataset.load(tiny_dir)
    scores = popularity_scores(ds)(torch.tensor([0, 3]))
    counts = np.bincount(ds.train[:, 1], minlength=ds.n_items)
    assert scores.shape == (2, ds.n_items) and np.array_equal(scores[1].numpy(), counts)


def test_compare_writes_reports_and_reuses_finished_runs(toy_dir, tmp_path):
    out = tmp_path / "cmp"
    lines = []
    result = compare(["lightgcn", "mfbpr"], toy_dir, out, [1, 2], ratios=None, epochs=2,
                     train_overrides=FAST, log=lines.append)
    for name in ("report.md", "report.csv", "report.png", "runs.csv"):
        assert (out / name).exists()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = _rows(out / "runs.csv")
    assert [(r["model"], r["seed"]) for r in runs] == [("lightgcn", "1"), ("lightgcn", "2"), ("mfbpr", "1"),
                                                      ("mfbpr", "2")]
    report = _rows(out / "report.csv")
    assert [(r["model"], r["n_seeds"]) for r in report] == [("lightgcn", "2"), ("mfbpr", "2"), (REFERENCE, "0")]
    ds = Dataset.load(toy_dir)
    popular = evaluate(popularity_scores(ds), ds, "test")
    assert float(report[2]["recall@20_mean"]) == pytest.approx(popular["recall@20"])
    text = (out / "report.md").read_text()
    assert "| Model | R@20 | R@50 | N@20 | N@50 |" in text and "**" in text
    assert "| Popularity (reference) |" in text and "- MF-BPR: " in text and "; threads 1\n" in text
    assert len(lines) == 4 and not any("reused" in line for line in lines)
    # a second call reuses every finished run and gives the same table
    again = compare(["lightgcn", "mfbpr"], toy_dir, out, [1, 2], epochs=2, train_overrides=FAST,
                    log=lines.append)
    assert all("reused" in line for line in lines[4:])
    assert again["summary"] == result["summary"]
    assert {r["threads"] for r in _rows(out / "runs.csv")} == {"1"}
    # another thread count reuses them too (it changes the speed, not the experiment), and says what ran
    compare(["mfbpr"], toy_dir, out, [1], epochs=2, train_overrides={**FAST, "threads": 2}, log=lines.append)
    assert "reused" in lines[-1] and _rows(out / "runs.csv")[0]["threads"] == "1"
    # a run recorded before a key existed counts that key at its default: reused while the call leaves the
    # key at its default, retrained when the call sets another value
    done = out / "runs" / "mask" / "mfbpr" / "seed2" / "result.json"
    record = json.loads(done.read_text())
    assert record["config"]["data"].pop("reduce_seed") == 0
    done.write_text(json.dumps(record))
    compare(["mfbpr"], toy_dir, out, [2], epochs=2, train_overrides=FAST, log=lines.append)
    assert "reused" in lines[-1]
    assert record["config"]["train"].pop("eval_every") == FAST["eval_every"] != TrainConfig().eval_every
    done.write_text(json.dumps(record))
    compare(["mfbpr"], toy_dir, out, [2], epochs=2, train_overrides=FAST, log=lines.append)
    assert "reused" not in lines[-1]
    # a changed config (more epochs) is not reused
    compare(["mfbpr"], toy_dir, out, [1], epochs=4, train_overrides=FAST, log=lines.append)
    assert "reused" not in lines[-1]


def test_missing_ratios_write_the_robustness_curve(toy_dir, tmp_path):
    out = tmp_path / "rob"
    compare(["mfbpr"], toy_dir, out, [1], ratios=[0.0, 0.5], epochs=2, train_overrides=FAST, inject="nn",
            log=lambda *_: None)
    rows = _rows(out / "robustness.csv")
    assert [float(r["ratio"]) for r in rows] == [0.0, 0.5]
    assert float(rows[0]["relative_drop_pct"]) == 0.0
    assert (out / "robustness.png").exists()
    report = _rows(out / "report.csv")
    assert [(r["setting"], r["model"]) for r in report] == [("ratio0", "mfbpr"), ("ratio0.5", "mfbpr"),
                                                            ("ratio0", REFERENCE), ("ratio0.5", REFERENCE)]
    assert "feature injection: nn" in (out / "report.md").read_text()


def test_cli_parser_quick_and_bad_input(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--quick", "--models", "lightgcn,mfbpr", "--seeds", "7", "--epochs", "3",
                              "--out", str(tmp_path / "q"), "--threads", "1"])
    assert args.run(args) == 0
    for name in ("report.md", "report.csv", "report.png"):
        assert (tmp_path / "q" / name).exists()
    assert (tmp_path / "q" / "data" / "toy" / "missing_items_0.666.npz").exists()
    bad = parser.parse_args(["compare", "--models", "lightgcn,nope", "--out", str(tmp_path / "b"), "--quick"])
    assert bad.run(bad) == 2
    assert "nope" in capsys.readouterr().err
    nodata = parser.parse_args(["compare", "--out", str(tmp_path / "c")])
    assert nodata.run(nodata) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--out", "x", "--missing-ratios", "0.2,1.5"])
    # parsed only: train.keep_freed_memory changes the process's allocator (tests/test_keep_freed_memory.py)
    assert parser.parse_args(["compare", "--out", "x", "--keep-freed-memory"]).keep_freed_memory
    assert not parser.parse_args(["compare", "--out", "x"]).keep_freed_memory


@pytest.mark.slow
def test_quick_with_all_four_models(tmp_path):
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--quick", "--out", str(tmp_path / "q"), "--threads", "1"])
    assert args.run(args) == 0
    models = {r["model"] for r in _rows(tmp_path / "q" / "report.csv")}
    assert models == {"dgmrec", "ci2mg", "lightgcn", "mfbpr", REFERENCE}


def test_compare_runs_a_shipped_new_items_split(toy_dir, tmp_path):
    """``compare --new-items --inter <name>_del.inter``: every run and the popularity row use the release's
    new-items protocol on the shipped split (its test set: every test row + the new items' train rows)."""
    import shutil

    from dgmrec_dgl.data.new_items import new_items_setting

    data = tmp_path / "toy"
    shutil.copytree(toy_dir, data)
    full = Dataset.load(data)
    new = np.arange(0, full.n_items, 5)
    lines = (data / "toy.inter").read_text().splitlines()
    kept = [line for line in lines[1:] if not (line.endswith("\t0") and int(line.split("\t")[1]) % 5 == 0)]
    (data / "toy_del.inter").write_text("\n".join(lines[:1] + kept) + "\n")
    out = tmp_path / "cmp"
    compare(["mfbpr"], data, out, [1], new_items=True, inter="toy_del.inter", epochs=2, train_overrides=FAST,
            log=lambda line: None)
    record = json.loads((out / "runs" / "mask" / "mfbpr" / "seed1" / "result.json").read_text())
    assert record["config"]["data"]["inter"].endswith("toy_del.inter") and record["config"]["data"]["new_items"]
    ds = new_items_setting(full, shipped=str(data / "toy_del.inter"))
    np.testing.assert_array_equal(ds.new_items, new[full.item_train_counts()[new] > 0])
    popular = evaluate(popularity_scores(ds), ds, "test")
    reference = [r for r in _rows(out / "report.csv") if r["model"] == REFERENCE][0]
    assert float(reference["recall@20_mean"]) == pytest.approx(popular["recall@20"])
