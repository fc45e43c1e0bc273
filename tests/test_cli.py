"""The `dgmrec-dgl` commands: data on real splits and generated data; train → evaluate → recommend."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_split
from dgmrec_dgl.cli import main
from dgmrec_dgl.data.masks import MissingMask


def table(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        label, _, value = line.rpartition("  ")
        rows[label.strip()] = value.strip()
    return rows


def test_check_tiktok_prints_the_published_statistics(capsys):
    folder = shared_split("tiktok")
    assert main(["data", "check", str(folder), "--inter", "tiktok.inter"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["users"] == "9,308" and rows["items"] == "6,710"
    assert rows["interactions"] == "68,722" and rows["sparsity"] == "99.89%"


def test_check_baby_with_the_shipped_mask(capsys):
    folder = shared_split("baby")
    assert main(["data", "check", str(folder), "--inter", "baby_del.inter",
                 "--mask", str(folder / "missing_items_0.666.npz")]) == 0
    rows = table(capsys.readouterr().out)
    assert rows["missing text only"] == "1,174"
    assert rows["missing image only"] == "1,176"
    assert rows["missing both (image+text)"] == "2,350"


def test_mask_command_writes_nested_even_masks(tiny_dir, capsys):
    assert main(["data", "mask", str(tiny_dir), "--ratio", "0.25,0.5,0.75,1", "--seed", "7"]) == 0
    paths = [tiny_dir / f"missing_items_{r}.npz" for r in ("0.25", "0.5", "0.75", "1")]
    masks = [MissingMask.load(p, 8) for p in paths]
    for low, high in zip(masks, masks[1:]):
        for m in ("image", "text"):
            assert not (low.missing(m) & ~high.missing(m)).any()
    assert masks[-1].counts() == {"t": 2, "v": 2, "all": 4}
    assert "wrote" in capsys.readouterr().out


def test_mask_command_needs_modalities_without_features(tmp_path, tiny_dir, capsys):
    for f in ("image_feat.npy", "text_feat.npy"):
        (tiny_dir / f).unlink()
    assert main(["data", "mask", str(tiny_dir), "--ratio", "0.5"]) == 2
    assert "--modalities" in capsys.readouterr().err
    assert main(["data", "mask", str(tiny_dir), "--ratio", "1/2", "--modalities", "image,text,audio"]) == 0


def test_bad_ratio_is_an_argument_error(tiny_dir):
    with pytest.raises(SystemExit) as exc:
        main(["data", "mask", str(tiny_dir), "--ratio", "1.5"])
    assert exc.value.code == 2


def test_console_script_entry_point_runs(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "dgmrec_dgl.cli", "data", "check", str(tiny_dir)],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "items" in proc.stdout
    np.testing.assert_equal(proc.stderr, "")


def test_a_knn_k_above_the_catalog_size_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    assert main(["train", "--config", "configs/dgmrec/base.yaml", "--data", str(tiny_dir), "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "model.knn_k" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["lightgcn", "dgmrec"])
def test_train_then_evaluate_recommend_and_retrieve(model, tiny_dir, tmp_path, capsys):
    run, config = tmp_path / "run", tmp_path / "tiny.yaml"
    config.write_text(f"extends: {Path.cwd() / 'configs' / model / 'base.yaml'}\nmodel:\n  knn_k: 3\n"
                      if model == "dgmrec" else f"extends: {Path.cwd() / 'configs' / model / 'base.yaml'}\n")
    extra = ["--missing-ratio", "0.5"] if model == "dgmrec" else []
    assert main(["train", "--config", str(config), "--data", str(tiny_dir), "--epochs", "3",
                 "--out", str(run), "--quiet", *extra]) == 0
    assert main(["evaluate", str(run)]) == 0
    assert "recall@20" in capsys.readouterr().out
    assert main(["recommend", str(run), "--users", "0,1", "--k", "3"]) == 0
    if model == "dgmrec":
        assert main(["evaluate", str(run), "--retrieval"]) == 0
        report = json.loads((run / "retrieval.json").read_text())
        assert set(report) == {"dgmrec", "nn"}
        assert "missing=1/hit@10" in report["dgmrec"]
    else:   # trained without a mask: a one-line error, not a stack trace
        assert main(["evaluate", str(run), "--retrieval"]) == 2


@pytest.mark.parametrize("script", ["timing_table.py", "scale.py", "graph_refinement.py"])
def test_bench_scripts_print_their_help(script):
    bench = Path(__file__).resolve().parents[1] / "bench"
    proc = subprocess.run([sys.executable, str(bench / script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--quick" in proc.stdout
