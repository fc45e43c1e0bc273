"""bench/dist_scale.py: the loopback counter, the per-process peak RSS of a launch's process tree, the
differenced bytes per step, a whole epoch's summary, the runs' configs, bad arguments (no launch here; tests/test_dist_train.py runs dist-launch)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from conftest import bench_script

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/net/dev, /proc/<pid>/environ")


@pytest.fixture(scope="module")
def bench():
    return bench_script("dist_scale")


def test_loopback_counter_grows_by_what_crosses_loopback(bench):
    payload = b"x" * (4 << 20)
    server = socket.create_server(("127.0.0.1", 0))
    got = []

    def drain():
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                got.append(len(chunk))

    reader = threading.Thread(target=drain)
    reader.start()
    before = bench.loopback_tx_bytes()
    with socket.create_connection(server.getsockname()) as client:
        client.sendall(payload)
    reader.join()
    server.close()
    assert sum(got) == len(payload)
    assert bench.loopback_tx_bytes() - before >= len(payload)


def test_tree_rss_labels_servers_and_trainers_by_their_environment(bench):
    code = ("import os, subprocess, sys, time\n"
            "kids = [subprocess.Popen([sys.executable, '-c', 'import time; x = bytearray(30 << 20); time.sleep(3)',"
            " 'train', *extra], env=dict(os.environ, **env)) for env, extra in ("
            "({'DGL_ROLE': 'server', 'DGL_SERVER_ID': '1'}, ['--dist-config']),"
            "({'DGL_ROLE': 'client', 'RANK': '0'}, ['--dist-config']),"
            "({}, []))]\n"
            "[k.wait() for k in kids]\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    monitor = bench.TreeRss(proc.pid, interval=0.05)
    monitor.start()
    proc.wait()
    peaks = monitor.stop()
    assert set(peaks) == {"server 1", "trainer 0", "process"}      # the parent has no 'train' argument
    assert all(v > 30 / 1024 for v in peaks.values())               # each held a 30 MB buffer


def row(side: str, steps: int, s_per_step: float, loopback: int, peaks: dict, whole: bool = False) -> dict:
    return {"side": side, "steps": steps, "whole_epoch": whole, "train_s": steps * s_per_step, "s_per_step": s_per_step,
            "loopback_bytes": loopback, "peak_rss_gb": peaks}


def test_bytes_per_step_are_differenced_between_the_two_launches(bench):
    rows = [row("single", 10, 1.0, 0, {"process": 3.0}), row("dist", 10, 2.5, 5_000, {}),
            row("single", 50, 0.8, 0, {"process": 3.5}), row("dist", 50, 2.0, 45_000, {"server 0": 1.0, "trainer 0": 2.0})]
    s = bench.summarize(rows)
    assert s["loopback_bytes_per_step"] == 1_000                   # (45,000 - 5,000) / 40, start-up cancelled
    assert s["dist_over_single"] == 2.5 and s["single_peak_rss_gb"] == 3.5 and s["dist_total_rss_gb"] == 3.0
    assert s["steps"] == 50 and s["dist_train_s"] == 100.0 and not s["whole_epoch"]


def test_a_whole_epoch_run_is_summarised_by_its_own_step_count(bench):
    """``--steps 20,all``: the epoch's step count comes from the runs' logs, not from the arguments."""
    rows = [row("single", 20, 0.1, 0, {"process": 3.0}), row("dist", 20, 0.5, 2_000, {"trainer 0": 2.0}),
            row("single", 3019, 0.1, 0, {"process": 3.0}, True),
            row("dist", 3019, 0.4, 2_000 + 2999 * 100, {"trainer 0": 2.5}, True)]
    s = bench.summarize(rows)
    assert s["whole_epoch"] and s["steps"] == 3019
    assert s["loopback_bytes_per_step"] == 100
    assert s["dist_train_s"] == pytest.approx(3019 * 0.4) and s["single_train_s"] == pytest.approx(301.9)


def bench_args(**changes):
    import argparse

    return argparse.Namespace(**{"model": "lightgcn", "fanouts": [10, 10, 10], "history_every": 0, "seed": 1,
                                 **changes})


def test_the_config_asks_for_the_histories_and_caps_the_steps_only_when_told(bench, tmp_path):
    from dgmrec_dgl.config import load_config

    args = bench_args(history_every=500)
    capped, whole = load_config(bench.write_config(tmp_path, args, 20)), load_config(bench.write_config(tmp_path, args, None))
    assert capped.train.epoch_steps == 20 and not whole.train.epoch_steps
    assert capped.model.history_every == whole.model.history_every == 500
    assert capped.model.execution == "sampled" and capped.train.epochs == 1


def test_bad_arguments(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path), "--mask", str(tmp_path / "m.npz"), "--parts-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partition_summary.json" in err[0]
    with pytest.raises(SystemExit):
        bench.main(["--data", str(tmp_path), "--mask", "m", "--parts-dir", str(tmp_path), "--steps", "50,20"])
    for bad in (["--steps", "all,20"], ["--steps", "20,ten"], ["--history-every", "-1"]):
        with pytest.raises(SystemExit):
            bench.main(["--data", str(tmp_path), "--mask", "m", "--parts-dir", str(tmp_path), *bad])
