"""Entry point: `accelerate launch -m mhe_scale.train CONFIG [key=value ...]` (or `mhe-scale train`).

The launcher decides how many processes run; cfg.dist how they train (DDP or DeepSpeed ZeRO, mixed
precision, trackers: mhe_scale/engine/accelerator.py, launch/README.md).
parse -> build -> train -> close. Everything else lives in tasks/ and engine/.
"""

from __future__ import annotations

import argparse
import sys

from mhe_scale.config import ConfigError, load_config


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
    try:
        if cfg.data.name == "synthetic":
            from mhe_scale.tasks.synthetic import run_synthetic

            run_synthetic(cfg, accelerator)
        elif cfg.data.name == "xc":
            from mhe_scale.tasks.xmc import run_xmc

            run_xmc(cfg, accelerator)
        elif cfg.data.name == "xmc_text":
            from mhe_scale.tasks.xmc_text import run_xmc_text

            run_xmc_text(cfg, accelerator)
        elif cfg.data.name in ("face_recordio", "face_synthetic"):
            from mhe_scale.tasks.face import run_face

            run_face(cfg, accelerator)
        else:
            print(f"error: data.name={cfg.data.name!r} has no task yet; known: synthetic, xc, xmc_text, face_recordio, face_synthetic", file=sys.stderr)
            return 2
    except ConfigError as exc:  # a task found a config value it cannot use (e.g. a placeholder data path)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
