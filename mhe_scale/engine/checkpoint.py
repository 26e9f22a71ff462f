"""Atomic, pickle-free training checkpoints (safetensors + JSON) with a verified manifest.

Layout of `<root>/step-00001200/` (the step is the number of optimizer steps taken):
    model.safetensors            unwrapped model state_dict (tied tensors stored once)
    optimizer.safetensors        optimizer tensors; header metadata "structure" = JSON of the rest
    ema.safetensors              EMA shadows (only when EMA is on)
    rng-rank00000.safetensors    per process: torch (+ CUDA) RNG tensors; numpy / python in metadata
    trainer_state.json           step, epoch, batch_in_epoch, sampler_seed, world size, scheduler
    <extra files>                written by ExtraState.save on every rank (e.g. per-rank head shards)
    manifest.json                written LAST: step + size and SHA-256 of every other file

Writing: everything goes into `ckpt-00001200.tmp-<pid>`, files are fsynced, the manifest is
written, then one `os.rename` publishes `step-00001200` (and the parent folder is fsynced), so a
reader never sees a half-written step folder. Reading picks the newest folder whose manifest
verifies, warning about each corrupt or truncated one it skips. Loading only ever calls
safetensors and json: nothing is unpickled, so a checkpoint from elsewhere cannot run code.
Multi-process: the main process writes the replicated state, every process writes its RNG file
and runs the ExtraState hooks into the same temporary folder, with barriers in between.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from mhe_scale.engine.ema import ExponentialMovingAverage
from mhe_scale.engine.serialize import (capture_rng, decode_json, encode_json, flatten_optimizer_state,
                                        named_safetensors, restore_rng, unflatten_optimizer_state)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
STALE = re.compile(r"^(ckpt-\d{8,}\.tmp-\d+|step-\d{8,}\.old-\d+)$")


@dataclass(frozen=True)
class ExtraState:
    """State outside the replicated model, saved and loaded by EVERY process into the checkpoint
    folder (e.g. a class-sharded head writes `head-shard-{r}-of-{W}.safetensors`, its rows and class
    range).
    Files they write are covered by the manifest. `save(dir)` runs after the barrier that follows
    the folder's creation; `load(dir)` runs after the model and optimizer are restored."""

    name: str
    save: Callable[[Path], None]
    load: Callable[[Path], None]


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps taken and the data position of the next step."""

    step: int
    epoch: int
    batch_in_epoch: int
    """Optimizer steps already taken in `epoch` (the next one reads global batch number this)."""
    sampler_seed: int


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Published step folders under root, newest first (unverified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


# ---------------------------------------------------------------- files, manifest, verification
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int, world_size: int) -> None:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(folder)}
    manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
                "written_unix": time.time(), "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    _fsync(tmp)
    os.rename(tmp, folder / MANIFEST)
    _fsync(folder)


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if every file listed in the manifest is present with its size and SHA-256, else why not."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        step = int(manifest["step"])
    except FileNotFoundError:
        return "no manifest.json (never finished writing)"
    except (ValueError, KeyError, TypeError) as exc:
        return f"manifest.json is unreadable ({exc})"
    match = STEP_DIR.match(folder.name)
    if match and int(match.group(1)) != step:
        return f"manifest says step {step} but the folder is named {folder.name}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if _sha256(path) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupted)"
    return None


def find_resumable(root: str | Path) -> Path | None:
    """Newest step folder under root whose manifest verifies; logs a warning for each one skipped."""
    for step, path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("checkpoint %s is unusable: %s; skipping it and trying an older one", path, problem)
    return None


def clean_incomplete(root: str | Path) -> list[Path]:
    """Delete half-written `ckpt-*.tmp-<pid>` (and leftover `step-*.old-<pid>`) folders; main process only."""
    root = Path(root)
    stale = [p for p in root.iterdir() if p.is_dir() and STALE.match(p.name)] if root.is_dir() else []
    for path in stale:
        logger.warning("removing incomplete checkpoint folder %s (a save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune(root: str | Path, keep_last: int) -> None:
    """Keep the newest keep_last step folders (0 keeps all)."""
    if keep_last > 0:
        for _, path in list_checkpoints(root)[keep_last:]:
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- save and load
@dataclass
class TrainingState:
    """The live objects a checkpoint restores; `model` is the unwrapped module (not DDP)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    ema: ExponentialMovingAverage | None = None


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path),
              metadata=None if meta is None else {"json": json.dumps(meta)})
    _fsync(path)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], Any]:
    with named_safetensors(path), safe_open(str(path), framework="pt", device="cpu") as f:
        meta = (f.metadata() or {}).get("json")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, None if meta is None else json.loads(meta)


