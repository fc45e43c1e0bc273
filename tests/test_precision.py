"""``train.precision``: bf16 training steps under CPU autocast, fp32 (the default) unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgmrec_dgl.config import TrainConfig, load_config
from dgmrec_dgl.errors import DataError
from dgmrec_dgl.models import build_model
from dgmrec_dgl.train import _step_precision, load_dataset, train


def _config(tiny_dir, **train_keys):
    train_section = {"epochs": 3, "eval_every": 1, "batch_size": 8, "lr": 0.01, "patience": 10, **train_keys}
    return load_config("configs/dgmrec/base.yaml", {
        "data": {"dir": str(tiny_dir), "missing_ratio": 0.5},
        "train": train_section,
        "model": {"knn_k": 3, "refresh_every": 2}})


def _log(run_dir):
    with open(run_dir / "log.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_bf16_run_trains_with_finite_losses_and_fp32_parameters(tiny_dir, tmp_path):
    config = _config(tiny_dir, precision="bf16")
    result = train(config, str(tmp_path / "bf16"), progress=False)
    log = _log(tmp_path / "bf16")
    assert len(log) == 3 and "refined_rows" in log[2]["before_epoch"]
    for record in log:
        assert record["loss"] and all(math.isfinite(v) for v in record["loss"].values()), record["loss"]
    for split in ("valid", "test"):
        metrics = {k: v for k, v in result[split].items() if "@" in k}
        assert metrics and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in metrics.values()), metrics
    state = torch.load(tmp_path / "bf16" / "best.pt", weights_only=False)["model"]
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}, floats
    last = torch.load(tmp_path / "bf16" / "last.pt", weights_only=False)
    moments = [t for s in last["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
    assert moments and all(t.dtype == torch.float32 for t in moments)


def test_bf16_step_multiplies_in_bf16_and_propagates_in_fp32(tiny_dir):
    """Linear layers compute in bfloat16 under the step context; what reaches DGL and the losses is float32."""
    config = _config(tiny_dir)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    seen = []
    model.decoders["image"].decode.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    step = _step_precision(model, "bf16")
    users, pos, neg = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    with step():
        reps = model(g)
        loss, _ = model.loss(reps, users, pos, neg)
    assert seen == [torch.bfloat16]
    views = list(reps.modalities.values())
    for t in [reps.user_id, reps.item_id] + [getattr(v, f) for v in views for f in vars(v)]:
        assert t.dtype == torch.float32
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    out = model.generated_features(g, {"image": torch.tensor([0, 1])})   # outside the context: float32
    assert seen[1:] == [torch.float32] and out["image"].dtype == torch.float32


def test_bf16_changes_the_step_arithmetic(tiny_dir, tmp_path):
    """The switch is not a no-op: the first epoch's losses differ from fp32's (by bf16 rounding only)."""
    fp32 = train(_config(tiny_dir, epochs=1, eval_every=1), str(tmp_path / "a"), progress=False)
    bf16 = train(_config(tiny_dir, epochs=1, eval_every=1, precision="bf16"), str(tmp_path / "b"), progress=False)
    a, b = _log(tmp_path / "a")[0]["loss"], _log(tmp_path / "b")[0]["loss"]
    assert a.keys() == b.keys()
    assert a != b
    assert sum(b.values()) == pytest.approx(sum(a.values()), rel=0.05)
    assert fp32["epochs_run"] == bf16["epochs_run"] == 1


def test_fp32_default_is_unchanged(tiny_dir, tmp_path):
    assert TrainConfig().precision == "fp32"
    implicit = train(_config(tiny_dir), str(tmp_path / "implicit"), progress=False)
    explicit = train(_config(tiny_dir, precision="fp32"), str(tmp_path / "explicit"), progress=False)
    for split in ("valid", "test"):
        assert implicit[split] == explicit[split]
    assert [r["loss"] for r in _log(tmp_path / "implicit")] == [r["loss"] for r in _log(tmp_path / "explicit")]
    a = torch.load(tmp_path / "implicit" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "explicit" / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_rejects_unknown_precision(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  precision: fp16\n")
    with pytest.raises(DataError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.precision" in message and "'fp16'" in message
    assert "fp32" in message and "bf16" in message
    with pytest.raises(DataError):
        TrainConfig(precision="float16")


def test_bf16_refused_for_a_model_it_was_not_checked_on(tiny_dir, tmp_path):
    config = load_config(None, {"data": {"dir": str(tiny_dir)}, "train": {"precision": "bf16"},
                                "model": {"name": "ci2mg"}})
    with pytest.raises(DataError, match="train.precision.*ci2mg"):
        train(config, str(tmp_path / "ci2mg"), progress=False)
