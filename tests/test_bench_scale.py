"""Tests of bench/scale.py: the memory plan, stage selection, result rows and merging, reusing data, and
one tiny run of the script (300 items, a few training steps; no timing is checked)."""

from __future__ import annotations

import json

import pytest

from conftest import bench_script


@pytest.fixture(scope="module")
def scale():
    return bench_script("scale")


def test_estimates_grow_with_size_and_width(scale):
    small, large = scale.nominal_shape(50_000), scale.nominal_shape(200_000)
    assert large["n_users"] == 2 * large["n_items"]
    for mode in ("full", "blocks", "sampled"):
        for stage in scale.STAGES:
            assert 0 < scale.estimate_gb(stage, small, scale.DIMS, mode) < scale.estimate_gb(stage, large, scale.DIMS,
                                                                                            mode)
    narrow = {"image": 256, "text": 384}
    assert scale.estimate_gb("dgmrec_epoch", large, narrow) < scale.estimate_gb("dgmrec_epoch", large, scale.DIMS)
    # blocks mode computes no decoder output for every item: less memory per item x dimension
    assert (scale.estimate_gb("dgmrec_epoch", large, scale.DIMS, "blocks")
            < scale.estimate_gb("dgmrec_epoch", large, scale.DIMS, "full"))
    assert scale.estimate_gb("knn", large, narrow, "blocks") == scale.estimate_gb("knn", large, narrow, "full")
    # sampled mode: no full-graph ID branch and lazy Adam on the raw tables, below blocks mode; at 1M, 256/384
    # (16.27 GiB measured) it fits under the 19.1 GiB limit that skipped it with the blocks coefficients
    million = {"n_items": 999_994, "n_users": 2_000_000, "n_interactions": 38_974_649, "n_train": 30_871_665}
    sampled = scale.estimate_gb("dgmrec_epoch", million, narrow, "sampled")
    assert 16.27 < sampled < 19.1 < scale.estimate_gb("dgmrec_epoch", million, narrow, "blocks")


def test_plan_reduces_the_image_only_when_needed(scale):
    dims, reduce = scale.plan_dims(50_000, "auto", 256, limit_gb=20.0)
    assert dims == scale.DIMS and reduce is None
    dims, reduce = scale.plan_dims(200_000, "auto", 256, limit_gb=20.0)
    assert dims == {"image": 256, "text": 384} and reduce == {"image": 256}
    assert scale.plan_dims(1_000_000, "auto", 256, limit_gb=20.0, mode="blocks")[1] == {"image": 256}
    assert scale.plan_dims(50_000, "always", 128, limit_gb=20.0)[1] == {"image": 128}
    assert scale.plan_dims(1_000_000, "never", 256, limit_gb=20.0) == (scale.DIMS, None)
    both = scale.parse_reduce_dims("image=128,text=128")
    assert both == {"image": 128, "text": 128} and scale.parse_reduce_dims("256") == 256
    assert scale.plan_dims(50_000, "always", both, limit_gb=20.0) == (both, both)
    assert scale.plan_dims(50_000, "always", {"text": 512}, limit_gb=20.0) == (scale.DIMS, None)  # not wider
    with pytest.raises(Exception, match="unknown modality"):
        scale.parse_reduce_dims("audio=64")


def test_training_mode_follows_the_config(scale):
    assert scale.training_mode("full", 10**6) == "full"
    assert scale.training_mode("blocks", 100) == "blocks"
    assert scale.training_mode("auto", 100) == "full"
    assert scale.training_mode("auto", 10**5) == "blocks"
    assert scale.training_mode("auto", 10**6) == "sampled"
    assert scale.training_mode("sampled", 100) == "sampled"


def test_stages_with_dependencies(scale):
    assert scale.with_dependencies(["evaluate"]) == ["generate", "load", "knn", "dgmrec_epoch", "evaluate"]
    assert scale.with_dependencies(["lightgcn_epoch", "generate"]) == ["generate", "load", "lightgcn_epoch"]
    assert scale.with_dependencies(["lightgcn_evaluate"]) == ["generate", "load", "lightgcn_epoch", "lightgcn_evaluate"]
    assert scale.with_dependencies(scale.STAGES) == list(scale.STAGES)
    assert scale.parse_stages("refine, knn") == ["refine", "knn"]
    with pytest.raises(Exception, match="unknown stage"):
        scale.parse_stages("knn,train")
    with pytest.raises(SystemExit):
        scale.main(["--stages", "bogus"])


