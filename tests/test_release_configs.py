"""The baselines' shipped configs carry the release's training settings (``ptkjw1997/DGMRec``,
``src/configs``: overall.yaml, then dataset/<name>.yaml, then model/<Model>.yaml, then the best/*.json
values). The expected values below are read off those files; a config edited away from them fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgmrec_dgl.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: overall.yaml: lr 1e-3, no decay, stopping_step 25, batch 2048, a validation every 3 epochs
AMAZON = {"train.lr": 1e-3, "train.lr_decay": 1.0, "train.patience": 25, "train.batch_size": 2048,
          "train.eval_every": 3}
#: dataset/tiktok.yaml overrides them for every model: batch 4096, a validation every epoch, stopping_step 20
TIKTOK = {**AMAZON, "train.patience": 20, "train.batch_size": 4096, "train.eval_every": 1}

EXPECTED = {
    ("lightgcn", "baby"): {**AMAZON, "model.n_layers": 3, "model.reg": 1e-4},
    ("lightgcn", "sports"): {**AMAZON, "model.n_layers": 3, "model.reg": 1e-4},
    ("lightgcn", "tiktok"): {**TIKTOK, "model.n_layers": 2, "model.reg": 0.0},
    ("mfbpr", "baby"): {**AMAZON, "model.reg": 0.1},
    ("mfbpr", "tiktok"): {**TIKTOK, "model.reg": 0.1},
    ("ci2mg", "baby"): {**AMAZON, "model.generated_for": "all", "model.shared_norm": True},
    ("ci2mg", "sports"): {**AMAZON, "train.lr": 1e-4},
    ("ci2mg", "clothing"): {**AMAZON, "train.lr": 1e-4},
    ("ci2mg", "tiktok"): {**TIKTOK, "model.generated_for": "all", "model.shared_norm": True},
}


@pytest.mark.parametrize("model,dataset", sorted(EXPECTED))
def test_config_has_the_release_values(model, dataset):
    config = load_config(str(CONFIGS / model / f"{dataset}.yaml"))
    for key, want in EXPECTED[model, dataset].items():
        section, name = key.split(".")
        assert getattr(getattr(config, section), name) == want, f"configs/{model}/{dataset}.yaml {key}"
