"""The public Python API (`dgmrec_dgl.fit`, `load`, `Run`) and the README's example of it, run as written."""

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import dgmrec_dgl
from dgmrec_dgl.config import load_config
from dgmrec_dgl.data.synthetic import generate, preset
from dgmrec_dgl.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def readme_python_api_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    """The README's code as written, in a folder laid out as after `make demo` (smaller synthetic data)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    generate(tmp_path / "demo_data", preset("toy", n_users=200, n_items=120, dims={"image": 16, "text": 8}),
             progress=False)
    code = readme_python_api_example()
    assert "dgmrec_dgl.fit(" in code and "dgmrec_dgl.load(" in code
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    run, recs, scores = namespace["run"], namespace["recs"], namespace["scores"]
    users, items = namespace["users"], namespace["items"]
    assert isinstance(run, dgmrec_dgl.Run) and run.dir == "runs/api-demo"
    assert (tmp_path / "runs/api-demo/curves.png").stat().st_size > 0
    assert list(recs.columns) == ["user", "rank", "item", "score", "missing"]
    assert len(recs) == 30 and recs["rank"].tolist()[:10] == list(range(1, 11))
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores, users[[0, 1]] @ items[[5, 7, 9]].T, rtol=1e-5, atol=1e-6)
    assert users.shape[0] == run.dataset.n_users and items.shape[0] == run.dataset.n_items
    assert os.path.isabs(run.config.data.dir)
    assert "missing" in capsys.readouterr().out          # recs.head() was printed


@pytest.fixture(scope="module")
def lightgcn_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    generate(tmp / "data", preset("toy", n_users=120, n_items=80, dims={"image": 8, "text": 8}), progress=False)
    config = load_config(ROOT / "configs/lightgcn/base.yaml")
    return dgmrec_dgl.fit(config, data=tmp / "data", out=tmp / "run", progress=False,
                          train={"epochs": 3, "threads": 1})


def test_fit_takes_a_config_object_and_section_overrides(lightgcn_run):
    run = lightgcn_run
    assert run.config.train.epochs == 3 and run.config.model.name == "lightgcn"
    assert run.metrics["best_epoch"] == 2 and "recall@20" in run.metrics["test"]
    assert (Path(run.dir) / "data_fingerprint.json").exists()


def test_recommend_matches_scores_and_excludes_train_items(lightgcn_run):
    run = lightgcn_run
    users = np.arange(run.dataset.n_users)
    recs = run.recommend(users, k=5)
    assert isinstance(recs, pd.DataFrame) and len(recs) == 5 * len(users)
    train = run.dataset.train_matrix()
    for user, group in recs.groupby("user"):
        scores = run.score([user])[0]
        unseen = np.setdiff1d(np.arange(run.dataset.n_items), train[user].indices)
        best = unseen[np.argsort(-scores[unseen], kind="stable")[:5]]
        np.testing.assert_allclose(np.sort(group["score"].to_numpy())[::-1], np.sort(scores[best])[::-1],
                                   rtol=1e-5)
        assert not set(group["item"]) & set(train[user].indices)
        assert (np.diff(group["score"].to_numpy()) <= 1e-7).all()
    with_seen = run.recommend([0], k=run.dataset.n_items, exclude_seen=False)
    assert len(with_seen) == run.dataset.n_items


def test_top_k_pads_and_approximate_search_agrees_on_a_small_catalog(lightgcn_run):
    run = lightgcn_run
    n_seen = len(run.dataset.train_matrix()[0].indices)
    items, scores = run.top_k([0], k=run.dataset.n_items)
    assert (items[0, -n_seen:] == -1).all() and np.isnan(scores[0, -n_seen:]).all()
    assert (items[0, :-n_seen] >= 0).all()
    users = np.arange(20)
    exact, _ = run.top_k(users, k=10)
    approx, _ = run.top_k(users, k=10, approximate=True)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert overlap > 0.95


def test_bad_ids_are_one_line_errors(lightgcn_run):
    with pytest.raises(DataError, match=r"users: user id 999 is outside"):
        lightgcn_run.recommend([1, 999], k=3)
    with pytest.raises(DataError, match="items"):
        lightgcn_run.score([0], [-1])
    with pytest.raises(DataError, match="k"):
        lightgcn_run.top_k([0], k=0)
    with pytest.raises(DataError, match="config.yaml: file: does not exist"):
        dgmrec_dgl.load(Path(lightgcn_run.dir).parent)
