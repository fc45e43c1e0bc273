"""Tests of bench/step_profile.py on the tiny ``toy`` preset (base config: every loss term on): the JSON has
every term, times are non-negative and the terms fit inside the measured phases, the instrumented step is
``training_step``'s, and missing TikTok data is one error line with exit code 2."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import bench_script


@pytest.fixture(scope="module")
def sp():
    return bench_script("step_profile")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("step_profile_data")


def test_main_profiles_every_term(sp, work, tmp_path):
    out = tmp_path / "out"
    assert sp.main(["--datasets", "toy", "--threads", "1", "--steps", "2", "--warmup", "1",
                    "--work", str(work), "--out", str(out)]) == 0
    report = json.loads((out / "step_profile.json").read_text())
    assert (out / "step_profile.png").stat().st_size > 0
    assert report["meta"]["terms"] == list(sp.TERMS)
    (run,) = report["runs"]
    assert run["dataset"] == "toy" and run["threads"] == 1 and run["torch_threads"] == 1
    assert len(run["per_step"]) == 2
    for record in [run, *run["per_step"]]:
        fwd, bwd = record["forward"], record["backward"]
        assert set(fwd) == set(bwd) == {*sp.TERMS, "other"}
        # the base config turns every term on: a term whose range went missing would read 0
        assert all(fwd[t] > 0 for t in sp.TERMS), fwd
        assert all(v >= 0 for v in (*fwd.values(), *bwd.values())), (fwd, bwd)
        # terms with trainable inputs have backward nodes attributed to them
        assert all(bwd[t] > 0 for t in ("id_propagation", "encoders", "preference", "ui_align", "bm_align",
                                         "inter_modal", "club", "gen")), bwd
    for record in run["per_step"]:
        phases = record["phases"]
        # the terms are disjoint ranges inside step.forward, the backward nodes inside step.backward
        assert sum(record["forward"][t] for t in sp.TERMS) <= phases["forward"] + 1e-4
        assert sum(record["backward"][t] for t in sp.TERMS) <= phases["backward"] + 1e-4
        assert phases["step"] == pytest.approx(sum(phases[p] for p in sp.PHASES))
    assert run["plain"]["step"] > 0 and set(run["plain"]) == {*sp.PHASES, "step"}
    # GEMM FLOPs land in the terms that multiply dense matrices, none in those that do not
    flops = run["gemm_flops"]
    assert all(flops[t] > 0 for t in ("encoders", "ui_align", "bm_align", "inter_modal", "club", "gen")), flops
    assert flops["bpr"] == flops["reg"] == flops["host_sync"] == 0, flops
    # an InfoNCE term's backward multiplies twice for its forward's once (logits w.r.t. both views)
    backward = run["gemm_flops_backward"]
    for t in ("ui_align", "bm_align", "inter_modal"):
        assert backward[t] == pytest.approx(2 * (flops[t] - backward[t]), rel=0.01), (t, flops[t], backward[t])
    rate = run["gemm_rate"]
    assert rate["best_flops_per_s"] == max(v for k, v in rate.items() if k != "best_flops_per_s") > 0
    assert run["gemm_floor"]["ui_align"] == pytest.approx(flops["ui_align"] / rate["best_flops_per_s"])


def test_step_is_training_step(sp, work):
    from dgmrec_dgl.train import epoch_batches, main_optimizer, training_step

    config, _, model, g, triples = sp.build("toy", work, 999)
    twin = copy.deepcopy(model)
    batch = next(epoch_batches(model, g, triples, config.train.batch_size, config.train.seed, 0))
    parts = sp.step(model, g, batch, main_optimizer(model, config), torch.Generator().manual_seed(5), {})
    expected = training_step(twin, g, batch, main_optimizer(twin, config), torch.Generator().manual_seed(5))
    assert parts == expected
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_missing_tiktok_data_exits_2(sp, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sp.sampled_quality, "SHARED_TIKTOK", tmp_path / "nowhere")
    assert sp.main(["--datasets", "tiktok", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiktok.inter: not found" in err[0]
    assert not (tmp_path / "out").exists()
