"""Data-parallel training (dgmrec_dgl.distributed): sharded gradients in-process, 2-rank gloo runs on loopback.

Starting a group of two processes costs about 10 s here (each imports torch, DGL and Numba), so every
2-rank training runs inside two launches: the CLI one (LightGCN) and the module fixture ``dgmrec_runs``.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_dir

from dgmrec_dgl import distributed
from dgmrec_dgl.cli import main
from dgmrec_dgl.config import load_config
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.models import build_model
from dgmrec_dgl.train import MEASUREMENTS, load_dataset, train
from kernels.sampling import bpr_triples

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = {"epochs": 4, "eval_every": 2, "batch_size": 10, "lr": 0.01}   # 24 train rows: batches 10, 10, 4
# DGMRec with only the loss terms that are a mean over the batch rows (BPR) or independent of the batch
# (reconstruction, noise-free): the sharded objective is then exactly the single-process one.
ROW_MEAN_DGMREC = {"intra_modal": 0.0, "align_bm": 0.0, "inter_modal": 0.0, "reg_id": 0.0, "reg": 0.0,
                   "sampler": 0.0, "additive": 0.0, "perturb_eps": 0.0}

# Tolerances. Where the sharded objective equals the full-batch one, a 2-rank run differs from a single
# process only by floating-point summation order: a batch mean of n terms becomes two shard means weighted
# and summed, then all-reduced. That changes gradients in the last bits (~1e-7 relative); Adam over 12
# steps carries it to ~1e-6 in the parameters (measured 7e-8 for LightGCN, 1.2e-6 for DGMRec).
PARAM_ATOL = 1e-5
# Ranking metrics only change if such a perturbation swaps two items' order, which needs scores tied to
# ~1e-6; on this dataset none are, so the metrics agree to rounding.
METRIC_ATOL = 1e-9


def tiny_config(data: Path, name: str, **model):
    data_cfg = {"dir": str(data)}
    if name == "dgmrec":
        data_cfg["missing_ratio"] = 0.5
        model = {"knn_k": 3, "refresh_every": 2, **model}    # 8 items; a refinement in epoch 2
    return load_config(CONFIGS / name / "base.yaml", {"data": data_cfg, "train": TRAIN, "model": model})


def last_params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=False)["model"]


def assert_params_close(a: Path, b: Path, atol: float):
    pa, pb = last_params(a), last_params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=k)


def assert_metrics_close(a: dict, b: dict, atol: float):
    for split in ("valid", "test"):
        assert a[split].keys() == b[split].keys()
        for k in a[split]:
            assert a[split][k] == pytest.approx(b[split][k], abs=atol), (split, k)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "log.jsonl")]


# ---------------------------------------------------------------------- in-process: sharding arithmetic
@pytest.mark.parametrize("n, world", [(24, 2), (5, 2), (1, 2), (10, 3), (2, 4)])
def test_shards_are_contiguous_and_even(n, world):
    bounds = [distributed.shard_bounds(n, r, world) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sum(distributed.shard_weight(s, n, world) for s in sizes) == pytest.approx(world)


@pytest.mark.parametrize("name", ["lightgcn", "mfbpr", "dgmrec"])
@pytest.mark.parametrize("batch", [24, 5, 1])   # even shards, a last uneven batch, an empty shard
def test_averaged_shard_gradients_equal_the_full_batch_gradient(tiny_dir, name, batch):
    """(c): a fake world of two in one process; the averaging goes through pack/unpack_gradients."""
    model_cfg = ROW_MEAN_DGMREC if name == "dgmrec" else {"reg": 0.0}   # EmbLoss is not a row mean
    config = tiny_config(tiny_dir, name, **model_cfg)
    torch.manual_seed(0)
    ds = load_dataset(config)
    model = build_model(config, ds)
    g = model.make_graph(ds)
    csr = ds.train_matrix()
    users, pos, neg = (torch.from_numpy(a)[:batch] for a in bpr_triples(csr.indptr, csr.indices, ds.n_items, 7))
    params = [p for p in model.main_parameters() if p.requires_grad]

    model.zero_grad(set_to_none=True)
    model.loss(model(g), users, pos, neg)[0].backward()
    full = [None if p.grad is None else p.grad.clone() for p in params]

    packed = []
    for rank in range(2):
        model.zero_grad(set_to_none=True)
        lo, hi = distributed.shard_bounds(batch, rank, 2)
        if hi > lo:
            loss = model.loss(model(g), users[lo:hi], pos[lo:hi], neg[lo:hi])[0]
            (loss * distributed.shard_weight(hi - lo, batch, 2)).backward()
        packed.append(distributed.pack_gradients(params, bucket_bytes=1024))   # one bucket per tensor here
    assert len(packed[0]) > 2
    distributed.unpack_gradients(params, [a + b for a, b in zip(*packed)], 2, bucket_bytes=1024)

    assert any(f is not None for f in full)
    for p, f in zip(params, full):
        if f is None:
            assert p.grad is None
        else:
            # summation order only: a mean of n terms vs. two weighted shard means
            torch.testing.assert_close(p.grad, f, rtol=1e-5, atol=1e-7)


def test_fingerprint_sees_one_changed_element(tiny_dir):
    config = tiny_config(tiny_dir, "lightgcn")
    model = build_model(config, load_dataset(config))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = distributed.fingerprint(state, {"knn": (np.arange(3), np.ones(3, np.float32))})
    assert before == distributed.fingerprint(model.state_dict(), {"knn": (np.arange(3), np.ones(3, np.float32))})
    state["backbone.item"][3, 5] = torch.nextafter(state["backbone.item"][3, 5], torch.tensor(1.0))
    assert before != distributed.fingerprint(state, {"knn": (np.arange(3), np.ones(3, np.float32))})


# ---------------------------------------------------------------------- two ranks on loopback
def _guard_writes_off_rank_0():
    """On ranks other than 0, any write the trainer attempts raises (rank 0 alone writes the run folder)."""
    import dgmrec_dgl.train as trainer

    def refuse(*_a, **_k):
        raise AssertionError(f"rank {torch.distributed.get_rank()} tried to write")

    def read_only_open(path, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            refuse()
        return open(path, mode, *args, **kwargs)

    class NoWriteOs:
        makedirs = unlink = remove = rename = replace = staticmethod(refuse)

        def __getattr__(self, name):
            return getattr(os, name)

    for name in ("_save", "atomic_write_json", "save_config", "_truncate_log"):
        setattr(trainer, name, refuse)
    trainer.open = read_only_open
    trainer.os = NoWriteOs()


def _dgmrec_scenarios(data: str, root: str) -> None:
    """Runs in each of the two ranks: DGMRec with row-mean losses, full DGMRec, and a killed + resumed run."""
    if torch.distributed.get_rank() != 0:
        _guard_writes_off_rank_0()
    data, root = Path(data), Path(root)
    train(tiny_config(data, "dgmrec", **ROW_MEAN_DGMREC), str(root / "row_mean"), progress=False)
    full = tiny_config(data, "dgmrec")
    train(full, str(root / "full"), progress=False)
    train(full, str(root / "part"), progress=False, max_epochs=2)
    train(full, str(root / "part"), progress=False, resume=True)
    full.data.new_items = True            # item 5 is new and lacks its image: generated before each validation
    train(full, str(root / "new_items"), progress=False)


@pytest.fixture(scope="module")
def dgmrec_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    data = make_tiny_dir(root / "tiny")
    distributed.launch(_dgmrec_scenarios, 2, str(data), str(root / "ranks2"))
    return data, root


def test_lightgcn_two_processes_from_the_cli_match_one_process(tmp_path, capsys):
    """(a) for LightGCN (reg 0, see the gradient test), started as `dgmrec-dgl train --nproc 2`."""
    data = make_tiny_dir(tmp_path / "tiny")
    config_file = tmp_path / "lightgcn.yaml"
    config_file.write_text(f"extends: {CONFIGS / 'lightgcn' / 'base.yaml'}\n"
                           f"train: {json.dumps(TRAIN)}\nmodel: {{reg: 0.0}}\n")
    args = ["train", "--config", str(config_file), "--data", str(data), "--quiet"]
    assert main(args + ["--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    assert "best epoch" in capsys.readouterr().out
    single = train(load_config(config_file, {"data": {"dir": str(data)}}), str(tmp_path / "one"), progress=False)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert_metrics_close(two, single, METRIC_ATOL)
    assert_params_close(tmp_path / "two", tmp_path / "one", PARAM_ATOL)
    cli_extras = {"curves.png", "data_fingerprint.json", "train.lock"}   # written by the command, not by train()
    assert sorted(set(os.listdir(tmp_path / "two")) - cli_extras) == sorted(os.listdir(tmp_path / "one"))
    assert cli_extras <= set(os.listdir(tmp_path / "two"))


def test_dgmrec_with_row_mean_losses_two_processes_match_one_process(dgmrec_runs, tmp_path):
    """(a) for DGMRec: CLUB off (not a row mean), but generation and kNN refinement run on both ranks."""
    data, root = dgmrec_runs
    single = train(tiny_config(data, "dgmrec", **ROW_MEAN_DGMREC), str(tmp_path / "one"), progress=False)
    two = json.loads((root / "ranks2" / "row_mean" / "metrics.json").read_text())
    assert_metrics_close(two, single, METRIC_ATOL)
    assert_params_close(root / "ranks2" / "row_mean", tmp_path / "one", PARAM_ATOL)
    assert "refined_rows" in log(root / "ranks2" / "row_mean")[2]["before_epoch"]


def test_full_dgmrec_two_processes_keep_identical_replicas(dgmrec_runs, tmp_path):
    """(b): every epoch (CLUB steps, generation, refinement, sharded steps) ends with equal fingerprints."""
    data, root = dgmrec_runs
    lines = log(root / "ranks2" / "full")
    assert len(lines) == TRAIN["epochs"] and "club_nll" in lines[0]["before_epoch"]
    for line in lines:
        assert len(line["replicas"]) == 2 and line["replicas"][0] == line["replicas"][1]
    assert len({line["replicas"][0] for line in lines}) == len(lines)       # the parameters did move
    # Full DGMRec is not a row mean (in-batch InfoNCE over the shard, EmbLoss norms, CLUB permutations,
    # per-rank noise), so two ranks optimise a slightly different objective: no float-level match, only a
    # sanity bound on the 4-candidate rankings of this dataset.
    single = train(tiny_config(data, "dgmrec"), str(tmp_path / "one"), progress=False)
    two = json.loads((root / "ranks2" / "full" / "metrics.json").read_text())
    assert_metrics_close(two, single, 0.25)


def test_new_items_generation_before_validation_keeps_identical_replicas(dgmrec_runs):
    """The release's new-items setting: every rank runs ``before_validation`` (it writes raw feature rows and
    refines the inference graphs), so the replicas stay identical."""
    _, root = dgmrec_runs
    lines = log(root / "ranks2" / "new_items")
    assert [line["before_validation"]["generated_new_rows"] for line in lines if "before_validation" in line] \
        == [{"image": 1, "text": 0}] * 2
    assert "refined_new_rows" in lines[1]["before_validation"]
    for line in lines:
        assert line["replicas"][0] == line["replicas"][1]


def test_resume_with_two_processes_gives_the_uninterrupted_result(dgmrec_runs):
    _, root = dgmrec_runs
    full, part = root / "ranks2" / "full", root / "ranks2" / "part"
    strip = lambda lines: [{k: v for k, v in line.items() if k not in MEASUREMENTS} for line in lines]
    assert strip(log(part)) == strip(log(full))
    assert json.loads((part / "metrics.json").read_text()) == json.loads((full / "metrics.json").read_text())
    assert_params_close(part, full, atol=0.0)


def test_cli_under_a_torchrun_environment(tmp_path, monkeypatch, capsys):
    """RANK / WORLD_SIZE in the environment: the CLI joins that group (a world of one here)."""
    data = make_tiny_dir(tmp_path / "tiny")
    args = ["train", "--config", str(CONFIGS / "mfbpr" / "base.yaml"), "--data", str(data), "--epochs", "3",
            "--out", str(tmp_path / "run"), "--quiet"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(args) == 0 and (tmp_path / "run" / "metrics.json").exists()
    assert main(args + ["--nproc", "2"]) == 2
    assert "--nproc" in capsys.readouterr().err


def _bad_input():
    raise DataError("data/x", "features", "is broken", "fix it")


def test_a_worker_reports_bad_input_to_the_launcher(tmp_path, monkeypatch):
    """A DataError in a rank is written for launch() to raise again (run here as a world of one)."""
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "")            # restored (unset) after the test
    with pytest.raises(DataError):
        distributed._worker(0, 1, "127.0.0.1", distributed.free_port(), _bad_input, (), {}, str(tmp_path))
    assert not torch.distributed.is_initialized()
    assert distributed._read(str(tmp_path / "0")) == ("data_error", ("data/x", "features", "is broken", "fix it"))


# A fresh interpreter: pytest's own process imported torch._dynamo long ago, so there the trigger is gone.
_GLOO_THREADS_AFTER_WORKER = """
import json, os, sys, tempfile
import torch
from dgmrec_dgl import distributed

def build_optimizer():
    torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])   # the first optimizer imports torch._dynamo

with tempfile.TemporaryDirectory() as box:
    distributed._worker(0, 1, "127.0.0.1", distributed.free_port(), build_optimizer, (), {}, box)
assert "torch._dynamo" in sys.modules
print(json.dumps(sorted({open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")})))
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from /proc")
def test_no_gloo_thread_outlives_a_worker():
    """A rank's gloo group is freed by ``destroy_process_group``, not at interpreter exit: importing
    ``torch._dynamo`` while the group exists (the first ``torch.optim`` optimizer does) must not leave a
    module holding it (``torch.distributed.nn.functional`` binds ``group.WORLD`` as a default argument)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", _GLOO_THREADS_AFTER_WORKER], env=env, cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    threads = json.loads(out.stdout.strip().splitlines()[-1])
    assert not [t for t in threads if "gloo" in t or "tcpstore" in t], threads
