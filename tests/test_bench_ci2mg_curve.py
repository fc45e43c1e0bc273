"""bench/ci2mg_curve.py on the tiny ``toy`` preset: one valid R@20 per epoch and variant in the JSON/CSV/PNG,
the variants' configs differ only in what they name, and a finished run is read back, not trained again."""

from __future__ import annotations

import json

import pytest

from conftest import bench_script


@pytest.fixture(scope="module")
def cc():
    return bench_script("ci2mg_curve")


def test_curves_written_and_finished_runs_reused(cc, tmp_path):
    args = ["--dataset", "toy", "--variants", "release,release-own_norm", "--epochs", "2",
            "--work", str(tmp_path / "work"), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    assert cc.main(args) == 0
    report = json.loads((tmp_path / "out" / "ci2mg_curve.json").read_text())
    assert list(report["curves"]) == ["release", "release-own_norm"]
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in report["curves"].values())
    assert (tmp_path / "out" / "ci2mg_curve.png").stat().st_size > 0
    assert (tmp_path / "out" / "ci2mg_curve.csv").read_text().splitlines()[0] == "variant,epoch1,epoch2"
    log = tmp_path / "runs" / "toy" / "release" / "log.jsonl"
    before = log.stat().st_mtime_ns
    assert cc.main(args) == 0                                   # both finished: read, not trained again
    assert log.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "out" / "ci2mg_curve.json").read_text())["curves"] == report["curves"]


def test_variant_configs_differ_only_where_named(cc, tmp_path):
    folder, mask = tmp_path, None
    release = cc.variant_config("release", "tiktok", folder, mask, 3, 999, 1).to_dict()
    assert release["model"]["generated_for"] == "all" and release["model"]["shared_norm"] is True
    assert release["train"]["batch_size"] == 4096 and release["train"]["lr_decay"] == 1.0
    for name, overrides in cc.VARIANTS.items():
        config = cc.variant_config(name, "tiktok", folder, mask, 3, 999, 1).to_dict()
        changed = {(s, k) for s in ("train", "model") for k in config[s] if config[s][k] != release[s][k]}
        assert changed == {(s, k) for s, values in overrides.items() for k in values}, name


def test_unknown_variant_is_refused(cc, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cc.main(["--variants", "release,fast", "--out", str(tmp_path)])
    assert exc.value.code == 2
