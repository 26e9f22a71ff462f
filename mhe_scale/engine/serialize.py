"""Training state as safetensors-ready tensors plus JSON: no pickle anywhere.

`flatten_optimizer_state` splits `optimizer.state_dict()` into named tensors (moments, step
counters, tensor-valued group options) and a JSON structure (param groups, non-tensor state);
`capture_rng` does the same for the torch / CUDA / numpy / python generators. JSON keeps tuples
(e.g. Adam's betas, python's RNG state) as {"__tuple__": [...]} so they come back as tuples.
`atomic_write_text` writes a result file so that a crash leaves the old one or the new one.
`named_safetensors(what)` turns safetensors' bare "Error while deserializing header" (a pickle, a
truncated or damaged file) into a ValueError that names the file.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor


@contextlib.contextmanager
def named_safetensors(what: str | os.PathLike) -> Iterator[None]:
    """Re-raise a safetensors read error inside the block as a ValueError naming `what` (a file, or
    the files of a checkpoint part) and the ways out; nothing else is caught."""
    try:
        yield
    except SafetensorError as exc:
        raise ValueError(f"{what}: not a readable safetensors file ({exc}): the checkpoint is truncated, damaged or "
                         "not written by mhe_scale (a pickle is never loaded); resume from another step folder or "
                         "move this one away") from exc


def encode_json(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_json(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_json(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode_json(v) for k, v in obj.items()}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} {obj!r} in a checkpoint's JSON")


def decode_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tuple__"}:
            return tuple(decode_json(v) for v in obj["__tuple__"])
        return {k: decode_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_json(v) for v in obj]
    return obj


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> ({"state.<idx>.<name>": tensor, "group.<i>.<key>": tensor}, JSON rest)."""
    tensors: dict[str, Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(idx), {})[name] = value
    groups = []
    for i, group in enumerate(state["param_groups"]):
        plain = {}
        for key, value in group.items():
            if torch.is_tensor(value):
                tensors[f"group.{i}.{key}"] = value.detach().cpu().contiguous()
                plain[key] = {"__tensor__": f"group.{i}.{key}"}
            else:
                plain[key] = value
        groups.append(plain)
    return tensors, encode_json({"state_keys": [str(k) for k in state["state"]], "other": other, "param_groups": groups})


def unflatten_optimizer_state(tensors: dict[str, Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    """Inverse of flatten_optimizer_state."""
    structure = decode_json(structure)
    state: dict[int, dict[str, Any]] = {int(k): {} for k in structure["state_keys"]}
    for key, value in tensors.items():
        kind, idx, name = key.split(".", 2)
        if kind == "state":
            state[int(idx)][name] = value
    for idx, entry in structure["other"].items():
        state[int(idx)].update(entry)
    groups = []
    for group in structure["param_groups"]:
        groups.append({k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
                       for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's torch / CUDA / numpy / python RNG states as (tensors, JSON)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": random.getstate(), "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, encode_json(meta)


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    meta = decode_json(meta)
    torch.set_rng_state(tensors["torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(meta["python"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
