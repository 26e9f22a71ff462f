"""Run a function in W gloo processes on this machine (for tests of sharded code on CPU).

    def check(group, seed):                 # module-level, so the spawned processes can import it
        rank = get_rank(group)
        ...                                 # collectives on `group`; asserts are fine here
        return {"grad": w.grad}             # anything torch.save can write

    results = run_in_processes(check, 3, 0)  # [result of rank 0, rank 1, rank 2]

Each process is a fresh interpreter, never a fork of the (threaded) test process: it is forked
from a "forkserver" that imported torch once (plain "spawn" where there is none) and gets the
parent's current environment variables. It uses one CPU thread, joins a gloo group on 127.0.0.1
and a free port, and writes its result (or its traceback) to a file in a temporary directory
that the parent reads back. When a rank fails, the others (likely blocked in a
collective) are stopped after a short grace period and the parent raises with every failing
rank's traceback, the first failure first: AssertionError if that rank failed an assert.
Starting a process costs an `import torch` (seconds on a busy 2-core machine): run many checks
per launch, and use `subgroup` to test several world sizes in one launch.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed import ProcessGroup

_PORT_TAKEN = ("address already in use", "eaddrinuse")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def finish_ranks() -> None:
    """End of a torchrun child: every rank waits for the others, then the process group is destroyed before
    the interpreter exits (a rank exiting while a peer's gloo threads still talk to it can abort with
    "terminate called without an active exception"; mhe-scale train does the same before end_training)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def subgroup(ranks: list[int]) -> ProcessGroup | None:
    """A gloo group of the given global ranks; None on ranks outside it.

    Like torch.distributed.new_group, every rank of the world must call it, in the same order.
    Lets one W-process launch also test smaller worlds (spawning costs seconds per process).
    """
    group = dist.new_group(ranks=sorted(ranks), backend="gloo")
    return group if dist.get_rank() in ranks else None


def _worker(rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, env: dict[str, str],
            fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    os.environ.clear()
    os.environ.update(env)  # the forkserver's environment is from when it started
    torch.set_num_threads(1)
    payload: dict[str, Any]
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
        result = fn(dist.group.WORLD, *args)
        dist.barrier()  # rank 0 hosts the store: nobody leaves while others may still need it
        payload = {"ok": True, "result": result}
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        payload = {"ok": False, "assertion": isinstance(err, AssertionError),
                   "traceback": traceback.format_exc(), "time": time.time()}
    path = Path(out_dir) / f"rank{rank}.pt"
    torch.save(payload, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # the parent never reads a half-written file
    if dist.is_initialized() and payload["ok"]:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0 if payload["ok"] else 1)  # skip interpreter teardown that may wait on dead peers


def _context(fn: Callable[..., Any]) -> Any:
    """A "forkserver" context whose server has imported torch and fn's module once, so children
    fork from it instead of each importing torch (measured: 4 processes 24 s -> 6 s on a loaded
    2-core machine); plain "spawn" where forkserver is unavailable."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", __name__, fn.__module__])
    return ctx


def _read(out_dir: str, rank: int) -> dict[str, Any] | None:
    path = Path(out_dir) / f"rank{rank}.pt"
    return torch.load(path, weights_only=False) if path.exists() else None


def _launch(fn: Callable[..., Any], world_size: int, args: tuple[Any, ...], timeout_s: float,
            grace_s: float) -> tuple[list[dict[str, Any] | None], list[int], list[int | None], bool]:
    """Start, watch, collect: (payloads, ranks in failure order, exit codes, timed out)."""
    ctx = _context(fn)
    with tempfile.TemporaryDirectory(prefix="mhe_gloo_") as out_dir:
        port, env = free_port(), dict(os.environ)
        procs = [ctx.Process(target=_worker, args=(r, world_size, port, out_dir, timeout_s, env, fn, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        failed: list[int] = []
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while any(p.is_alive() for p in procs):
            for r, p in enumerate(procs):
                if p.exitcode not in (None, 0) and r not in failed:
                    failed.append(r)
            if failed and deadline > time.monotonic() + grace_s:
                deadline = time.monotonic() + grace_s  # peers are probably stuck in a collective
            if time.monotonic() > deadline:
                timed_out = not failed
                break
            time.sleep(0.02)
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        for r, p in enumerate(procs):
            if p.exitcode != 0 and r not in failed:
                failed.append(r)
        payloads = [_read(out_dir, r) for r in range(world_size)]
        # order by when each rank raised (killed ranks last): the first is usually the cause
        failed.sort(key=lambda r: (payloads[r] or {}).get("time", float("inf")))
        return payloads, failed, [p.exitcode for p in procs], timed_out


def run_in_processes(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                     grace_s: float = 3.0) -> list[Any]:
    """Run fn(group, *args) in `world_size` spawned gloo processes; return their results by rank.

    fn must be importable (module level) and args picklable. timeout_s bounds the whole run (and
    each collective); grace_s is how long the other ranks get once one has failed.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    for attempt in range(3):
        payloads, failed, codes, timed_out = _launch(fn, world_size, args, timeout_s, grace_s)
        if not failed:
            return [p["result"] for p in payloads]  # type: ignore[index]
        reports = []
        for r in failed:
            p = payloads[r]
            if p is None or p["ok"]:
                why = f"timed out after {timeout_s} s" if timed_out else "stopped after a peer failed, or crashed"
                reports.append(f"--- rank {r} of {world_size}: exit code {codes[r]} ({why})")
            else:
                reports.append(f"--- rank {r} of {world_size} raised:\n{p['traceback']}")
        text = "\n".join(reports)
        if attempt < 2 and any(s in text.lower() for s in _PORT_TAKEN):
            continue  # someone took the free port between our probe and rank 0's bind
        first = payloads[failed[0]]
        error = AssertionError if first is not None and first["assertion"] else RuntimeError
        raise error(f"{fn.__name__} failed in {len(failed)} of {world_size} processes (first failure first):\n{text}")
    raise AssertionError("unreachable")
