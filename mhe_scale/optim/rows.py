"""Row gradients outside autograd: gather a parameter's rows into a leaf, collect their gradients.

A parameter marked with `enable_row_sparse(p, row_ndim)` is seen as R rows of shape
p.shape[row_ndim:] (R = prod(p.shape[:row_ndim])). `gather_rows(p, ids)` returns those rows as
(a view of) a fresh leaf tensor: the loss backpropagates into the leaf, never into p, so no dense
[R, ...] gradient exists. The row-sparse optimizer (row_sparse.py) reads the collected
(ids, grads), updates only those rows, and clears them in zero_grad. Before rows are read they are
brought up to date (`refresh`, installed by the optimizer: the lazy catch-up of skipped steps).
An unmarked parameter is gathered by plain indexing (dense autograd gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

ROWS_ATTR = "_mhe_row_grads"


class RowGradients:
    """The (row ids, leaf) pairs gathered from one parameter since the last zero_grad."""

    def __init__(self, row_ndim: int) -> None:
        self.row_ndim = row_ndim
        self.ids: list[Tensor] = []
        self.leaves: list[Tensor] = []
        self.states: list[list[Tensor] | None] = []  # per gather: its rows' caught-up optimizer state, if kept
        self.merged: tuple[Tensor, Tensor] | None = None  # (ids [U], leaf [U, ...] holding the summed grad)
        self.merged_state: list[Tensor] | None = None
        # set by the optimizer: refresh(ids) catches rows up (None = all rows) and, for ids, returns the
        # caught-up (rows [U, ...], optimizer state rows) it also wrote back, or None
        self.refresh: Callable[[Tensor | None], tuple[Tensor, list[Tensor]] | None] | None = None
        self.fresh = True  # every gathered row was caught up when gathered

    def add(self, ids: Tensor, leaf: Tensor, fresh: bool, state: list[Tensor] | None = None) -> None:
        """One gather: its row ids, the leaf holding the rows and, when the optimizer handed them over,
        the rows' caught-up optimizer state (the step then reads neither the rows nor the state again)."""
        self.fresh = self.fresh and fresh
        self.ids.append(ids)
        self.leaves.append(leaf)
        self.states.append(state)
        self.merged = None

    def coalesce(self) -> tuple[Tensor, Tensor] | None:
        """-> (unique row ids [U], leaf [U, ...] whose .grad is the summed gradient), or None if no
        gathered row received a gradient. Idempotent until the next add / clear."""
        if self.merged is not None:
            return self.merged
        pairs = [(i, leaf, st) for i, leaf, st in zip(self.ids, self.leaves, self.states) if leaf.grad is not None]
        if not pairs:
            return None
        self.merged_state = None
        if len(pairs) == 1:
            ids, leaf, self.merged_state = pairs[0]
        else:  # gradient accumulation: rows may repeat across micro-batches
            ids, inverse = torch.unique(torch.cat([i for i, _, _ in pairs]), return_inverse=True)
            grads = torch.cat([leaf.grad for _, leaf, _ in pairs])
            summed = grads.new_zeros((ids.numel(), *grads.shape[1:])).index_add_(0, inverse, grads)
            leaf = torch.empty_like(summed)  # a holder: only its .grad is read
            leaf.grad = summed
        self.merged = (ids, leaf)
        return self.merged

    def cached_state(self) -> list[Tensor] | None:
        """After coalesce: the merged rows' caught-up optimizer state when ONE gather holds them all and the
        optimizer handed it over (the leaf then holds the caught-up rows themselves), else None."""
        return self.merged_state if self.merged is not None else None

    def clear(self) -> None:
        self.ids, self.leaves, self.states, self.merged, self.merged_state, self.fresh = [], [], [], None, None, True


def rows_of(p: Tensor, row_ndim: int) -> Tensor:
    """p viewed as [R, *p.shape[row_ndim:]] (shares storage)."""
    return p.view(-1, *p.shape[row_ndim:])


def enable_row_sparse(p: nn.Parameter, row_ndim: int = 1) -> None:
    """Mark p so that gather_rows collects its row gradients outside autograd (see module doc)."""
    if not 1 <= row_ndim <= p.dim():
        raise ValueError(f"enable_row_sparse: row_ndim={row_ndim} must be in [1, {p.dim()}] for shape {tuple(p.shape)}")
    if not is_row_sparse(p):
        setattr(p, ROWS_ATTR, RowGradients(row_ndim))


def is_row_sparse(p: Tensor) -> bool:
    return getattr(p, ROWS_ATTR, None) is not None


def gather_rows(p: Tensor, ids: Tensor, unique: bool = False, row_ndim: int = 1) -> Tensor:
    """Rows `ids` (any shape, flat row indices) of p -> [*ids.shape, *tail].

    Row-sparse p: the rows are caught up first and then read from a new leaf (gradients collected
    for the optimizer; `unique=True` promises ids are distinct, which skips a torch.unique).
    Otherwise plain indexing of p viewed with `row_ndim` leading row dims (dense autograd gradient).
    """
    rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
    if rg is None:
        return rows_of(p, row_ndim)[ids]
    flat = ids.reshape(-1)
    if unique:
        u, inverse = flat, None
    else:
        u, inverse = torch.unique(flat, return_inverse=True)
    caught = rg.refresh(u) if rg.refresh is not None else None
    if caught is not None:  # the caught-up rows (a fresh copy, already written back) and their optimizer state
        rows, state = caught
    else:  # index_select: faster than [u] indexing on CPU
        rows, state = rows_of(p.detach(), rg.row_ndim).index_select(0, u), None
    if torch.is_grad_enabled():
        rows.requires_grad_(True)
        rg.add(u, rows, rg.refresh is not None, state)
    out = rows if inverse is None else rows[inverse]
    return out.reshape(*ids.shape, *out.shape[1:])


def refresh_all(p: Tensor) -> Tensor:
    """Bring every row of a row-sparse p up to date (before reading p whole: eval, predict, save); -> p."""
    rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
    if rg is not None and rg.refresh is not None:
        rg.refresh(None)
    return p


def row_sparse_leaves(params: Iterable[Tensor]) -> list[Tensor]:
    """One leaf per row-sparse parameter holding its summed row gradient (.grad [U, ...]): what a
    global-norm clip must include and scale in place."""
    out = []
    for p in params:
        rg: RowGradients | None = getattr(p, ROWS_ATTR, None)
        merged = None if rg is None else rg.coalesce()
        if merged is not None:
            out.append(merged[1])
    return out


def refresh_on_state_dict(module: nn.Module) -> None:
    """Catch every row-sparse parameter of `module` up before its state_dict is taken (checkpoints and
    exports never hold stale rows). Registered once per module."""
    if getattr(module, "_mhe_refresh_hook", False):
        return

    def hook(mod: nn.Module, prefix: str, keep_vars: bool) -> None:
        for p in mod.parameters(recurse=False):
            refresh_all(p)

    module.register_state_dict_pre_hook(hook)
    module._mhe_refresh_hook = True  # type: ignore[attr-defined]
