"""Entry point: `accelerate launch -m mhe_scale.train CONFIG [key=value ...]` (or `mhe-scale train`).

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
    from accelerate import Accelerator

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        if cfg.data.name == "synthetic":
            from mhe_scale.tasks.synthetic import run_synthetic

            run_synthetic(cfg, accelerator)
        else:
            print(f"error: data.name={cfg.data.name!r} has no task yet; known: synthetic", file=sys.stderr)
            return 2
    finally:
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
