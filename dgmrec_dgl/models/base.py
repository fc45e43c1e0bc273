"""The interface every recommender implements, so one trainer and one evaluator serve them all.

A :class:`Recommender` is an ``nn.Module`` with three duties:

- ``forward(g)`` → representations of all users and items on the heterograph ``g`` (any object);
- ``loss(reps, users, pos, neg, generator)`` → ``(total, {part: value})`` for a batch of BPR triples;
- ``fused(reps)`` → ``(user [n_users, d'], item [n_items, d'])`` whose inner products are the scores.

A training step (:func:`dgmrec_dgl.train.training_step`, the one step every mode runs) calls
``model.loss(*model.batch_forward(g, batch), generator)`` on a :class:`Batch` made by
:meth:`Recommender.sample_batch`. By default the batch is the triples alone and ``batch_forward`` is
``forward(g)`` with the ids unchanged; a model may instead draw blocks for the batch in ``sample_batch``
(DGL's samplers; the trainer runs it in a background thread, ahead of the compute) and return
representations of only the rows the batch reads, with the batch relabelled to those rows (DGMRec's blocks
mode; the sampled mode of DGMRec, LightGCN and MF-BPR). Evaluation, scoring and generation always use
``forward``.

Optional hooks: :meth:`Recommender.before_epoch` (work done once per epoch before the mini-batches, such as
DGMRec's generation and graph refinement; it may return a new graph), :meth:`Recommender.before_validation`
(work before each validation), :meth:`Recommender.main_parameters` (what the main optimiser trains) and
:meth:`Recommender.auxiliary_optimizer` (a second optimiser the model steps itself). Graph state a model changes (refined kNN relations) travels through
:meth:`Recommender.graph_state` / :meth:`Recommender.load_graph_state` so checkpoints hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..graphs.hetero import build_heterograph


@dataclass
class Batch:
    """One training step's BPR triples (int64 global ids ``[B]``) and what the model's sampler drew for them."""

    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor
    drawn: dict = field(default_factory=dict)


class Recommender(nn.Module):
    """Base class of the models trained by :func:`dgmrec_dgl.train.train`."""

    def forward(self, g):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, reps, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError  # pragma: no cover - abstract

    def fused(self, reps) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - abstract

    def embeddings(self, g) -> tuple[torch.Tensor, torch.Tensor]:
        """``(user [n_users, d'], item [n_items, d'])`` whose inner products are the scores on graph ``g``:
        ``fused(forward(g))``, which a model may compute with less memory (call it without autograd)."""
        return self.fused(self(g))

    # ------------------------------------------------------------------ optional hooks
    def execution(self) -> str:
        """How a training step runs (``full``, ``blocks`` or ``sampled``); models without the choice: ``full``."""
        return "full"

    def sample_batch(self, g, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> Batch:
        """The :class:`Batch` of the triples ``users, pos, neg`` (int64 ``[B]`` global ids); by default nothing is drawn."""
        return Batch(users, pos, neg)

    def batch_forward(self, g, batch: Batch):
        """``(reps, users, pos, neg)`` for one training step's :meth:`loss`.

        Args:
            g: the training graph.
            batch: from :meth:`sample_batch`.

        Returns:
            representations and the batch as rows of them; by default ``(self(g), users, pos, neg)``.
        """
        return self(g), batch.users, batch.pos, batch.neg

    def make_graph(self, dataset):
        """The heterograph the model runs on (default: the user–item relations only)."""
        return build_heterograph(dataset, {})

    def scoring_graph(self, g):
        """The graph scores are computed on (default: the training graph)."""
        return g

    def main_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def row_tables(self) -> dict[str, str]:
        """The trainable tables with one row per node, as ``state_dict`` key -> node type (``user``/``item``).

        Distributed training (:mod:`dgmrec_dgl.dist_train`) holds these as ``dgl.distributed.DistEmbedding``
        s, each row on its node's partition; the model reads them only through :func:`sparse_rows` in
        sampled mode. Default: none (the model cannot train on DistDGL partitions).
        """
        return {}

    def auxiliary_optimizer(self) -> torch.optim.Optimizer | None:
        return None

    def before_epoch(self, epoch: int, g, generator: torch.Generator) -> tuple[object, dict]:
        """Per-epoch work before training; returns the (possibly new) graph and log entries."""
        return g, {}

    def before_validation(self, epoch: int, g, generator: torch.Generator) -> dict:
        """Work before the validation that follows ``epoch`` (run on every rank); returns log entries.

        DGMRec in the release's new-items setting generates the new items' features and refreshes its
        inference graphs here; the other models have nothing to do (their new items keep their initial
        ID embeddings, as in the release).
        """
        return {}

    def graph_state(self) -> dict:
        """Graph state the model changes while training, as tensors and plain values (checkpoints hold it and
        load with ``torch.load(weights_only=True)``)."""
        return {}

    def load_graph_state(self, state: dict, g):
        """Restore :meth:`graph_state` output; returns the graph to continue with."""
        return g


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0 [len(index), ...], with a backward pass that does not depend on the threads.

    A batch repeats users and items. ``x[index]``'s backward sums the repeated rows' gradients with
    ``index_put_``, whose multi-threaded CPU kernel adds them with atomics in whatever order the threads
    reach them; runs with the same seed then differ in the last bits after one step and drift apart over an
    epoch. ``index_select``'s backward (``index_add_``) adds them in index order.
    """
    return torch.index_select(x, 0, index)