def test_rows_table_and_files(scale, tmp_path, capsys):
    plan = {"dims": {"image": 256, "text": 384}, "reduce_dims": {"image": 256}}
    gen = {"stages": {"generate": {"status": "ok", "kind": "measured", "seconds": 2.0, "cpu_seconds": 1.5,
                                   "peak_rss_gb": 0.2, "disk_gb": 0.5}}}
    pipe = {"info": {"shape": {"n_items": 990, "n_users": 1990, "n_train": 16_000}},
            "stages": {"load": {"status": "ok", "kind": "measured", "seconds": 1.0, "peak_rss_gb": 0.5, "read_s": 0.9},
                       "knn": {"status": "skipped: needs 30.0 GB", "estimate_gb": 30.0}}}
    rows = scale.stage_rows(1000, plan, gen, pipe, scale.STAGES, "2026-01-01 00:00:00", "auto")
    assert [r["stage"] for r in rows] == list(scale.STAGES)
    by = {r["stage"]: r for r in rows}
    assert by["knn"]["status"] == "skipped: needs 30.0 GB"
    assert by["dgmrec_epoch"]["status"] == "skipped: needs knn"        # never reached: says why
    assert json.loads(by["load"]["details"]) == {"read_s": 0.9}
    assert by["load"]["n_items"] == 990 and by["load"]["reduce_dims"] == '{"image": 256}'
    assert by["load"]["execution"] == "auto" and by["load"]["run"] == "2026-01-01 00:00:00"
    scale.write_results(rows, {"sizes": [1000]}, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"scale.json", "scale.csv", "scale.png"}
    assert "execution" in (tmp_path / "scale.csv").read_text().splitlines()[0]
    scale.print_table(rows)
    out = capsys.readouterr().out
    assert "skipped: needs 30.0 GB" in out and "1,000 items" in out and "2.0 [2] s / 0.20 GB" in out


def test_stages_left_out_keep_their_earlier_rows(scale):
    plan = {"dims": {"image": 256, "text": 384}, "reduce_dims": {"image": 256}}
    ok = {"status": "ok", "kind": "measured", "seconds": 1.0, "peak_rss_gb": 0.5}
    old = scale.stage_rows(1000, plan, {"stages": {"generate": ok}},
                           {"stages": {s: ok for s in scale.STAGES[1:]}}, scale.STAGES, "old", "full")
    ran = scale.with_dependencies(["knn"])
    new = scale.stage_rows(1000, plan, {"stages": {"generate": {"status": "not run: data reused from x"}}},
                           {"stages": {"load": dict(ok, seconds=2.0), "knn": {"status": "failed: timeout"}}},
                           ran, "new", "blocks")
    assert {r["stage"]: r["status"] for r in new}["lightgcn_epoch"] == "not run"
    merged = scale.merge_rows(old, new)
    by = {r["stage"]: r for r in merged}
    assert len(merged) == len(scale.STAGES)
    assert by["generate"]["run"] == "old"                 # data reused: generation stays the earlier row
    assert by["load"]["run"] == "new" and by["load"]["seconds"] == 2.0
    assert by["knn"]["status"] == "failed: timeout"       # a stage that ran replaces the old row, even failed
    assert by["evaluate"]["run"] == "old"
    other = scale.stage_rows(2000, plan, {}, {}, ran, "new", "blocks")
    assert [r["n"] for r in scale.merge_rows(merged, other)][-1] == 2000
    narrow = scale.stage_rows(1000, {"dims": {"image": 256, "text": 128}, "reduce_dims": {"image": 256, "text": 128}},
                              {}, {}, ran, "new", "blocks")
    both = scale.merge_rows(merged, narrow)                # another text width: another variant
    assert len(both) == 2 * len(scale.STAGES) and scale.variants(both) == [(1000, (256, 384)), (1000, (256, 128))]
    # nothing to keep: the "not run" row itself is recorded
    assert scale.merge_rows([], new)[0]["status"] == "not run: data reused from x"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, scale):
    """A 300-item catalog generated by the script (``--stages generate``) into a kept work folder."""
    root = tmp_path_factory.mktemp("scale")
    work, out = root / "work", root / "out"
    assert scale.main(["--sizes", "300", "--stages", "generate", "--work", str(work), "--keep-data",
                       "--out", str(out)]) == 0
    return work, out


