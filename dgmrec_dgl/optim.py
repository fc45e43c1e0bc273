"""Adam that also takes row-sparse gradients: with dense Adam's maths, or lazily (only the rows a step read).

In blocks mode (:mod:`dgmrec_dgl.graphs.blocks`) a training step reads only the raw-feature rows of the
batch's items, so the gradient of a trainable raw table ``[n_items, d_m]`` is zero on every other row. Autograd
would still materialise it as a dense ``[n_items, d_m]`` tensor: 2.6 GB at 1M items with 256 + 384 dims.
Reading the rows through ``F.embedding(..., sparse=True)`` gives a sparse gradient instead, but
``torch.optim.Adam`` refuses those, and ``torch.optim.SparseAdam`` is *lazy*: it leaves the moments and the
parameter of unlisted rows untouched, while dense Adam decays both moments on every row and keeps moving
every parameter by its momentum. That would change the model's maths.

:class:`RowSparseAdam` keeps dense Adam's maths. For a sparse gradient it walks the table in chunks of
``chunk_rows`` rows; each chunk gets its dense gradient slice (zeros plus the listed rows) and goes through
the same fused kernel ``torch.optim.Adam(fused=True)`` runs on a whole tensor, with the same step count. The
kernel is element-wise, so the result equals dense Adam on the dense gradient (tested bit for bit), while at
most one ``[chunk_rows, d_m]`` gradient slice exists at a time. Dense gradients take the usual fused path;
the optimiser state has Adam's layout, so checkpoints load either way.

``lazy=True`` (sampled mode) is the other choice, the one ``torch.optim.SparseAdam`` and DGL's sparse
optimisers make: a sparse gradient updates only its listed rows, in place, in one pass of the Numba kernel
:func:`kernels.adam.lazy_adam_rows`; every other row keeps its moments and its value. The bias correction uses the parameter's step count (one per step in which it
had a gradient), as SparseAdam does. A sampled step at 1M items reads a few hundred thousand rows of tables
of ~2M user rows and ~1M item rows of width up to 384, so the dense maths would pass over all of them three
times per step; the lazy one touches what the step read. It is a different optimiser (a row unread for a
while keeps its stale momentum), which is part of what sampled mode approximates. Weight decay, if set,
applies to the listed rows only.
"""

from __future__ import annotations

import torch

from kernels.adam import lazy_adam_rows

__all__ = ["RowSparseAdam"]


def _sorted_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, values)`` of a row-sparse gradient, rows sorted and distinct, coalescing only if needed.

    A gradient from :func:`dgmrec_dgl.models.base.sparse_rows` already has sorted distinct rows, but autograd
    drops its "coalesced" mark, and ``coalesce()`` sorts again (0.15 s of a LightGCN step at 1M items, for
    446K + 326K rows); one comparison of neighbouring rows tells whether that is needed.
    """
    if not grad.is_coalesced():
        rows = grad._indices()[0]
        if len(rows) < 2 or bool((rows[1:] > rows[:-1]).all()):
            return rows, grad._values()
        grad = grad.coalesce()
    return grad.indices()[0], grad.values()


class RowSparseAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` that also accepts sparse (row) gradients; see the module docstring.

    Args:
        params: parameters or parameter groups, as for ``torch.optim.Adam``.
        chunk_rows: rows per chunk of the dense update behind a sparse gradient.
        lazy: update only the rows a sparse gradient lists (see the module docstring).
        **kwargs: ``lr``, ``betas``, ``eps``, ``weight_decay``, ... of ``torch.optim.Adam`` (not ``amsgrad``).
    """

    def __init__(self, params, chunk_rows: int = 65_536, lazy: bool = False, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("RowSparseAdam does not support amsgrad")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        super().__init__(params, fused=True, **kwargs)
        self.chunk_rows = chunk_rows
        self.lazy = lazy

    @torch.no_grad()
    def step(self, closure=None):
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        if sparse and closure is not None:
            raise ValueError("RowSparseAdam.step: a closure is not supported with sparse gradients")
        for _, p, _ in sparse:
            p.grad = None          # the dense step skips parameters without a gradient
        try:
            loss = super().step(closure)
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        for group, p, grad in sparse:
            self._row_sparse_step(group, p, grad)
        return loss

    def _row_sparse_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.sparse_dim() != 1:
            raise ValueError(f"RowSparseAdam takes gradients sparse in their first dimension only, got "
                             f"{grad.sparse_dim()} sparse dimensions")
        state = self.state[p]
        if not state:   # Adam's fused layout: a float32 step tensor on the parameter's device
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rows, values = _sorted_rows(grad)                         # sorted, unique rows; values [nnz, ...]
        step = state["step"] + 1
        kernel = torch._fused_adamw_ if group.get("decoupled_weight_decay") else torch._fused_adam_
        options = dict(amsgrad=False, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                       weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                       grad_scale=None, found_inf=None)
        if self.lazy:
            if group["maximize"]:
                raise ValueError("RowSparseAdam(lazy=True) does not support maximize")
            flat = [t.view(t.shape[0], -1).numpy() for t in (p.detach(), state["exp_avg"], state["exp_avg_sq"])]
            lazy_adam_rows(*flat, rows.numpy(), values.contiguous().view(len(rows), -1).numpy(), lr=group["lr"],
                           beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"], step=int(step),
                           weight_decay=group["weight_decay"], decoupled=bool(group.get("decoupled_weight_decay")))
            state["step"] = step
            return
        n = p.shape[0]
        starts = torch.arange(0, n + self.chunk_rows, self.chunk_rows, device=rows.device).clamp_(max=n)
        bounds = torch.searchsorted(rows, starts).tolist()
        for c, start in enumerate(starts[:-1].tolist()):
            stop = min(start + self.chunk_rows, n)
            if stop <= start:
                break
            dense = torch.zeros((stop - start,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device)
            lo, hi = bounds[c], bounds[c + 1]
            dense[rows[lo:hi] - start] = values[lo:hi]
            kernel([p[start:stop]], [dense], [state["exp_avg"][start:stop]], [state["exp_avg_sq"][start:stop]],
                   [], [step], **options)
        state["step"] = step
