"""RowSparseAdam: dense Adam's maths on row-sparse gradients (dgmrec_dgl.optim)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dgmrec_dgl.optim import RowSparseAdam


def _pair(rows=1000, d=48, seed=0):
    torch.manual_seed(seed)
    table = torch.randn(rows, d)
    head = torch.randn(d, 3)
    return ([torch.nn.Parameter(table.clone()), torch.nn.Parameter(head.clone())],
            [torch.nn.Parameter(table.clone()), torch.nn.Parameter(head.clone())])


def _step(params, optimizer, rows, sparse):
    optimizer.zero_grad(set_to_none=True)
    table, head = params
    (F.embedding(rows, table, sparse=sparse) @ head).pow(2).sum().backward()
    assert table.grad.is_sparse == sparse
    optimizer.step()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("chunk_rows", [96, 1000, 4096])
def test_sparse_gradients_give_dense_adam_bit_for_bit(weight_decay, chunk_rows):
    dense, sparse = _pair()
    reference = torch.optim.Adam(dense, lr=1e-2, weight_decay=weight_decay, fused=True)
    ours = RowSparseAdam(sparse, lr=1e-2, weight_decay=weight_decay, chunk_rows=chunk_rows)
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        rows = torch.randint(0, 1000, (300,), generator=generator)   # repeated rows: their gradients add
        _step(dense, reference, rows, sparse=False)
        _step(sparse, ours, rows, sparse=True)
        for a, b in zip(dense, sparse):
            assert torch.equal(a, b)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(reference.state[a][key], ours.state[b][key]), key
    # rows without a gradient still moved (momentum), as dense Adam moves them; lazy SparseAdam would not
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[rows] = False
    assert not torch.equal(sparse[0][untouched], _pair()[1][0][untouched])


def test_state_dict_is_adams_and_dense_gradients_take_the_fused_path():
    dense, sparse = _pair(rows=50, d=8)
    reference = torch.optim.Adam(dense, lr=1e-3, fused=True)
    ours = RowSparseAdam(sparse, lr=1e-3)
    rows = torch.arange(0, 50, 3)
    _step(dense, reference, rows, sparse=False)
    _step(sparse, ours, rows, sparse=False)
    assert all(torch.equal(a, b) for a, b in zip(dense, sparse))
    # the checkpoint layout is Adam's (a deep copy: load_state_dict keeps tensors that need no cast)
    ours.load_state_dict(copy.deepcopy(reference.state_dict()))
    _step(dense, reference, rows, sparse=False)
    _step(sparse, ours, rows, sparse=True)
    assert all(torch.equal(a, b) for a, b in zip(dense, sparse))


def test_bad_arguments_are_refused():
    params = [torch.nn.Parameter(torch.zeros(3, 2))]
    with pytest.raises(ValueError, match="amsgrad"):
        RowSparseAdam(params, amsgrad=True)
    with pytest.raises(ValueError, match="chunk_rows"):
        RowSparseAdam(params, chunk_rows=0)


@pytest.mark.parametrize("weight_decay, adamw", [(0.0, False), (0.01, False), (0.01, True)])
def test_lazy_kernel_equals_torch_adam_when_every_row_is_read(weight_decay, adamw):
    """Listing every row each step, the lazy update is dense Adam's (and AdamW's) step."""
    from kernels.adam import lazy_adam_rows

    torch.manual_seed(0)
    ref = torch.nn.Parameter(torch.randn(7, 5))
    cls = torch.optim.AdamW if adamw else torch.optim.Adam
    opt = cls([ref], lr=0.05, weight_decay=weight_decay)
    ours = ref.detach().clone().numpy()
    m, v = np.zeros_like(ours), np.zeros_like(ours)
    for step in range(1, 6):
        grad = torch.randn(7, 5)
        ref.grad = grad.clone()
        opt.step()
        order = np.random.default_rng(step).permutation(7)          # any row order
        lazy_adam_rows(ours, m, v, order, np.ascontiguousarray(grad.numpy()[order]), lr=0.05, beta1=0.9,
                       beta2=0.999, eps=1e-8, step=step, weight_decay=weight_decay, decoupled=adamw)
    np.testing.assert_allclose(ours, ref.detach().numpy(), rtol=0, atol=2e-6)