def test_dataset_complete(scale, tiny_data, tmp_path):
    work, out = tiny_data
    data = work / "scale300"
    assert scale.dataset_complete(data, 300, seed=0)
    assert not scale.dataset_complete(data, 300, seed=1)          # another configuration
    assert not scale.dataset_complete(data, 400, seed=0)
    assert not scale.dataset_complete(tmp_path / "missing", 300, seed=0)
    partial = tmp_path / "scale300"
    partial.mkdir()
    for f in data.iterdir():
        if f.name != "text_feat.npy":
            (partial / f.name).write_bytes(f.read_bytes())
    assert not scale.dataset_complete(partial, 300, seed=0)       # a file it names is missing
    gen = scale.reused_generate(data)["stages"]["generate"]
    assert gen["status"].startswith("not run: data reused") and gen["disk_gb"] > 0
    assert gen["counts"]["n_items"] <= 300


def test_reused_data_and_a_blocks_run(scale, tiny_data):
    work, out = tiny_data
    with open(out / "scale.json") as fh:
        first = json.load(fh)
    generated = {r["stage"]: r for r in first["rows"]}["generate"]
    assert generated["status"] == "ok" and {r["status"] for r in first["rows"][1:]} == {"not run"}
    assert scale.main(["--sizes", "300", "--work", str(work), "--reuse-data", "--out", str(out),
                       "--stages", "dgmrec_epoch", "--execution", "blocks", "--steps", "1",
                       "--full-epoch-budget", "0", "--threads", "1"]) == 0
    with open(out / "scale.json") as fh:
        doc = json.load(fh)
    by = {r["stage"]: r for r in doc["rows"]}
    assert by["generate"] == generated                             # kept from the earlier run
    assert doc["meta"]["reused_data"]["300"] == f"generate row from the run started {generated['run']}"
    assert doc["meta"]["execution"] == "blocks" and doc["meta"]["previous_runs"]
    epoch = by["dgmrec_epoch"]
    assert epoch["status"] == "ok" and epoch["mode"] == "blocks" and epoch["kind"] == "extrapolated"
    assert epoch["execution"] == "blocks" and epoch["peak_rss_gb"] > 0
    assert json.loads(epoch["details"])["steps_per_epoch"] >= 1
    assert by["lightgcn_epoch"]["status"] == "not run" and by["refine"]["status"] == "not run"
    assert (work / "scale300").is_dir()                            # reused data are kept
    # another width: generation does not depend on it, so the earlier generate row is copied to the new variant
    assert scale.main(["--sizes", "300", "--work", str(work), "--reuse-data", "--out", str(out),
                       "--stages", "generate", "--reduce", "always", "--reduce-dims", "image=128,text=128"]) == 0
    with open(out / "scale.json") as fh:
        doc = json.load(fh)
    narrow = [r for r in doc["rows"] if scale.widths(r) == (128, 128)]
    assert [r["status"] for r in narrow] == ["ok"] + ["not run"] * (len(scale.STAGES) - 1)
    assert narrow[0]["run"] == generated["run"] and narrow[0]["seconds"] == generated["seconds"]
    assert narrow[0]["reduce_dims"] == '{"image": 128, "text": 128}'


def test_a_sampled_run_measures_whole_epochs_whatever_the_budget(scale, tiny_data):
    work, out = tiny_data
    assert scale.main(["--sizes", "300", "--work", str(work), "--reuse-data", "--out", str(out),
                       "--stages", "lightgcn_epoch,dgmrec_epoch", "--execution", "sampled", "--steps", "1",
                       "--full-epoch-budget", "0", "--threads", "1"]) == 0
    with open(out / "scale.json") as fh:
        doc = json.load(fh)
    # this run's rows: full width (an earlier test added a 128/128 variant, possibly within the same second)
    by = {r["stage"]: r for r in doc["rows"] if scale.widths(r) == (4096, 384)}
    for stage in ("lightgcn_epoch", "dgmrec_epoch"):
        row = by[stage]
        details = json.loads(row["details"])
        assert row["status"] == "ok" and row["mode"] == "sampled" and row["kind"] == "measured", stage
        assert details["steps"] == details["steps_per_epoch"] >= 1            # every step of the epoch ran
        assert details["steps_per_s"] > 0 and 0 < details["compute_share"] <= 1
        assert details["sampler_busy_s"] > 0
        # historical embeddings by default: refreshed once at the epoch start (fewer steps than 500)
        assert details["history_every"] == 500 and details["history_refreshes"] == 1
        assert details["history_refresh_s"] > 0


