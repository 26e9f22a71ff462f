"""A sampling sharded head's own generator in checkpoints: `head-rng-rank{rank}-of-{W}.safetensors`.

A head that samples (sharded MHS, sharded Partial FC: a `generator` seeded from `sample_seed`)
gets from `save_head_rng` the generator's state (uint8 tensor "state") with format, mode, stream
("shared": per_sample, the same on every rank; "per_rank": block_seed(sample_seed, rank)),
sample_seed, rank, world and device type in the metadata, so that a resumed run keeps drawing
where it stopped. `load_head_rng` restores it exactly on the same world size; on another one a
shared stream comes from rank 0's file and a per-rank stream restarts from the seed (one warning),
as does a checkpoint without these files. Called beside save_head_shard / load_head_shard
(engine.prepared.ShardedHeadTraining); nothing here communicates.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

RNG_FORMAT = "mhe_scale.head_rng.v1"
RNG_FILE = "head-rng-rank{rank}-of-{world}.safetensors"
RNG_PATTERN = re.compile(r"^head-rng-rank(\d+)-of-(\d+)\.safetensors$")


def samples(head: nn.Module) -> bool:
    """True for a head that draws from its own `generator` seeded from `sample_seed` (lazily, by `_generator`)."""
    return hasattr(head, "sample_seed") and callable(getattr(head, "_generator", None))


def _stream(head: nn.Module) -> str:
    """Stream: "shared" (per_sample: one state on every rank) or "per_rank" (seed block_seed(sample_seed, rank))."""
    return "shared" if getattr(head, "mode", None) == "per_sample" else "per_rank"


def _device(head: nn.Module) -> torch.device:
    return next(head.parameters()).device


def save_head_rng(directory: str | os.PathLike[str], head: nn.Module) -> Path | None:
    """Write this rank's `head-rng-rank{r}-of-{W}.safetensors` (atomically); None for a head that does
    not sample. A generator not created yet (no draw so far) is created first, as `_generator` would."""
    if not samples(head):
        return None
    plan = head.plan  # type: ignore[attr-defined]
    generator = head.generator if head.generator is not None else head._generator(_device(head))  # type: ignore
    meta = {"format": RNG_FORMAT, "mode": str(getattr(head, "mode", type(head).__name__)), "stream": _stream(head),
            "sample_seed": str(head.sample_seed), "rank": str(plan.rank), "world": str(plan.world),
            "device": generator.device.type}
    path = Path(directory) / RNG_FILE.format(rank=plan.rank, world=plan.world)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({"state": generator.get_state().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_head_rng(directory: str | os.PathLike[str], head: nn.Module) -> bool:
    """Restore this rank's sampling generator from `directory` (see the module doc). True when the
    saved state was restored; False when the head does not sample or sampling restarts from the
    seed (with one warning, from rank 0). A file that is missing while others of the same world
    size exist, or one that is not a head-rng file, is an error."""
    if not samples(head):
        return False
    directory, plan = Path(directory), head.plan  # type: ignore[attr-defined]
    found = {(int(m.group(1)), int(m.group(2))) for p in directory.glob("head-rng-rank*-of-*.safetensors")
             if (m := RNG_PATTERN.match(p.name))}
    if not found:
        return _reseed(head, f"{directory} holds no {RNG_FILE.format(rank='*', world='*')} (a checkpoint written "
                             "before the head's sampling state was saved)")
    worlds = sorted({w for _, w in found})
    if len(worlds) > 1:
        raise ValueError(f"{directory} mixes head-rng files of world sizes {worlds}; remove the stale ones")
    saved_world = worlds[0]
    if saved_world != plan.world and _stream(head) == "per_rank":
        return _reseed(head, f"the world size changed ({saved_world} -> {plan.world}) and each rank drew its own "
                             f"stream (mode {getattr(head, 'mode', type(head).__name__)!r})")
    source = plan.rank if saved_world == plan.world else 0  # a shared stream: every rank saved the same state
    path = directory / RNG_FILE.format(rank=source, world=saved_world)
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has head-rng files of {saved_world} ranks but not {path.name}: the "
                                "checkpoint is incomplete; resume from another one")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != RNG_FORMAT or "state" not in f.keys():
            raise ValueError(f"{path} is not a head sampler state (metadata format={meta.get('format')!r}, want "
                             f"{RNG_FORMAT!r}, tensor 'state')")
        state = f.get_tensor("state")
    if (meta.get("rank"), meta.get("world")) != (str(source), str(saved_world)):
        raise ValueError(f"{path} says rank {meta.get('rank')} of {meta.get('world')} in its metadata")
    saved = (meta.get("stream"), meta.get("sample_seed"))
    if saved != (_stream(head), str(head.sample_seed)):
        return _reseed(head, f"{path.name} was saved with stream={saved[0]}, sample_seed={saved[1]} and the head "
                             f"now has stream={_stream(head)}, sample_seed={head.sample_seed}")
    device = _device(head)
    if meta.get("device") != device.type:
        return _reseed(head, f"{path.name} holds a {meta.get('device')} generator and the head is on {device.type}")
    generator = torch.Generator(device)
    generator.set_state(state)
    head.generator = generator
    return True


def _reseed(head: nn.Module, why: str) -> bool:
    """Start the head's generator afresh from sample_seed; warn once (rank 0) with the reason."""
    if head.plan.rank == 0:  # type: ignore[attr-defined]
        logger.warning("%s: sampling restarts from the seed (sample_seed=%s) because %s; the draws differ from "
                       "an uninterrupted run", type(head).__name__, head.sample_seed, why)
    head.generator = None
    head._generator(_device(head))  # type: ignore[operator]
    return False
