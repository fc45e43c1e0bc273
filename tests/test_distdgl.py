"""DistDGL's server mode past the GraphBolt stand-in: a real DistGraphServer and a DistGraph client on loopback.

The server and the client are subprocesses (a DGL server never returns, and a client registers exit hooks
and a listening socket), each in its own session so that a deadline can end it and everything it started.
Whatever happens, every process ends; afterwards nothing listens on the ports they used and they leave
nothing in /dev/shm. About 10 s, most of it two interpreters importing torch and DGL and the server's fixed
3 s wait for the clients' receivers.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dgmrec_dgl import distributed
from dgmrec_dgl._dgl import graphbolt_available
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.masks import MissingMask
from dgmrec_dgl.graphs.hetero import knn_etype
from dgmrec_dgl.graphs.knn import modality_knn_graphs
from dgmrec_dgl.graphs.partition import ID_MAP, partition_dataset

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp and /dev/shm")

ROOT = Path(__file__).resolve().parents[1]
DEADLINE = 120.0          # seconds for the whole exchange; it takes ~10 s
KNN_K = 4
ITEMS = [0, 3, 7, 11, 19]  # the items the client reads and samples around

SERVER = """
import sys
import dgmrec_dgl._dgl  # noqa: F401  (registers the GraphBolt stand-in, then imports DGL)
from dgmrec_dgl._dgl import dgl
dgl.distributed.initialize(sys.argv[1])   # DGL_ROLE=server: serves the partition, returns at shutdown
"""

CLIENT = """
import json, sys
import dgmrec_dgl._dgl  # noqa: F401
import torch
from dgmrec_dgl._dgl import dgl
ip_config, name, items = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
dgl.distributed.initialize(ip_config)
g = dgl.distributed.DistGraph(name)
out = {"ntypes": g.ntypes, "etypes": [list(e) for e in g.canonical_etypes],
       "num_nodes": {nt: g.num_nodes(nt) for nt in g.ntypes}, "fields": sorted(g.nodes["item"].data.keys()),
       "feat_image": g.nodes["item"].data["feat_image"][items].tolist(),
       "present_image": g.nodes["item"].data["present_image"][items].tolist()}