class _SparseRows(torch.autograd.Function):
    """``table[ids]`` whose gradient w.r.t. ``table`` is a coalesced row-sparse tensor (see :func:`sparse_rows`)."""

    @staticmethod
    def forward(ctx, table, ids):
        order = torch.argsort(ids)
        ctx.save_for_backward(ids[order], order)
        ctx.shape = table.shape
        return torch.index_select(table, 0, ids)

    @staticmethod
    def backward(ctx, grad):
        rows, order = ctx.saved_tensors
        values = torch.index_select(grad, 0, order)
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, ctx.shape, is_coalesced=True,
                                       check_invariants=False), None


def sparse_rows(table, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (int64 ``[n]``, **distinct**) of a trainable row table ``[N, ...]`` → ``[n, ...]``, with a
    gradient for its optimiser.

    A tensor gets a row-sparse gradient: what ``F.embedding(ids, table, sparse=True)`` gives, but built
    already sorted and marked coalesced, so the optimiser does not sort and merge it again (the ids of a
    sampled block's sources are distinct; at 50K items the optimiser's ``coalesce`` of two such gradients
    took 0.36 s of a 0.6 s step). A table read twice in one step gets the sum of two such gradients (then
    coalesced). On DistDGL partitions the table is a ``dgl.distributed.DistEmbedding`` behind
    :class:`dgmrec_dgl.dist_train.DistRows`, which is called with the ids: it pulls the rows from their
    partitions' servers and records the read for DGL's distributed sparse optimiser.
    """
    if not isinstance(table, torch.Tensor):
        return table(ids)
    return _SparseRows.apply(table, ids)


def distinct_rows(users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
    """A batch's sorted distinct users and items (of ``pos ∪ neg``), and the triples as rows of them.

    Returns ``(users [n_u], items [n_i], (user rows [B], pos rows [B], neg rows [B]))``.
    """
    seed_users, user_rows = torch.unique(users, return_inverse=True)
    seed_items, item_rows = torch.unique(torch.cat([pos, neg]), return_inverse=True)
    return seed_users, seed_items, (user_rows, item_rows[:len(pos)], item_rows[len(pos):])


def scalar_parts(parts: dict) -> dict[str, float]:
    """Loss parts as plain floats for logging (detached from the graph)."""
    return {k: float(torch.as_tensor(v).detach()) for k, v in parts.items()}
