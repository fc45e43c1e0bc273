"""``train.keep_freed_memory``: glibc keeps freed memory for reuse; the metrics do not change."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dgmrec_dgl.config import load_config

# Each run in its own process: the allocator setting is process-wide and cannot be undone.
RUN = """
import json, sys
from dgmrec_dgl.config import load_config
from dgmrec_dgl.train import train
config = load_config("configs/dgmrec/base.yaml", json.loads(sys.argv[1]))
print(json.dumps(train(config, sys.argv[2], progress=False)["test"]))
"""


def _test_metrics(tiny_dir, out_dir, keep: bool) -> dict:
    overrides = {"data": {"dir": str(tiny_dir), "missing_ratio": 0.5},
                 "train": {"epochs": 3, "eval_every": 1, "batch_size": 8, "lr": 0.01, "threads": 1,
                           "keep_freed_memory": keep},
                 "model": {"knn_k": 3, "refresh_every": 2}}
    done = subprocess.run([sys.executable, "-c", RUN, json.dumps(overrides), str(out_dir)],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_same_metrics_with_and_without_kept_memory(tiny_dir, tmp_path):
    plain = _test_metrics(tiny_dir, tmp_path / "plain", keep=False)
    kept = _test_metrics(tiny_dir, tmp_path / "kept", keep=True)
    assert plain == kept and "recall@20" in plain


def test_config_field_defaults_off_and_is_typed(tiny_dir):
    assert load_config("configs/dgmrec/base.yaml").train.keep_freed_memory is False
    with pytest.raises(Exception, match="keep_freed_memory"):
        load_config("configs/dgmrec/base.yaml", {"train": {"keep_freed_memory": "yes please"}})
