"""MF-BPR and LightGCN as Recommenders: the losses written out, and both trained by the one trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dgmrec_dgl.config import LightGCNConfig, MFBPRConfig, load_config
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.data.synthetic import generate, preset
from dgmrec_dgl.models import build_model
from dgmrec_dgl.models.lightgcn import lightgcn
from dgmrec_dgl.models.lightgcn_rec import LightGCNRecommender
from dgmrec_dgl.models.mf import MFBPR
from dgmrec_dgl.train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("baselines") / "toy"
    generate(out, preset("toy", n_users=200, n_items=150), progress=False)
    return out


def _batch():
    return torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])


def _manual_bpr(u, i, j):
    return -torch.log(torch.sigmoid((u * i).sum(1) - (u * j).sum(1))).mean()


def test_mfbpr_scores_and_loss(tiny_dir):
    ds = Dataset.load(tiny_dir)
    torch.manual_seed(0)
    model = MFBPR.from_dataset(ds, MFBPRConfig(embedding_dim=8, reg=0.01))
    reps = model(None)
    user, item = model.fused(reps)
    assert user.shape == (6, 8) and item.shape == (8, 8)
    users, pos, neg = _batch()
    total, parts = model.loss(reps, users, pos, neg)
    bpr = _manual_bpr(user[users], item[pos], item[neg])
    reg = 0.01 * (user[users].norm() + item[pos].norm() + item[neg].norm()) / 4
    assert parts["bpr"] == pytest.approx(bpr.item(), rel=1e-5)
    assert parts["reg"] == pytest.approx(reg.item(), rel=1e-5)
    total.backward()
    assert model.user_emb.grad[users].abs().sum() > 0 and model.user_emb.grad[4:].abs().sum() == 0


def test_lightgcn_recommender_propagates_and_regularises_layer0(tiny_dir):
    ds = Dataset.load(tiny_dir)
    torch.manual_seed(0)
    model = LightGCNRecommender.from_dataset(ds, LightGCNConfig(embedding_dim=8, n_layers=3, reg=0.01))
    g = model.make_graph(ds)
    reps = model(g)
    b = model.backbone
    want_u, want_i = lightgcn(g, b.user, b.item, 3)
    torch.testing.assert_close(reps[0], want_u)
    torch.testing.assert_close(reps[1], want_i)
    assert not torch.allclose(reps[1], b.item)               # propagation changed the embeddings
    users, pos, neg = _batch()
    total, parts = model.loss(reps, users, pos, neg)
    reg = 0.01 * (b.user[users].norm() + b.item[pos].norm() + b.item[neg].norm()) / 4
    assert parts["reg"] == pytest.approx(reg.item(), rel=1e-5)
    assert parts["bpr"] == pytest.approx(_manual_bpr(reps[0][users], reps[1][pos], reps[1][neg]).item(), rel=1e-5)
    total.backward()
    assert b.item.grad.abs().sum() > 0


def test_build_model_names(tiny_dir):
    ds = Dataset.load(tiny_dir)
    for name, cls in (("mfbpr", MFBPR), ("lightgcn", LightGCNRecommender)):
        assert isinstance(build_model(load_config(None, {"model": {"name": name}}), ds), cls)


@pytest.mark.parametrize("name", ["mfbpr", "lightgcn"])
def test_baseline_trains_with_the_generic_trainer(toy_dir, tmp_path, name):
    config = load_config(CONFIGS / name / "base.yaml", {
        "data": {"dir": str(toy_dir), "missing_ratio": 2 / 3},
        "train": {"epochs": 6, "eval_every": 3, "batch_size": 512, "threads": 1}})
    result = train(config, str(tmp_path / name), progress=False)
    assert result["epochs_run"] == 6 and "test" in result
    log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"]["bpr"] < log[0]["loss"]["bpr"]    # it learns
    assert result["test"]["recall@20"] > 0.0
