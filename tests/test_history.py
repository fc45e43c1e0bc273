"""Historical embeddings in sampled mode (``model.history_every``), against the full-graph step in float64.

Right after a refresh, with every neighbour drawn, a one-hop step that reads the rest from the histories must
give the full step's values for the batch; one read later, after the tables moved, it must not (the history
is stale until the next refresh, every ``history_every`` reads and at every epoch start).
"""

import pytest
import torch

from dgmrec_dgl.graphs.blocks import src_ids
from dgmrec_dgl.models.history import Histories, with_history

from test_sampled import LOSS_PARTS, batch, draw_every_neighbour, make, max_degree, step


def nudge(model, *tables):
    """Move ``tables`` as an optimiser step would (a refresh must notice, a stale history must not)."""
    with torch.no_grad():
        for name in tables:
            p = model.get_parameter(name)
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=p.dtype))


def test_lightgcn_one_hop_with_fresh_histories_equals_the_full_step_and_goes_stale_between_refreshes(sparse_dir):
    ds, model, g = make(sparse_dir, "lightgcn", history_every=2)
    model.config.fanouts = (max_degree(g),) * model.config.n_layers
    users, pos, neg = batch(ds)
    _, _, _, want, _ = step(model, g, "full", users, pos, neg)
    b, reps, _, got, grads = step(model, g, "sampled", users, pos, neg)
    assert len(b.drawn["blocks"]) == 1                      # one hop is drawn, not n_layers
    assert model.history.refreshes == 1
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    # the gradient reaches the seeds' drawn neighbours' layer-0 rows, and only the block's rows
    touched = grads["backbone.item"].abs().sum(1).nonzero().flatten()
    assert set(touched.tolist()) <= set(src_ids(b.drawn["blocks"][0], "item").tolist())
    assert len(touched) > len(torch.unique(torch.cat([pos, neg])))

    nudge(model, "backbone.user", "backbone.item")
    _, _, _, want, _ = step(model, g, "full", users, pos, neg)
    _, _, _, stale, _ = step(model, g, "sampled", users, pos, neg)     # second read: no refresh
    assert model.history.refreshes == 1
    assert stale["bpr"] != pytest.approx(want["bpr"], rel=1e-9)
    _, _, _, fresh, _ = step(model, g, "sampled", users, pos, neg)     # third read: refreshed
    assert model.history.refreshes == 2
    assert fresh["bpr"] == pytest.approx(want["bpr"], rel=1e-12)
    model.before_epoch(1, g)                                             # an epoch start refreshes too
    step(model, g, "sampled", users, pos, neg)
    assert model.history.refreshes == 3


@pytest.mark.parametrize("n_mm_layers", [1, 2])
def test_dgmrec_batch_with_fresh_histories_equals_the_full_step(sparse_dir, n_mm_layers):
    ds, model, g = make(sparse_dir, recon=0.0, history_every=2, n_mm_layers=n_mm_layers)
    draw_every_neighbour(model, g)
    users, pos, neg = batch(ds)
    _, full_reps, _, want, _ = step(model, g, "full", users, pos, neg)
    b, reps, (u, i, j), got, grads = step(model, g, "sampled", users, pos, neg)
    assert torch.equal(reps.item_ids, torch.unique(torch.cat([pos, neg])))   # only the batch's items are computed
    for part in LOSS_PARTS:
        assert got[part] == pytest.approx(want[part], rel=1e-10, abs=1e-14), part
    for m in ds.modalities:
        assert torch.allclose(reps.modalities[m].user_general, full_reps.modalities[m].user_general[reps.user_ids],
                              rtol=0, atol=1e-12)
        assert torch.allclose(reps.modalities[m].item_general, full_reps.modalities[m].item_general[reps.item_ids],
                              rtol=0, atol=1e-12)
    # raw features get gradients on the batch's items only (the neighbours come from the history)
    for m in ds.modalities:
        assert set(grads[f"raw.{m}"].abs().sum(1).nonzero().flatten().tolist()) <= set(reps.item_ids.tolist())

    nudge(model, *(f"raw.{m}" for m in ds.modalities), "user_emb")
    _, _, _, want, _ = step(model, g, "full", users, pos, neg)
    _, _, _, stale, _ = step(model, g, "sampled", users, pos, neg)
    assert stale["ui_align"] != pytest.approx(want["ui_align"], rel=1e-9)
    _, _, _, fresh, _ = step(model, g, "sampled", users, pos, neg)
    for part in LOSS_PARTS:
        assert fresh[part] == pytest.approx(want[part], rel=1e-10, abs=1e-14), part