fanouts = {e: (-1 if e[1] == "knn_image" else 0) for e in g.canonical_etypes}
frontier = dgl.distributed.sample_etype_neighbors(g, {"item": items}, fanouts)
etype = ("item", "knn_image", "item")
src, dst = frontier.edges(etype=etype)
out["knn_image"] = [src.tolist(), dst.tolist(), g.edges[etype].data["w"][frontier.edges[etype].data[dgl.EID]].tolist()]
print("RESULT " + json.dumps(out), flush=True)
dgl.distributed.exit_client()   # client 0 shuts the server down
"""


def listening_ports() -> set[int]:
    """TCP ports in the LISTEN state on this machine (IPv4 and IPv6)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A":
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def start(code: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def end(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s session (it and anything it started) if it is still running, and reap it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(condition, until: float, procs) -> str | None:
    """None once ``condition()`` holds; else why not: the deadline passed, or a process failed."""
    while not condition():
        if time.monotonic() > until:
            return "the deadline passed"
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                return f"a process ended with status {proc.returncode}"
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def served(sparse_dir, tmp_path_factory):
    """One partition of the masked sparse set: (dataset, kNN graphs, partition folder, summary)."""
    root = tmp_path_factory.mktemp("distdgl")
    raw = Dataset.load(sparse_dir)
    ds = raw.with_mask(MissingMask.generate(raw.n_items, raw.modalities, 0.5, seed=3))
    name = f"dgmrec_test_{os.getpid()}"       # DGL names its shared memory after the graph
    summary = partition_dataset(ds, root / "parts", 1, knn_k=KNN_K, name=name)
    knn = modality_knn_graphs({m: ds.features[m] for m in ds.modalities}, ds.present, KNN_K)
    return ds, knn, root, summary


def test_a_distgraph_server_serves_a_client_and_everything_ends(served):
    ds, knn, root, summary = served
    port = distributed.free_port()
    ip_config = root / "ip_config.txt"
    ip_config.write_text(f"127.0.0.1 {port}\n")
    shm_before = set(os.listdir("/dev/shm"))
    until = time.monotonic() + DEADLINE
    server = start(SERVER, [str(ip_config)], {
        "DGL_ROLE": "server", "DGL_SERVER_ID": "0", "DGL_NUM_SERVER": "1", "DGL_NUM_CLIENT": "1",
        "DGL_IP_CONFIG": str(ip_config), "DGL_CONF_PATH": str(root / "parts" / summary["part_config"]),
        "DGL_GRAPH_FORMAT": "csc", "DGL_DIST_MODE": "distributed"}, root / "server.log")
    procs = [server]
    try:
        failed = wait_for(lambda: port in listening_ports(), until, procs)
        if failed is None:
            procs.append(start(CLIENT, [str(ip_config), summary["graph_name"], json.dumps(ITEMS)], {
                "DGL_ROLE": "client", "DGL_DIST_MODE": "distributed", "DGL_NUM_SERVER": "1",
                "DGL_NUM_SAMPLER": "0", "DGL_DIST_MAX_TRY_TIMES": "10"}, root / "client.log"))
            failed = wait_for(lambda: all(p.poll() is not None for p in procs), until, procs)
    finally:
        for proc in procs:
            end(proc)
    logs = {p.stem: p.read_text() for p in sorted(root.glob("*.log"))}
    assert failed is None and [p.returncode for p in procs] == [0, 0], (failed, {k: v[-3000:] for k, v in logs.items()})
    client_port = int(re.search(r"Client \[\d+\] waits on 127\.0\.0\.1:(\d+)", logs["client"]).group(1))
    assert not {port, client_port} & listening_ports()
    assert set(os.listdir("/dev/shm")) <= shm_before

    got = json.loads(next(line for line in logs["client"].splitlines() if line.startswith("RESULT "))[7:])
    assert got["ntypes"] == ["item", "user"]
    assert sorted(map(tuple, got["etypes"])) == sorted([("item", "interacted_by", "user"), knn_etype("image"),
                                                        knn_etype("text"), ("user", "interacts", "item")])
    assert got["num_nodes"] == {"item": ds.n_items, "user": ds.n_users}
    assert got["fields"] == ["feat_image", "feat_text", "norm", "present_image", "present_text"]
    ids = np.load(root / "parts" / ID_MAP)["item"]       # one part: DGL keeps the ids
    np.testing.assert_array_equal(ids, np.arange(ds.n_items))
    np.testing.assert_array_equal(np.array(got["feat_image"], np.float32), ds.features["image"][ITEMS])
    assert got["present_image"] == ds.present["image"][ITEMS].astype(int).tolist()
    assert 0 in got["present_image"] and 1 in got["present_image"]
    # fanout -1: every in-edge of the kNN relation, i.e. the items' whole kNN rows with their weights
    src, dst, w = got["knn_image"]
    rows = knn["image"]
    want = {(int(j), i, float(x)) for i in ITEMS for j, x in zip(
        rows.indices[rows.indptr[i]:rows.indptr[i + 1]], rows.weights[rows.indptr[i]:rows.indptr[i + 1]])}
    assert {(s, d, float(np.float32(x))) for s, d, x in zip(src, dst, w)} == want


def test_the_standin_types_are_classes_nothing_is_an_instance_of():
    if graphbolt_available():
        pytest.skip("the real GraphBolt is installed")
    gb = sys.modules["dgl.graphbolt"]
    cls = gb.FusedCSCSamplingGraph
    assert isinstance(cls, type) and not isinstance(object(), cls)
    with pytest.raises(ImportError, match="graphbolt"):
        cls()
    with pytest.raises(ImportError, match="graphbolt"):
        gb.load_from_shared_memory  # noqa: B018  (everything else still refuses)
