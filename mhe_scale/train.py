"""Entry point: `accelerate launch -m mhe_scale.train CONFIG [key=value ...]` (or `mhe-scale train`).

The launcher decides how many processes run; cfg.dist how they train (DDP or DeepSpeed ZeRO, mixed
precision, trackers: mhe_scale/engine/accelerator.py, launch/README.md).
parse -> look the task up (mhe_scale/tasks/registry.py) -> run it -> close. Everything else lives in
tasks/ and engine/.
"""

from __future__ import annotations

import argparse
import os
import sys

from mhe_scale.config import ConfigError, load_config

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, IsADirectoryError,
               PermissionError)
"""Errors that tasks, readers and the head factory raise with a message naming the key / file and the
fix; train prints them as one `error: ...` line (set MHE_TRACEBACK=1 for the traceback)."""


def one_line(exc: BaseException) -> str:
    """The message of a user-facing error on one line. An error raised in a DataLoader worker comes back
    as "Caught X in DataLoader worker process N. Original Traceback ... X: message": keep the message."""
    text = str(exc)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mhe-scale train", description=__doc__)
    parser.add_argument("config", help="experiment YAML, e.g. configs/demo/mhp_synthetic.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. head.sizes=[317,316] optim.lr=0.1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch

    from mhe_scale.engine.accelerator import build_accelerator

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    try:
        accelerator = build_accelerator(cfg.dist, cfg.train)
    except (ValueError, RuntimeError) as exc:  # a config / launcher mismatch, named in the message
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mhe_scale.tasks.registry import get_task

    task = get_task(cfg.task)
    try:
        task.run(cfg, accelerator)
        # end_training destroys the process group without a barrier: a rank that got there first tore gloo
        # down while another still worked, and aborted at exit ("terminate called without an active
        # exception", SIGABRT) after the run had finished. Wait for every process first.
        accelerator.wait_for_everyone()
    except USER_ERRORS as exc:  # bad data, a head that does not fit, a refused setting: one line, not a traceback
        if os.environ.get("MHE_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a collective's timeout: name the rank that did not answer (dist.timeout_s)
        from mhe_scale.engine.accelerator import explain_timeout

        explained = explain_timeout(exc, cfg.dist.timeout_s)
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr)
        return 3
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