def _main_pid(accelerator) -> int:
    """The main process's pid, known to every process (names the shared temporary folder)."""
    pid = torch.tensor([os.getpid()], dtype=torch.int64, device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        pid = broadcast(pid, from_process=0)
    return int(pid.item())


def save_checkpoint(root: str | Path, progress: Progress, state: TrainingState, accelerator,
                    keep_last: int = 0, extras: Sequence[ExtraState] = (),
                    info: dict[str, Any] | None = None) -> Path:
    """Write `<root>/step-XXXXXXXX` atomically (see the module doc); every process must call it."""
    root = Path(root)
    main = accelerator.is_main_process
    pid = _main_pid(accelerator)
    tmp = root / f"ckpt-{progress.step:08d}.tmp-{pid}"
    final = root / checkpoint_name(progress.step)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    _write_tensors(tmp / f"rng-rank{accelerator.process_index:05d}.safetensors", *capture_rng())
    for extra in extras:
        extra.save(tmp)
    if main:
        save_model(state.model, str(tmp / "model.safetensors"))
        _write_tensors(tmp / "optimizer.safetensors", *flatten_optimizer_state(state.optimizer.state_dict()))
        if state.ema is not None:
            _write_tensors(tmp / "ema.safetensors", state.ema.state_dict())
        trainer = {"format": FORMAT_VERSION, **asdict(progress), "world_size": accelerator.num_processes,
                   "scheduler": None if state.scheduler is None else state.scheduler.state_dict(),
                   "info": info or {}}
        (tmp / "trainer_state.json").write_text(json.dumps(encode_json(trainer), indent=1))
    accelerator.wait_for_everyone()
    if main:
        for path in _files(tmp):  # includes other processes' files: the page cache is shared
            _fsync(path)
        write_manifest(tmp, progress.step, accelerator.num_processes)
        old = root / f"{final.name}.old-{pid}" if final.exists() else None
        if old is not None:  # e.g. a corrupt step folder that was skipped on resume
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(folder: str | Path, state: TrainingState, accelerator,
                    extras: Sequence[ExtraState] = ()) -> Progress:
    """Restore `state` (and this process's RNG and extras) from a verified step folder.

    Reads safetensors and JSON only; never unpickles. Every process calls it."""
    folder = Path(folder)
    trainer = decode_json(json.loads((folder / "trainer_state.json").read_text()))
    if trainer.get("format") != FORMAT_VERSION:
        raise ValueError(f"{folder}: checkpoint format {trainer.get('format')!r} is not {FORMAT_VERSION}; "
                         "it was written by another version of mhe_scale")
    try:
        with named_safetensors(folder / "model.safetensors"):
            load_model(state.model, str(folder / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"{folder}/model.safetensors does not fit the model being trained (was the model "
                           f"config changed since it was saved?): {exc}") from exc
    state.optimizer.load_state_dict(unflatten_optimizer_state(*_read_tensors(folder / "optimizer.safetensors")))
    if state.scheduler is not None and trainer["scheduler"] is not None:
        state.scheduler.load_state_dict(trainer["scheduler"])
    if state.ema is not None:
        if (folder / "ema.safetensors").is_file():
            with named_safetensors(folder / "ema.safetensors"):
                state.ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
        else:
            logger.warning("%s holds no EMA weights; the EMA restarts from the restored weights", folder)
            state.ema.reset()
    rng_file = folder / f"rng-rank{accelerator.process_index:05d}.safetensors"
    if rng_file.is_file():
        restore_rng(*_read_tensors(rng_file))
    else:
        logger.warning("%s has no RNG state for process %d (saved by %d processes); random streams will differ "
                       "from an uninterrupted run", folder, accelerator.process_index, trainer["world_size"])
    for extra in extras:  # their files are theirs to name; a bare safetensors error at least names the part
        with named_safetensors(f"{folder} (the files of its {extra.name!r} state)"):
            extra.load(folder)
    return Progress(trainer["step"], trainer["epoch"], trainer["batch_in_epoch"], trainer["sampler_seed"])


def find_resumable_everywhere(root: str | Path, accelerator) -> Path | None:
    """Main process removes stale temporary folders and picks the newest valid checkpoint; every
    process gets the same answer (one verification, not one per process)."""
    step = -1
    if accelerator.is_main_process:
        clean_incomplete(root)
        found = find_resumable(root)
        step = -1 if found is None else int(STEP_DIR.match(found.name).group(1))  # type: ignore[union-attr]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        step = int(broadcast(torch.tensor([step], device=accelerator.device), from_process=0).item())
    accelerator.wait_for_everyone()
    return None if step < 0 else Path(root) / checkpoint_name(step)
