"""Per-rank head-shard checkpoints that resume on any world size, and a merged single-file export.

A checkpoint directory holds one safetensors file per rank, `head-shard-{rank}-of-{W}.safetensors`:
  tensors   sharded ones [count, ...] = rows [start, start + count) of the full [num_items, ...]
            tensor (classes, or MHS groups); replicated ones whole (e.g. MHC's group layer);
            optimizer state as "optim.<parameter>.<key>" (Adam's exp_avg / exp_avg_sq are
            sharded like their parameter, its scalar step is replicated)
  metadata  format, num_items, world, rank, start, count, sharded (JSON list of names),
            names (JSON: name in the single-process head), optimizer (JSON param groups, or "null")
`load_resharded(dir, plan)` assembles any rank's rows for any world size by reading only the
overlapping row slices of the saved shards (never a whole matrix); `export_merged` streams the
full tensors into one file for inference, holding one block of rows in memory at a time.
Each rank calls `save_head_shard` / `load_head_shard` itself (e.g. from the trainer's per-rank
checkpoint hooks, after the collective save of the replicated model); nothing here communicates.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mhe_scale.parallel.shard import ShardPlan

FORMAT = "mhe_scale.head_shard.v1"
SHARD_FILE = "head-shard-{rank}-of-{world}.safetensors"
SHARD_PATTERN = re.compile(r"^head-shard-(\d+)-of-(\d+)\.safetensors$")
OPTIM_PREFIX = "optim."
EXPORT_BLOCK_BYTES = 64 << 20
"""export_merged copies at most this many bytes of one shard at a time."""


@dataclass(frozen=True)
class ShardFile:
    """What one saved shard declares (read from its metadata and header)."""

    path: Path
    rank: int
    world: int
    num_items: int
    start: int
    count: int
    sharded: tuple[str, ...]
    names: dict[str, str]
    optimizer: list[dict[str, Any]] | None
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]


@dataclass
class ShardState:
    """load_resharded's answer: tensors for `plan` (sharded ones sliced to its rows, others whole)."""

    plan: ShardPlan
    tensors: dict[str, Tensor]
    sharded: tuple[str, ...]
    names: dict[str, str]
    optimizer: list[dict[str, Any]] | None


def shard_path(directory: str | os.PathLike[str], rank: int, world: int) -> Path:
    return Path(directory) / SHARD_FILE.format(rank=rank, world=world)


