"""Activation checkpointing that leaves BatchNorm running statistics as a single forward would.

torch.utils.checkpoint re-runs a module's forward during backward. A train-mode BatchNorm inside
it would then update running_mean / running_var / num_batches_tracked a second time per step
(the output is unaffected: train-mode BN normalises with batch statistics). Here the recompute
runs inside a context that snapshots those buffers and puts them back afterwards, so the stats
after a step equal the non-checkpointed ones exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


def tracking_norms(module: nn.Module) -> list[_BatchNorm]:
    """The train-mode BatchNorm layers of `module` that update running statistics."""
    return [m for m in module.modules()
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None]


@contextmanager
def running_stats_restored(norms: list[_BatchNorm]) -> Iterator[None]:
    """Within the block BN buffers may change; on exit (also an early-stopped recompute) they are restored."""
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        for m, buffers in zip(norms, saved):
            live = [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
            for b, s in zip(live, buffers):
                b.copy_(s)


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) with its activations recomputed in backward (non-reentrant torch checkpoint);
    train-mode BatchNorm running statistics are updated once, by the first forward."""
    norms = tracking_norms(module)
    if not norms:
        return checkpoint(module, x, use_reentrant=False)
    return checkpoint(module, x, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), running_stats_restored(norms)))