def test_history_rows_are_replaced_by_the_fresh_rows_of_the_batch():
    table = torch.arange(10.0).unsqueeze(1)
    fresh = torch.tensor([[100.0], [300.0]], requires_grad=True)
    out = with_history(fresh, torch.tensor([1, 3]), table, torch.tensor([3, 0, 1, 9, 3]))
    assert out.flatten().tolist() == [300.0, 0.0, 100.0, 9.0, 300.0]
    out.sum().backward()
    assert fresh.grad.flatten().tolist() == [1.0, 2.0]
    assert with_history(fresh[:0], torch.tensor([], dtype=torch.int64), table, torch.tensor([4])).item() == 4.0


def test_histories_refresh_every_r_reads():
    calls = []
    h = Histories(3)
    for _ in range(7):
        h.read(lambda: calls.append(1) or {"n": len(calls)})
    assert len(calls) == h.refreshes == 3          # reads 1, 4 and 7


@pytest.mark.parametrize("name, every", [("lightgcn", 3), ("lightgcn", 0), ("dgmrec", 4)])
def test_an_epoch_logs_the_refreshes_of_its_histories(sparse_dir, tmp_path, name, every):
    """``log.jsonl``: each epoch's refreshes (one at its start, then every ``history_every`` steps) and their
    seconds; no entry when the histories are off."""
    import json
    import math

    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.train import train

    config = load_config(f"configs/{name}/base.yaml", {
        "data": {"dir": str(sparse_dir), "missing_ratio": 2 / 3},
        "train": {"epochs": 2, "eval_every": 2, "batch_size": 256},
        "model": {"execution": "sampled", "history_every": every}})
    train(config, str(tmp_path / "run"), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        if not every:
            assert "history" not in r
            continue
        assert r["history"]["refreshes"] == math.ceil(r["steps"] / every) > 1
        assert 0 < r["history"]["seconds"] < r["seconds"]["train"]


def test_dgmrec_drops_both_old_histories_before_refreshing_either(sparse_dir, monkeypatch):
    """The ID branch's refresh runs after the modality branch's old tables are gone (at 1M items they are 2 GB,
    and the two refreshes side by side with them were the run's memory peak)."""
    import dgmrec_dgl.models.lightgcn_rec as rec

    ds, model, g = make(sparse_dir, recon=0.0, history_every=2)
    modality_tables_gone = []
    compute = rec.lightgcn_history

    def spy(*args):
        modality_tables_gone.append(model.modality_history.tables is None)
        return compute(*args)

    monkeypatch.setattr(rec, "lightgcn_history", spy)
    users, pos, neg = batch(ds)
    for _ in range(3):                              # reads 1 and 3 refresh both
        step(model, g, "sampled", users, pos, neg)
    assert model.history.refreshes == model.modality_history.refreshes == 2
    assert modality_tables_gone == [True, True]


def test_dgmrec_modality_histories_refreshed_in_slices_of_items_equal_the_whole_pass(sparse_dir, monkeypatch):
    import dgmrec_dgl.models.dgmrec.model as dgmrec_model

    ds, model, g = make(sparse_dir, history_every=2, n_mm_layers=2)
    with torch.no_grad():
        whole = model._modality_layers(g)
        monkeypatch.setattr(dgmrec_model, "REFRESH_CHUNK", 50)
        assert ds.n_items > 3 * 50 and ds.n_items % 50          # several slices, the last one short
        sliced = model._modality_layers(g)
    for m in ds.modalities:
        assert len(sliced[m]) == 3
        for a, b in zip(whole[m], sliced[m]):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["lightgcn", "dgmrec"])
def test_validation_runs_after_the_epoch_dropped_its_histories(sparse_dir, tmp_path, monkeypatch, name):
    """The histories are not read between an epoch's last step and the next epoch's first, whose start
    recomputes them: the validation's whole-graph pass has their memory."""
    import dgmrec_dgl.train as trainer
    from dgmrec_dgl.config import load_config
    from dgmrec_dgl.models.history import histories_of

    held = []
    validate = trainer.validate_and_keep_best

    def spy(s, *args, **kwargs):
        held.append([h.tables is not None for h in histories_of(s.model)])
        return validate(s, *args, **kwargs)

    monkeypatch.setattr(trainer, "validate_and_keep_best", spy)
    config = load_config(f"configs/{name}/base.yaml", {
        "data": {"dir": str(sparse_dir), "missing_ratio": 2 / 3},
        "train": {"epochs": 2, "eval_every": 1, "batch_size": 256},
        "model": {"execution": "sampled", "history_every": 3}})
    trainer.train(config, str(tmp_path / "run"), progress=False)
    assert held == [[False] * (1 if name == "lightgcn" else 2)] * 2
