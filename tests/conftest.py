"""Shared fixtures: a tiny hand-made dataset folder, a sparse synthetic one and the path of the study's real splits."""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pytest
import torch

from dgmrec_dgl.data import synthetic

# Small tensors: one intra-op thread (torch) and one worker (Numba's sampler) avoid idle OpenMP threads
# spinning against the machine's two cores.
torch.set_num_threads(1)
numba.set_num_threads(1)

SHARED_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dgmrec-splits"


def write_inter(path: Path, rows, header: str = "userID\titemID\tx_label") -> Path:
    lines = [header] + ["\t".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_rows(n_users: int = 6, n_items: int = 8, seed: int = 0):
    """Every user has 4 train, 1 valid and 1 test item; ids are contiguous."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=6, replace=False)
        rows += [(u, int(i), 0) for i in items[:4]] + [(u, int(items[4]), 1), (u, int(items[5]), 2)]
    return rows


def make_tiny_dir(folder: Path) -> Path:
    """A valid dataset folder: 6 users, 8 items, image (16-d) and text (4-d) features."""
    folder.mkdir(parents=True)
    write_inter(folder / "tiny.inter", tiny_rows())
    rng = np.random.default_rng(1)
    np.save(folder / "image_feat.npy", rng.normal(size=(8, 16)).astype(np.float32))
    np.save(folder / "text_feat.npy", rng.normal(size=(8, 4)).astype(np.float32))
    return folder


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A valid dataset folder: 6 users, 8 items, image (16-d) and text (4-d) features."""
    return make_tiny_dir(tmp_path / "tiny")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_lightgcn_config(folder: Path, eval_every: int = 1) -> Path:
    """A LightGCN config for the tiny dataset, validating every ``eval_every`` epochs (a second or two an epoch)."""
    path = folder / "lightgcn.yaml"
    path.write_text(f"extends: {CONFIGS / 'lightgcn' / 'base.yaml'}\ntrain: {{eval_every: {eval_every}}}\n")
    return path


def train_argv(config: Path, data: Path, run: Path, *extra) -> list[str]:
    """``dgmrec-dgl train`` arguments: ``config`` on ``data`` into ``run``, quiet, then ``extra``."""
    return ["train", "--config", str(config), "--data", str(data), "--out", str(run), "--quiet", *map(str, extra)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``(config, data, run)``: a finished two-epoch LightGCN run on the tiny dataset (copy it before changing it)."""
    from dgmrec_dgl.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    data, config = make_tiny_dir(root / "tiny"), tiny_lightgcn_config(root)
    assert main(train_argv(config, data, root / "run", "--epochs", 2)) == 0
    return config, data, root / "run"


def run_cli(capsys, argv: list) -> tuple[int, list[str]]:
    """Exit status and stderr lines of ``dgmrec-dgl argv`` (argparse's exits included)."""
    from dgmrec_dgl.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.splitlines()


def assert_rejected(code: int, lines: list[str], *culprits: str) -> None:
    """Exit 2, one stderr line in the project's format, naming every one of ``culprits``, no traceback."""
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and "; fix: " in line and "Traceback" not in line, line
    for culprit in culprits:
        assert culprit in line, (culprit, line)


def shared_split(*parts: str) -> Path:
    path = SHARED_SPLITS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (../shared/data beside the repository)")
    return path


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory):
    """~600 users, ~670 items, ~7 train items per user: a batch's items are a third of the catalog."""
    out = tmp_path_factory.mktemp("blocks") / "sparse"
    synthetic.generate(out, synthetic.preset("toy", n_users=600, n_items=800, mean_interactions=10.0, core=3,
                                             dims={"image": 48, "text": 24}, seed=3), progress=False)
    return out


@pytest.fixture(scope="module")
def masked_sparse(sparse_dir, tmp_path_factory):
    """``(dataset, mask file)``: :func:`sparse_dir` with 40% of its items missing a modality (mask seed 5)."""
    from dgmrec_dgl.data.dataset import Dataset
    from dgmrec_dgl.data.masks import MissingMask

    raw = Dataset.load(sparse_dir)
    path = tmp_path_factory.mktemp("mask") / "missing_items_0.4.npz"
    MissingMask.generate(raw.n_items, raw.modalities, 0.4, seed=5).save(path)
    return Dataset.load(sparse_dir, mask=path), path


@pytest.fixture(autouse=True)
def _quiet_tqdm(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    yield


def bench_script(name: str):
    """The module of ``bench/<name>.py`` (the bench folder holds scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