def save_shard(directory: str | os.PathLike[str], plan: ShardPlan, tensors: Mapping[str, Tensor],
               sharded: Iterable[str], names: Mapping[str, str] | None = None,
               optimizer: list[dict[str, Any]] | None = None) -> Path:
    """Write this rank's file (atomically: temporary name, then rename). tensors: name -> tensor;
    those in `sharded` must have plan.count rows (dim 0). Returns the file's path."""
    sharded = tuple(sharded)
    for name in sharded:
        if name not in tensors:
            raise KeyError(f"save_shard: sharded tensor {name!r} is not among the tensors {sorted(tensors)}")
        if tensors[name].dim() == 0 or tensors[name].shape[0] != plan.count:
            raise ValueError(f"save_shard: {name} has shape {tuple(tensors[name].shape)}, but rank {plan.rank} owns "
                             f"{plan.count} rows [{plan.start}, {plan.end}) of {plan.num_items}")
    meta = {"format": FORMAT, "num_items": str(plan.num_items), "world": str(plan.world), "rank": str(plan.rank),
            "start": str(plan.start), "count": str(plan.count), "sharded": json.dumps(list(sharded)),
            "names": json.dumps(dict(names or {})), "optimizer": json.dumps(optimizer)}
    path = shard_path(directory, plan.rank, plan.world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_index(directory: str | os.PathLike[str]) -> list[ShardFile]:
    """Every shard of a checkpoint, by rank, checked: one world size, all ranks present, the same
    num_items and tensor names, row ranges that tile [0, num_items) exactly."""
    directory = Path(directory)
    found = {}
    for p in sorted(directory.glob("head-shard-*-of-*.safetensors")) if directory.is_dir() else []:
        m = SHARD_PATTERN.match(p.name)
        if m:
            found[p] = (int(m.group(1)), int(m.group(2)))
    if not found:
        raise FileNotFoundError(f"no {SHARD_FILE.format(rank='*', world='*')} in {directory}; "
                                f"save one per rank with save_shard / save_head_shard")
    worlds = sorted({w for _, w in found.values()})
    if len(worlds) > 1:
        raise ValueError(f"{directory} mixes shards of world sizes {worlds}; remove the stale ones")
    world = worlds[0]
    missing = sorted(set(range(world)) - {r for r, _ in found.values()})
    if missing:
        raise FileNotFoundError(f"{directory} lacks the shards of ranks {missing} of {world}: "
                                f"{[SHARD_FILE.format(rank=r, world=world) for r in missing]}")
    shards = sorted((_read_one(p) for p in found), key=lambda s: s.rank)
    first = shards[0]
    for s in shards:
        if (s.rank, s.world) != found[s.path]:
            raise ValueError(f"{s.path.name} says rank {s.rank} of {s.world} in its metadata")
        if s.num_items != first.num_items:
            raise ValueError(f"{s.path.name} has num_items={s.num_items} but {first.path.name} has {first.num_items}")
        if set(s.shapes) != set(first.shapes) or s.sharded != first.sharded:
            raise ValueError(f"{s.path.name} holds tensors {sorted(s.shapes)} (sharded {list(s.sharded)}) but "
                             f"{first.path.name} holds {sorted(first.shapes)} (sharded {list(first.sharded)})")
        for name in s.sharded:
            if s.shapes[name][:1] != (s.count,) or s.shapes[name][1:] != first.shapes[name][1:]:
                raise ValueError(f"{s.path.name}: {name} has shape {s.shapes[name]}, expected ({s.count}, "
                                 f"{', '.join(map(str, first.shapes[name][1:]))})")
    end = 0
    for s in sorted(shards, key=lambda s: s.start):
        if s.start != end:
            kind = "overlaps the previous shard" if s.start < end else f"leaves rows [{end}, {s.start}) uncovered"
            raise ValueError(f"{s.path.name} covers rows [{s.start}, {s.start + s.count}), which {kind}")
        end = s.start + s.count
    if end != first.num_items:
        raise ValueError(f"the shards in {directory} cover rows [0, {end}) of num_items={first.num_items}: incomplete")
    return shards


def _read_one(path: Path) -> ShardFile:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a head shard (metadata format={meta.get('format')!r}, want {FORMAT!r})")
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    return ShardFile(path, int(meta["rank"]), int(meta["world"]), int(meta["num_items"]), int(meta["start"]),
                     int(meta["count"]), tuple(json.loads(meta["sharded"])), json.loads(meta["names"]),
                     json.loads(meta["optimizer"]), shapes, dtypes)


def load_resharded(directory: str | os.PathLike[str], plan: ShardPlan,
                   names: Iterable[str] | None = None) -> ShardState:
    """Rows [plan.start, plan.end) of every sharded tensor (read slice by slice from the saved shards
    that overlap them) and the replicated tensors (from the first shard), for any world size."""
    shards = read_index(directory)
    first = shards[0]
    if first.num_items != plan.num_items:
        raise ValueError(f"checkpoint {directory} shards num_items={first.num_items} but the plan has "
                         f"num_items={plan.num_items}; was it saved by a head with another num_classes / sizes?")
    wanted = list(first.shapes) if names is None else list(names)
    unknown = sorted(set(wanted) - set(first.shapes))
    if unknown:
        raise KeyError(f"checkpoint {directory} has no tensors {unknown}; it has {sorted(first.shapes)}")
    out: dict[str, Tensor] = {}
    with safe_open(str(first.path), framework="pt") as f:
        for name in wanted:
            if name not in first.sharded:
                out[name] = f.get_tensor(name)
    for s in shards:
        lo, hi = max(plan.start, s.start), min(plan.end, s.start + s.count)
        if lo >= hi:
            continue
        with safe_open(str(s.path), framework="pt") as f:
            for name in wanted:
                if name in s.sharded:
                    part = f.get_slice(name)[lo - s.start:hi - s.start]
                    if name not in out:
                        out[name] = part.new_empty((plan.count, *part.shape[1:]))
                    out[name][lo - plan.start:hi - plan.start] = part
    return ShardState(plan, out, tuple(n for n in first.sharded if n in wanted), first.names, first.optimizer)


def export_merged(directory: str | os.PathLike[str], out_file: str | os.PathLike[str],
                  single_process_names: bool = True, include_optimizer: bool = False) -> Path:
    """One safetensors file with the full tensors, for inference (e.g. a single-process head's
    load_state_dict). Names are those of the single-process head unless single_process_names=False.
    Streams: one block of <= EXPORT_BLOCK_BYTES rows of one shard in memory at a time."""
    shards = read_index(directory)
    first = shards[0]
    entries = [n for n in first.shapes if include_optimizer or not n.startswith(OPTIM_PREFIX)]
    header: dict[str, Any] = {"__metadata__": {"format": "mhe_scale.head_merged.v1",
                                               "num_items": str(first.num_items), "saved_world": str(first.world)}}
    offset = 0
    for name in entries:
        shape = (first.num_items, *first.shapes[name][1:]) if name in first.sharded else first.shapes[name]
        size = _itemsize(first.dtypes[name]) * _numel(shape)
        key = first.names.get(name, name) if single_process_names else name
        header[key] = {"dtype": first.dtypes[name], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f"{out_file.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in entries:
            sources = [s for s in sorted(shards, key=lambda s: s.start)] if name in first.sharded else [first]
            for s in sources:
                with safe_open(str(s.path), framework="pt") as f:
                    view = f.get_slice(name)
                    shape = s.shapes[name]
                    if name not in s.sharded or len(shape) == 0:
                        out.write(_bytes(f.get_tensor(name)))
                        continue
                    row_bytes = max(1, _itemsize(s.dtypes[name]) * _numel(shape[1:]))
                    step = max(1, EXPORT_BLOCK_BYTES // row_bytes)
                    for i in range(0, shape[0], step):
                        out.write(_bytes(view[i:min(shape[0], i + step)]))
    os.replace(tmp, out_file)
    return out_file


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _itemsize(dtype: str) -> int:
    if dtype not in _ITEMSIZE:
        raise ValueError(f"export_merged: unsupported dtype {dtype}")
    return _ITEMSIZE[dtype]


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _bytes(t: Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---------------------------------------------------------------- heads + optimizers
def _param_names(head: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in head.named_parameters()}


def optimizer_tensors(head: nn.Module, optimizer: torch.optim.Optimizer,
                      sharded: Iterable[str]) -> tuple[dict[str, Tensor], list[str], list[dict[str, Any]]]:
    """Optimizer state of the head's parameters -> (tensors "optim.<param>.<key>", the sharded ones
    (state shaped like a sharded parameter), JSON param groups with parameter names)."""
    names, sharded = _param_names(head), set(sharded)
    tensors: dict[str, Tensor] = {}
    split: list[str] = []
    groups = []
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("the optimizer holds a parameter that is not the head's; give the head its own "
                                 "optimizer (a sharded head must not share one with the replicated backbone)")
            params.append(names[id(p)])
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state {names[id(p)]}.{key} is a {type(value).__name__}, not a tensor")
                full = f"{OPTIM_PREFIX}{names[id(p)]}.{key}"
                tensors[full] = value
                if names[id(p)] in sharded and value.dim() > 0 and value.shape[0] == p.shape[0]:  # per-row state
                    split.append(full)
        groups.append({k: (float(v) if torch.is_tensor(v) else v) for k, v in group.items() if k != "params"}
                      | {"params": params})
    return tensors, split, groups


def save_head_shard(directory: str | os.PathLike[str], head: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """This rank's shard of a sharded head (anything with `plan`, `sharded_parameters`,
    `single_process_names()`: the heads of mhe_scale.parallel) and, optionally, of its optimizer."""
    tensors, sharded = dict(head.state_dict()), list(head.sharded_parameters)  # type: ignore[attr-defined]
    groups = None
    if optimizer is not None:
        extra, split, groups = optimizer_tensors(head, optimizer, sharded)
        tensors.update(extra)
        sharded += split
    return save_shard(directory, head.plan, tensors, sharded, head.single_process_names(), groups)  # type: ignore


def load_head_shard(directory: str | os.PathLike[str], head: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load this rank's rows (for head.plan, whatever world size saved them) into head (strict) and,
    optionally, the optimizer state saved with it."""
    state = load_resharded(directory, head.plan)  # type: ignore[attr-defined]
    head.load_state_dict({k: v for k, v in state.tensors.items() if not k.startswith(OPTIM_PREFIX)})
    if optimizer is None:
        return
    if state.optimizer is None:
        raise ValueError(f"checkpoint {directory} has no optimizer state (saved without an optimizer)")
    names = _param_names(head)
    current = optimizer.state_dict()
    if len(state.optimizer) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint {directory} has {len(state.optimizer)} optimizer param groups, this optimizer "
                         f"{len(optimizer.param_groups)}")
    new_state: dict[int, dict[str, Tensor]] = {}
    groups = []
    indices_per_group = [g["params"] for g in current["param_groups"]]
    for saved, group, indices in zip(state.optimizer, optimizer.param_groups, indices_per_group):
        params = [names.get(id(p), "<not the head's>") for p in group["params"]]
        if params != saved["params"]:
            raise ValueError(f"optimizer param group holds {params}, the checkpoint's {saved['params']}")
        for idx, name in zip(indices, params):
            prefix = f"{OPTIM_PREFIX}{name}."
            entry = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix)}
            if entry:
                new_state[idx] = entry
        groups.append({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"}
                      | {"params": indices})
    optimizer.load_state_dict({"state": new_state, "param_groups": groups})