def test_epoch_steps_stops_a_sampled_epoch_and_labels_it_partial_then_lightgcn_is_evaluated(scale, tiny_data):
    work, out = tiny_data
    assert scale.main(["--sizes", "300", "--work", str(work), "--reuse-data", "--out", str(out),
                       "--stages", "lightgcn_evaluate", "--execution", "sampled", "--epoch-steps", "2",
                       "--threads", "1"]) == 0
    with open(out / "scale.json") as fh:
        doc = json.load(fh)
    row = {r["stage"]: r for r in doc["rows"] if scale.widths(r) == (4096, 384)}["lightgcn_epoch"]
    details = json.loads(row["details"])
    assert details["steps_per_epoch"] > 2 and details["steps"] == 2
    assert row["status"] == "ok" and row["kind"] == "partial"           # never reported as an epoch
    assert doc["meta"]["epoch_steps"] == 2
    assert "(2 steps)" in scale.fmt_cell(row)
    evaluated = {r["stage"]: r for r in doc["rows"] if scale.widths(r) == (4096, 384)}["lightgcn_evaluate"]
    assert evaluated["status"] == "ok" and evaluated["kind"] == "measured"         # the whole test pass ran
    assert 0 <= json.loads(evaluated["details"])["recall_at_20"] <= 1


def test_profile_steps_splits_a_sampled_dgmrec_step_by_term(scale, tiny_data):
    work, out = tiny_data
    assert scale.main(["--sizes", "300", "--work", str(work), "--reuse-data", "--out", str(out),
                       "--stages", "dgmrec_epoch", "--execution", "sampled", "--epoch-steps", "1",
                       "--profile-steps", "2", "--threads", "1"]) == 0
    with open(out / "scale.json") as fh:
        doc = json.load(fh)
    row = {r["stage"]: r for r in doc["rows"] if scale.widths(r) == (4096, 384)}["dgmrec_epoch"]
    terms = json.loads(row["details"])["step_terms"]
    assert terms["steps"] == 2 and doc["meta"]["profile_steps"] == 2
    # the sampled step's representation terms are marked too, not only the loss's
    for name in ("id_propagation", "encoders", "preference", "modality_propagation", "user_features", "ui_align"):
        assert terms["forward"][name] > 0, name
    assert terms["phases"]["step"] >= terms["phases"]["forward"] > 0
    with pytest.raises(SystemExit):
        scale.main(["--sizes", "300", "--work", str(work), "--profile-steps", "-1"])


def test_from_run_adds_a_training_runs_epoch_over_two_sittings_and_its_test_pass(scale, tiny_data, tmp_path,
                                                                                 monkeypatch, capsys):
    """``configs/dgmrec/scale.yaml`` on the 300-item catalog, stopped inside its epoch after a checkpoint and
    resumed; ``--from-run`` turns its log into the ``dgmrec_epoch`` and ``evaluate`` rows."""
    import dgmrec_dgl.train as train_module
    from dgmrec_dgl.config import load_config

    work, _ = tiny_data
    config = load_config("configs/dgmrec/scale.yaml", {
        "data": {"dir": str(work / "scale300"), "reduce_dims": {"image": 64}},
        "train": {"threads": 1, "batch_size": 512, "checkpoint_steps": 2},
        "eval": {"user_sample": 50}, "model": {"history_every": 1}})
    assert config.train.epochs == 1 and load_config("configs/dgmrec/scale.yaml").data.reduce_dims == {"image": 256}
    run, step, calls = tmp_path / "run", train_module.training_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config, str(run), progress=False)
    monkeypatch.setattr(train_module, "training_step", step)
    train_module.train(config, str(run), resume=True, progress=False)

    out = tmp_path / "out"
    assert scale.main(["--from-run", str(run), "--out", str(out)]) == 0
    with open(out / "scale.json") as fh:
        rows = {r["stage"]: r for r in json.load(fh)["rows"]}
    epoch, test = rows["dgmrec_epoch"], rows["evaluate"]
    assert (epoch["n"], scale.widths(epoch), epoch["kind"], epoch["mode"]) == (300, (64, 384), "measured", "sampled")
    details = json.loads(epoch["details"])
    assert details["sittings"] == 2 and details["resumed_at_step"] == [2]
    assert details["steps"] == details["steps_per_epoch"] > 2 and details["history_refreshes"] == details["steps"]
    assert epoch["seconds"] == pytest.approx(details["before_epoch_s"] + details["train_s"] + details["checkpoint_s"])
    assert details["checkpoint_s"] > 0 and epoch["peak_rss_gb"] > 0
    assert test["kind"] == "measured" and json.loads(test["details"])["n_test_users"] > 50    # every test user
    assert scale.main(["--from-run", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.yaml" in err[0] and "fix:" in err[0]
