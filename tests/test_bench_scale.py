"""Smoke tests of the helpers of bench/scale.py (memory plan, result rows, report); no data generated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("bench_scale", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_estimates_grow_with_size_and_width(scale):
    small, large = scale.nominal_shape(50_000), scale.nominal_shape(200_000)
    assert large["n_users"] == 2 * large["n_items"]
    for stage in scale.STAGES:
        assert 0 < scale.estimate_gb(stage, small, scale.DIMS) < scale.estimate_gb(stage, large, scale.DIMS)
    narrow = {"image": 256, "text": 384}
    assert scale.estimate_gb("dgmrec_epoch", large, narrow) < scale.estimate_gb("dgmrec_epoch", large, scale.DIMS)


def test_plan_reduces_the_image_only_when_needed(scale):
    dims, reduce = scale.plan_dims(50_000, "auto", 256, limit_gb=20.0)
    assert dims == scale.DIMS and reduce is None
    dims, reduce = scale.plan_dims(200_000, "auto", 256, limit_gb=20.0)
    assert dims == {"image": 256, "text": 384} and reduce == {"image": 256}
    assert scale.plan_dims(50_000, "always", 128, limit_gb=20.0)[1] == {"image": 128}
    assert scale.plan_dims(1_000_000, "never", 256, limit_gb=20.0) == (scale.DIMS, None)


def test_rows_table_and_files(scale, tmp_path, capsys):
    plan = {"dims": {"image": 256, "text": 384}, "reduce_dims": {"image": 256}}
    gen = {"stages": {"generate": {"status": "ok", "kind": "measured", "seconds": 2.0, "cpu_seconds": 1.5,
                                   "peak_rss_gb": 0.2, "disk_gb": 0.5}}}
    pipe = {"info": {"shape": {"n_items": 990, "n_users": 1990, "n_train": 16_000}},
            "stages": {"load": {"status": "ok", "kind": "measured", "seconds": 1.0, "peak_rss_gb": 0.5, "read_s": 0.9},
                       "knn": {"status": "skipped: needs 30.0 GB", "estimate_gb": 30.0}}}
    rows = scale.stage_rows(1000, plan, gen, pipe)
    assert [r["stage"] for r in rows] == list(scale.STAGES)
    by = {r["stage"]: r for r in rows}
    assert by["knn"]["status"] == "skipped: needs 30.0 GB"
    assert by["dgmrec_epoch"]["status"] == "skipped: needs knn"        # never reached: says why
    assert json.loads(by["load"]["details"]) == {"read_s": 0.9}
    assert by["load"]["n_items"] == 990 and by["load"]["reduce_dims"] == '{"image": 256}'
    scale.write_results(rows, {"sizes": [1000]}, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"scale.json", "scale.csv", "scale.png"}
    scale.print_table(rows)
    out = capsys.readouterr().out
    assert "skipped: needs 30.0 GB" in out and "1,000 items" in out and "2.0 [2] s / 0.20 GB" in out
