"""The same seed gives the same gradients with two threads, for every model.

A batch repeats users and items; gathering their rows with ``x[ids]`` summed the repeated rows' gradients
with atomics in a thread-dependent order (see :func:`dgmrec_dgl.models.base.gather_rows`), so two runs of
the same seed differed after one step. Here one training step's gradients are recomputed from the same
state several times with two threads and must agree bit for bit.
"""

from __future__ import annotations

import numba
import pytest
import torch

from dgmrec_dgl.compare import DEFAULT_CONFIG_DIR, model_config
from dgmrec_dgl.data.synthetic import generate, preset
from dgmrec_dgl.models import build_model
from dgmrec_dgl.train import load_dataset
from kernels.sampling import bpr_triples

REPEATS = 5


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("determinism") / "toy"
    generate(out, preset("toy"), progress=False)
    return out


@pytest.fixture
def two_threads():
    before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


@pytest.mark.parametrize("name, execution", [("dgmrec", "full"), ("dgmrec", "blocks"), ("ci2mg", None),
                                             ("lightgcn", None), ("mfbpr", None)])
def test_a_training_step_gives_the_same_gradients_with_two_threads(toy_dir, two_threads, name, execution):
    overrides = {"data": {"dir": str(toy_dir), "missing_ratio": 2 / 3}}
    if execution:
        overrides["model"] = {"execution": execution}
    config = model_config(name, overrides, DEFAULT_CONFIG_DIR)
    torch.manual_seed(0)
    dataset = load_dataset(config)
    model = build_model(config, dataset)
    g = model.make_graph(dataset)
    csr = dataset.train_matrix()
    users, pos, neg = (torch.from_numpy(a)[:2048] for a in bpr_triples(csr.indptr, csr.indices,
                                                                        dataset.n_items, 7))
    assert len(torch.unique(users)) < len(users)      # the batch repeats users, as real batches do

    def gradients():
        model.zero_grad(set_to_none=True)
        loss, _ = model.loss(*model.batch_forward(g, model.sample_batch(g, users, pos, neg)),
                             torch.Generator().manual_seed(0))
        loss.backward()
        return {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
                for n, p in model.named_parameters() if p.grad is not None}

    first = gradients()
    assert first
    for _ in range(REPEATS - 1):
        again = gradients()
        assert again.keys() == first.keys()
        differ = [n for n in first if not torch.equal(first[n], again[n])]
        assert not differ, f"{name}: gradients differ between identical steps: {differ}"
