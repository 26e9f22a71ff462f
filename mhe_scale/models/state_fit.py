"""Saved weights into a model built from a config: an unreadable file or what does not fit, in one line.

torch's `load_state_dict` raises a RuntimeError of one line per mismatched tensor (a width change gives
dozens); tools and tasks that load a run's weights call `load_fitting` and wrap its one-line reason
with the file and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor, nn


def read_weights(path: str | os.PathLike, fix: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file (nothing unpickled); ValueError "PATH: not a readable safetensors
    file (why); FIX" for a truncated, foreign or unreadable file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); {fix}") from None


class StateFitError(ValueError):
    """The tensors of a file do not fit a module; the message is the first reason, one line."""


def fit_problem(module: nn.Module, state: Mapping[str, Tensor]) -> str | None:
    """Why `state` does not load strictly into `module`: the first size mismatch (file vs model shape,
    and how many more), else the missing / unexpected names (first 5 of each); None when it fits."""
    own = module.state_dict()
    wrong = [(k, list(state[k].shape), list(v.shape)) for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        key, file_shape, model_shape = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        return f"size mismatch for {key}: {file_shape} in the file, {model_shape} in the model{more}"
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        return f"missing {missing[:5]}, unexpected {unexpected[:5]}"
    return None


def load_fitting(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """module.load_state_dict(state, strict=True), or StateFitError(fit_problem) with nothing loaded."""
    problem = fit_problem(module, state)
    if problem is not None:
        raise StateFitError(problem)
    module.load_state_dict(dict(state), strict=True)
