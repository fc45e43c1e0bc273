"""bench/dist_scale.py: the loopback counter, the per-process peak RSS of a launch's process tree, the
differenced bytes per step, bad arguments (no launch here; tests/test_dist_train.py runs dist-launch)."""

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


def test_bytes_per_step_are_differenced_between_the_two_launches(bench):
    rows = [{"side": "single", "steps": 10, "s_per_step": 1.0, "loopback_bytes": 0, "peak_rss_gb": {"process": 3.0}},
            {"side": "dist", "steps": 10, "s_per_step": 2.5, "loopback_bytes": 5_000, "peak_rss_gb": {}},
            {"side": "single", "steps": 50, "s_per_step": 0.8, "loopback_bytes": 0, "peak_rss_gb": {"process": 3.5}},
            {"side": "dist", "steps": 50, "s_per_step": 2.0, "loopback_bytes": 45_000,
             "peak_rss_gb": {"server 0": 1.0, "trainer 0": 2.0}}]
    s = bench.summarize(rows, 10, 50)
    assert s["loopback_bytes_per_step"] == 1_000                   # (45,000 - 5,000) / 40, start-up cancelled
    assert s["dist_over_single"] == 2.5 and s["single_peak_rss_gb"] == 3.5 and s["dist_total_rss_gb"] == 3.0


def test_bad_arguments(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path), "--mask", str(tmp_path / "m.npz"), "--parts-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partition_summary.json" in err[0]
    with pytest.raises(SystemExit):
        bench.main(["--data", str(tmp_path), "--mask", "m", "--parts-dir", str(tmp_path), "--steps", "50,20"])
