"""The config's value rules (dgmrec_dgl.config.RULES): complete, in step with the code, not too strict."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dgmrec_dgl.config import MODEL_CONFIGS, RULES, SEED_MAX, Config, load_config
from dgmrec_dgl.errors import DataError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.model.name == path.parent.name


def test_the_defaults_load():
    assert load_config() == Config()


def test_every_key_of_every_section_has_a_rule():
    sections = [("data", type(Config().data)), ("train", type(Config().train)), ("eval", type(Config().eval))]
    sections += [("model", cls) for cls in MODEL_CONFIGS.values()]
    for section, cls in sections:
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in RULES[section]]
        assert not missing, f"{cls.__name__}: add rules for {missing} to dgmrec_dgl.config.RULES[{section!r}]"


def test_enum_choices_are_the_ones_the_models_accept():
    from dgmrec_dgl.graphs.knn import _resolve_kind
    from dgmrec_dgl.models.ci2mg.generation import ACTIVATIONS
    from dgmrec_dgl.models.ci2mg.hypergraph import INCIDENCES
    from dgmrec_dgl.models.ci2mg.model import CONTRASTIVE, GENERATED_FOR, UI_NORMS
    from dgmrec_dgl.models.ci2mg.transport import SOLVERS

    model = RULES["model"]
    for key, choices in (("ui_norm", UI_NORMS), ("generated_for", GENERATED_FOR), ("contrastive", CONTRASTIVE),
                         ("ot_solver", SOLVERS), ("incidence", INCIDENCES), ("task_activation", ACTIVATIONS)):
        assert model[key].want == "one of: " + ", ".join(choices), key
    for index in ("auto", "exact", "ivf", "hnsw"):
        assert model["knn_index"].ok(index)
        _resolve_kind(index, 100, 20_000)          # raises for a kind graphs/knn.py does not know
    assert not model["knn_index"].ok("annoy")
    with pytest.raises(ValueError):
        _resolve_kind("annoy", 100, 20_000)


#: values at the edge of each range that the code handles (0 layers = the layer-0 embeddings, 0 CLUB steps,
#: 0 Sinkhorn iterations = zero potentials, 0 threads = torch's default, ...)
EDGE_VALUES = [
    (None, {"train": {"threads": 0, "lr_decay": 1, "epochs": 1, "batch_size": 1, "eval_every": 1, "patience": 1,
                      "seed": 0, "weight_decay": 0}}),
    (None, {"train": {"seed": SEED_MAX}, "data": {"mask_seed": SEED_MAX, "missing_ratio": 0}}),
    (None, {"data": {"missing_ratio": 1, "reduce_dims": 1, "reduce_sample": 1, "imputation": "nn", "inject": "nn",
                     "feature_dtype": "float16"}}),
    (None, {"eval": {"ks": [1], "select_metric": "ndcg@1", "budget_mb": 1}}),
    (None, {"model": {"n_ui_layers": 0, "n_mm_layers": 0, "club_steps": 0, "avg_lambda": 0, "perturb_eps": 0,
                      "refine_tolerance": 0, "knn_k": 1, "recon": 0, "blocks_min_items": 0, "sampled_min_items": 0, "refine_sources": "all",
                      "knn_index": "ivf", "execution": "blocks"}}),
    (None, {"model": {"avg_lambda": 1, "refine_tolerance": 0.99, "inter_modal_temp": 1e-6}}),
    # every release-vs-paper switch at its release value, and the paper's given explicitly
    (None, {"model": {"fidelity": "release", "knn_candidates": "all", "generation_input": "encoder",
                      "loss_items": "batch_items", "club_items": "all", "refine_count_from": 1, "perturb_over": "concat",
                      "linear_bias_init": "uniform", "ui_align_audio": "general", "refine_rows": "missing_alone",
                      "score_with_refined_graph": False}, "train": {"patience_rule": "exceed"}}),
    (None, {"model": {"fidelity": "paper", "knn_candidates": "present", "generation_input": "propagated",
                      "loss_items": "positives", "club_items": "positives", "refine_count_from": 0, "perturb_over": "parts",
                      "linear_bias_init": "zero", "ui_align_audio": "specific", "refine_rows": "missing",
                      "score_with_refined_graph": True}, "train": {"patience_rule": "reach"}}),
    ("lightgcn", {"model": {"n_layers": 0, "reg": 0}}),
    ("ci2mg", {"model": {"n_ui_layers": 0, "n_hyper_layers": 0, "ot_iterations": 0, "ot_block": 1, "ui_norm": "sym",
                         "incidence": "positive", "ot_solver": "log", "contrastive": "release",
                         "task_activation": "sigmoid", "generated_for": "all", "cl_weight": 0}}),
]


@pytest.mark.parametrize("model, overrides", EDGE_VALUES)
def test_values_at_the_edges_of_their_ranges_load(model, overrides):
    config = load_config(CONFIGS / (model or "dgmrec") / "base.yaml", overrides)
    for section, values in overrides.items():
        for key, value in values.items():
            got = getattr(getattr(config, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), (section, key)


def test_assignment_hooks_use_the_same_rules():
    from dgmrec_dgl.config import DGMRecConfig, LightGCNConfig, TrainConfig

    for build in (lambda: TrainConfig(precision="fp16"), lambda: DGMRecConfig(refine_tolerance=1.0),
                  lambda: LightGCNConfig(execution="minibatch"), lambda: DGMRecConfig(sampled_min_items=-1)):
        with pytest.raises(DataError, match=r"^config: (train|model)\.\w+: .* is not .*; fix: use "):
            build()
