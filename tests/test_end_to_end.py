"""End to end: DGMRec on synthetic data with informative features and 2/3 of the items missing a modality.

The toy preset draws each user's items mostly by latent affinity (shared and modality-specific latents),
so features carry signal a model can use. With the same budget (15 epochs, same lr, batch, sampler and
evaluator), DGMRec must beat a popularity ranker and MF-BPR by at least 20% in test Recall@20. The margin is
generous on purpose: at this budget the measured gap is about 50% (DGMRec 0.22, MF-BPR 0.13, popularity
0.14 on seed 5), so the test fails only when DGMRec stops using what it should, not on noise.
"""

import numpy as np
import pytest
import torch

from dgmrec_dgl.config import load_config
from dgmrec_dgl.data import synthetic
from dgmrec_dgl.data.dataset import Dataset
from dgmrec_dgl.evaluate import evaluate
from dgmrec_dgl.train import train


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "toy"
    synthetic.generate(out, synthetic.preset("toy", seed=5), progress=False)
    return out


def run(model: str, data, out) -> float:
    overrides = {"data": {"dir": str(data), "missing_ratio": 2 / 3},
                 "train": {"epochs": 15, "eval_every": 3, "lr": 0.01, "batch_size": 1024, "patience": 100},
                 "model": {"name": model}}
    config = load_config("configs/dgmrec/base.yaml" if model == "dgmrec" else None, overrides)
    return train(config, str(out), progress=False)["test"]["recall@20"]


def test_dgmrec_beats_popularity_and_mf_bpr(toy, tmp_path):
    ds = Dataset.load(toy)
    counts = torch.from_numpy(np.bincount(ds.train[:, 1], minlength=ds.n_items).astype(np.float32))
    popularity = evaluate(lambda users: counts.expand(len(users), -1).clone(), ds, "test")["recall@20"]
    dgmrec = run("dgmrec", toy, tmp_path / "dgmrec")
    mf = run("mfbpr", toy, tmp_path / "mf")
    assert dgmrec > 1.2 * popularity, (dgmrec, popularity)
    assert dgmrec > 1.2 * mf, (dgmrec, mf)
