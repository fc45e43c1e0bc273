"""`train` → `recommend`, `evaluate`, `plot` on a tiny run: the files they write and the one-line refusals."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_tiny_dir   # the tiny_dir data in a folder of our choice

from dgmrec_dgl import load
from dgmrec_dgl.cli import main
from dgmrec_dgl.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_tiny(tmp: Path, model: str, *extra: str) -> Path:
    """Train from inside ``tmp`` with a relative --data path, as a user in their project folder would."""
    config = tmp / f"{model}.yaml"
    knn = "model:\n  knn_k: 3\n" if model == "dgmrec" else ""
    config.write_text(f"extends: {CONFIGS / model / 'base.yaml'}\n{knn}")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["train", "--config", str(config), "--data", "tiny", "--epochs", "3", "--out", "run",
                     "--quiet", "--threads", "1", *extra]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "run"


@pytest.fixture(scope="module")
def dgmrec_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dgmrec")
    make_tiny_dir(tmp / "tiny")
    return train_tiny(tmp, "dgmrec", "--missing-ratio", "0.5")


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def train_pairs(run: Path) -> set[tuple[int, int]]:
    rows = [line.split("\t") for line in (run.parent / "tiny" / "tiny.inter").read_text().splitlines()[1:]]
    return {(int(u), int(i)) for u, i, label in rows if int(label) == 0}


def test_train_records_absolute_paths_fingerprint_and_curves(dgmrec_run, capsys):
    config = yaml.safe_load((dgmrec_run / "config.yaml").read_text())
    data_dir = str((dgmrec_run.parent / "tiny").resolve())
    assert config["data"]["dir"] == data_dir
    assert config["data"]["inter"] == os.path.join(data_dir, "tiny.inter")
    assert config["train"]["threads"] == 1
    files = json.loads((dgmrec_run / "data_fingerprint.json").read_text())["files"]
    assert sorted(os.path.basename(f) for f in files) == ["image_feat.npy", "text_feat.npy", "tiny.inter"]
    record = files[os.path.join(data_dir, "tiny.inter")]
    assert record["size"] == os.path.getsize(os.path.join(data_dir, "tiny.inter"))
    assert record["hashed"] == "whole file" and len(record["sha256"]) == 64
    png = (dgmrec_run / "curves.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_recommend_csv_excludes_train_items_unless_asked(dgmrec_run, tmp_path, capsys):
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(dgmrec_run), "--all-users", "--k", "3", "--out", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["user", "rank", "item", "score", "missing"]
    assert len(rows) == 6 * 3                         # 4 unseen items per user >= k
    assert [int(r["rank"]) for r in rows[:3]] == [1, 2, 3]
    seen = train_pairs(dgmrec_run)
    assert not {(int(r["user"]), int(r["item"])) for r in rows} & seen
    run = load(dgmrec_run)
    for r in rows:
        assert float(r["score"]) == pytest.approx(float(run.score([int(r["user"])], [int(r["item"])])[0, 0]),
                                                  rel=1e-5, abs=1e-6)
        lacks = [m for m in ("image", "text") if not run.dataset.present[m][int(r["item"])]]
        assert r["missing"] == "+".join(lacks)
    assert any(r["missing"] for r in rows) or not any(run.dataset.mask.n_missing())

    everything = tmp_path / "all.csv"
    assert main(["recommend", str(dgmrec_run), "--users", "0,1", "--k", "8", "--include-seen",
                 "--out", str(everything)]) == 0
    rows = read_csv(everything)
    assert len(rows) == 2 * 8
    assert {(0, i) for i in range(8)} <= {(int(r["user"]), int(r["item"])) for r in rows}
    assert {(int(r["user"]), int(r["item"])) for r in rows} & seen

    # k above the unseen items: only the 4 candidates per user; the approximate index agrees on 8 items
    capsys.readouterr()
    assert main(["recommend", str(dgmrec_run), "--users", "2", "--k", "8", "--approximate"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "user,rank,item,score,missing" and len(printed) == 1 + 4
    exact = run.recommend([2], k=8)
    assert [int(line.split(",")[2]) for line in printed[1:]] == exact["item"].tolist()


def test_recommend_users_file_and_bad_input(dgmrec_run, tmp_path, capsys):
    ids = tmp_path / "ids.txt"
    ids.write_text("5\n0, 3\n")
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(dgmrec_run), "--users-file", str(ids), "--k", "2", "--out", str(out)]) == 0
    assert [int(r["user"]) for r in read_csv(out)] == [5, 5, 0, 0, 3, 3]
    capsys.readouterr()

    assert main(["recommend", str(dgmrec_run), "--users", "0,6", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--users" in err[0] and "6" in err[0] and "fix:" in err[0]
    assert not (tmp_path / "x.csv").exists()

    ids.write_text("1\ntwo\n")
    assert main(["recommend", str(dgmrec_run), "--users-file", str(ids)]) == 2
    assert "line 2" in capsys.readouterr().err
    ids.write_text("\n")
    assert main(["recommend", str(dgmrec_run), "--users-file", str(ids)]) == 2
    assert "holds no user id" in capsys.readouterr().err

    for flag, value in (("--k", "0"), ("--users", "1,x")):
        args = ["recommend", str(dgmrec_run), "--k", "3", "--users", "1"]
        args[args.index(flag) + 1] = value
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and repr(value.split(",")[-1]) in err and "fix:" in err and "Traceback" not in err

    assert main(["recommend", str(dgmrec_run), "--users", "1", "--out", str(tmp_path / "r.txt")]) == 2
    assert ".csv" in capsys.readouterr().err


def test_recommend_parquet_needs_pyarrow(dgmrec_run, tmp_path, capsys):
    out = tmp_path / "recs.parquet"
    code = main(["recommend", str(dgmrec_run), "--all-users", "--k", "2", "--out", str(out)])
    try:
        import pyarrow.parquet as pq
    except ImportError:
        assert code == 2 and not out.exists()
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "pyarrow" in err and ".csv" in err and "\n" not in err
    else:
        assert code == 0
        table = pq.read_table(out)
        assert table.column_names == ["user", "rank", "item", "score", "missing"] and table.num_rows == 12


def test_evaluate_prints_tables_and_writes_evaluation_json(dgmrec_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # another folder: the absolute paths still resolve
    assert main(["evaluate", str(dgmrec_run)]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((dgmrec_run / "metrics.json").read_text())
    assert f"best epoch: {metrics['best_epoch']}" in out
    assert "test missing 1" in out and "valid missing 0" in out
    report = json.loads((dgmrec_run / "evaluation.json").read_text())
    assert set(report) == {"run_dir", "best_epoch", "ks", "splits", "overall", "by_missing_level"}
    assert report["best_epoch"] == metrics["best_epoch"] and report["ks"] == [10, 20, 50]
    assert set(report["overall"]) == {"valid", "test"}
    for name in ("recall@20", "ndcg@10"):       # the best checkpoint reproduces what training measured
        assert report["overall"]["test"][name] == pytest.approx(metrics["test"][name], abs=1e-6)
    levels = report["by_missing_level"]["test"]
    assert set(levels) <= {"0", "1", "2"} and len(levels) >= 2
    for level, values in levels.items():
        assert values["recall@20"] == pytest.approx(metrics["test"][f"recall@20/group={level}"], abs=1e-6)

    assert main(["evaluate", str(dgmrec_run), "--split", "test", "--ks", "5,10"]) == 0
    report = json.loads((dgmrec_run / "evaluation.json").read_text())
    assert report["splits"] == ["test"] and set(report["overall"]) == {"test"}
    assert set(report["overall"]["test"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10", "n_users"}
    with pytest.raises(SystemExit):
        main(["evaluate", str(dgmrec_run), "--ks", "10,0"])


def test_plot_overlays_runs(dgmrec_run, tmp_path, capsys):
    other = tmp_path / "copy"
    shutil.copytree(dgmrec_run, other)
    out = tmp_path / "both.png"
    assert main(["plot", str(dgmrec_run), str(other), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC) and out.stat().st_size > 5000
    assert main(["plot", str(dgmrec_run), "--out", str(tmp_path / "c.jpg")]) == 2
    assert main(["plot", str(tmp_path), "--out", str(out)]) == 2          # no log.jsonl: one line
    assert "log.jsonl" in capsys.readouterr().err


def test_changed_data_is_refused_and_old_runs_still_load(tmp_path, capsys):
    make_tiny_dir(tmp_path / "tiny")
    run = train_tiny(tmp_path, "lightgcn", "--precision", "bf16")
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["precision"] == "bf16"
    inter = tmp_path / "tiny" / "tiny.inter"
    os.utime(inter, ns=(0, 0))                        # touched but the same bytes: still accepted
    load(run)
    assert main(["evaluate", str(run)]) == 0
    capsys.readouterr()

    inter.write_text(inter.read_text().replace("\t1\n", "\t0\n", 1))   # one valid row becomes train
    for command in (["evaluate", str(run)], ["recommend", str(run), "--users", "0"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "tiny.inter" in err and "changed" in err and "\n" not in err
    with pytest.raises(DataError, match="SHA-256"):
        load(run)
    assert main(["train", "--config", str(tmp_path / "lightgcn.yaml"), "--data", str(tmp_path / "tiny"),
                 "--out", str(run), "--resume", "--quiet", "--epochs", "3", "--precision", "bf16"]) == 2   # other data
    assert "tiny.inter" in capsys.readouterr().err
    (run / "data_fingerprint.json").unlink()           # a run folder from before fingerprints: loads
    assert load(run).dataset.n_users == 6

    shutil.rmtree(tmp_path / "tiny")
    assert main(["recommend", str(run), "--users", "0"]) == 2


def test_curves_of_a_run_without_validation_and_with_negative_loss_terms(tmp_path):
    from dgmrec_dgl.plots import write_curves

    records = [{"epoch": e, "loss": {"bpr": 0.7 - 0.1 * e, "club": -0.01 * e}} for e in range(3)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = write_curves(tmp_path)
    assert path == str(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_MAGIC)
