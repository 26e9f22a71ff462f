"""`mhe-scale plan CONFIG [key=value ...] --gpus N --nodes M --gpu-mem 80GB [--probe]` (docs/planner.md).

Prints the per-rank memory of the config as it stands, ranks set-ups that keep its global batch, writes the
best one's DeepSpeed JSON / accelerate YAML / overrides and prints the launch command; --probe runs the top
set-ups for a few steps and prints predicted vs measured memory and step time.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

from mhe_scale.plan.memory import Breakdown, fmt_bytes

UNITS = {"": 1, "b": 1, "kb": 2 ** 10, "mb": 2 ** 20, "gb": 2 ** 30, "tb": 2 ** 40, "kib": 2 ** 10, "mib": 2 ** 20,
         "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str, flag: str = "--gpu-mem") -> float:
    """'80GB' / '80GiB' / '24g' -> bytes (binary units: GPU memory is sold in GiB and called GB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    unit = (m.group(2).lower() if m else "")
    unit = unit + "b" if unit in ("k", "m", "g", "t") else unit
    if not m or unit not in UNITS:
        raise ValueError(f"{flag}={text!r}: give a size like 80GB, 24GiB or 512MB")
    return float(m.group(1)) * UNITS[unit]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mhe-scale plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted overrides applied before planning, e.g. train.batch_size=64")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) per node")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="80GB", help="memory per GPU (per process on CPU)")
    p.add_argument("--host-mem", default=None, help="host memory per process for offload (default: unchecked)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="what the run trains on")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--out", default="plan", help="folder for deepspeed.json, accelerate.yaml, overrides.txt")
    p.add_argument("--keep-head", action="store_true", help="only set-ups with the config's head")
    p.add_argument("--zero", default=None, help="ZeRO stages to consider, e.g. 2,3 or none,1 (default none,1,2,3)")
    p.add_argument("--precision", default=None, help="precisions to consider: bf16,fp32")
    p.add_argument("--probe", action="store_true", help="run the top set-ups for a few steps and compare")
    p.add_argument("--probe-top", type=int, default=3)
    p.add_argument("--probe-steps", type=int, default=3)
    p.add_argument("--probe-timeout", type=int, default=300, help="seconds per probe run")
    p.add_argument("--probe-overrides", nargs="*", default=[], help="extra overrides for probe runs (small data)")
    args = p.parse_args(argv)
    for flag in ("gpus", "nodes", "top", "probe_top", "probe_steps", "probe_timeout"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


def _stages(text: Optional[str]) -> Optional[list]:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in ("none", "ddp"):
            out.append(None)
        elif part in ("0", "1", "2", "3"):
            out.append(int(part))
        else:
            raise ValueError(f"--zero={text!r}: give stages among none,0,1,2,3, comma-separated")
    return out


def _ds_file(cfg: Any) -> dict[str, Any]:
    path = cfg.dist.deepspeed_config
    if not path:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"dist.deepspeed_config={path}: cannot read it as JSON ({exc})") from exc


def engine_extra(ds: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """EngineSpec fields from a DeepSpeed JSON's zero_optimization section."""
    zero = ds.get("zero_optimization", {})
    names = {"reduce_bucket_size": "reduce_bucket_size", "allgather_bucket_size": "allgather_bucket_size",
             "overlap_comm": "overlap_comm", "stage3_prefetch_bucket_size": "prefetch_bucket_size",
             "stage3_max_live_parameters": "max_live_parameters"}
    return tuple((ours, zero[key]) for key, ours in names.items() if key in zero and zero[key] != "auto")


def base_setup(cfg: Any, world: int, head, ds: dict[str, Any]):
    from mhe_scale.plan.candidates import Setup

    stage = cfg.dist.zero_stage if cfg.dist.zero_stage is not None else (
        ds.get("zero_optimization", {}).get("stage") if ds else None)
    zero = ds.get("zero_optimization", {})
    precision = {"bf16": "bf16", "fp16": "bf16"}.get(cfg.dist.mixed_precision or "no", "fp32")
    ckpt = bool(getattr(cfg.model, "grad_checkpointing", False))
    return Setup(world, cfg.train.batch_size, cfg.train.grad_accum_steps, stage, "offload_optimizer" in zero,
                 "offload_param" in zero, precision, ckpt, head, cfg.head.name if not head.sizes else
                 f"{cfg.head.name} {list(head.sizes)}")


def head_bytes(b: Breakdown) -> float:
    """Device bytes of a breakdown's head terms (weights, gradients, optimizer state, logits of the head)."""
    return sum(t.device for t in b.terms if t.name.startswith("head"))


def check_budget(text: str, budget: float, setups: list, ctx: Any) -> None:
    """ValueError naming --gpu-mem when it cannot hold even the smallest set-up without its head (a unit
    slip such as 1MB for 1GB: every head would 'not fit' a negative budget)."""
    from mhe_scale.plan.candidates import breakdown

    least = min((breakdown(s, ctx) for s in setups), key=lambda b: b.device - head_bytes(b))
    rest = least.device - head_bytes(least)
    if budget <= rest:
        raise ValueError(f"--gpu-mem={text} ({fmt_bytes(budget)} per rank) is less than the smallest set-up needs "
                         f"besides its head ({fmt_bytes(rest)}: encoder, optimizer state, activations, buffers); "
                         "give the memory of one GPU (e.g. --gpu-mem 80GB), or of one process with --device cpu")


def format_breakdown(b: Breakdown) -> str:
    lines = [f"  {'term':22s} {'device':>11s} {'host':>11s}   formula"]
    for t in b.terms:
        lines.append(f"  {t.name:22s} {fmt_bytes(t.device):>11s} {fmt_bytes(t.host):>11s}   {t.formula}")
    lines.append(f"  {'total':22s} {fmt_bytes(b.device):>11s} {fmt_bytes(b.host):>11s}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from mhe_scale.config import ConfigError, load_config

    args = parse_args(argv)
    try:
        return _main(args, load_config(args.config, args.overrides))
    except (ConfigError, ValueError, OSError) as exc:  # OSError: --out cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, cfg: Any) -> int:
    from mhe_scale.plan.advice import format_costs, head_costs, recommend
    from mhe_scale.plan.candidates import PlanContext, breakdown, enumerate_setups, rank
    from mhe_scale.plan.shapes import backbone_shape, head_spec
    from mhe_scale.plan.writer import check_out_dir, write_setup

    check_out_dir(args.out)
    budget = parse_size(args.gpu_mem)
    host = parse_size(args.host_mem, "--host-mem") if args.host_mem else None
    world = args.gpus * args.nodes
    shape = backbone_shape(cfg)
    head = head_spec(cfg, shape, world)
    ds = _ds_file(cfg)
    can_ckpt = hasattr(cfg.model, "grad_checkpointing")
    base = base_setup(cfg, world, head, ds)
    lines = {}
    for prec in ("fp32", "bf16"):
        for ckpt in ((False, True) if can_ckpt else (base.checkpointing,)):
            lines[(prec, ckpt)] = _activation_line(cfg, prec, ckpt)
    ctx = PlanContext(shape.params, shape.largest_layer, lines, cfg.optim.name, cfg.optim.momentum, args.device,
                      engine_extra(ds), can_checkpoint=can_ckpt, gpus_per_node=args.gpus,
                      head_momentum=cfg.optim.head_momentum)
    now = breakdown(base, ctx)
    costs = head_costs(shape.num_classes, shape.dim, world, base.micro_batch, cfg.optim.name, shape.multilabel)
    others = now.device - head_bytes(now)
    setups = enumerate_setups(base, ctx, heads=not args.keep_head, stages=_stages(args.zero),
                              precisions=args.precision.split(",") if args.precision else None)
    ranked = rank(setups, ctx, budget, base, host)
    check_budget(args.gpu_mem, budget, [r.setup for r in ranked], ctx)
    print(f"{args.config}: task {cfg.task}, encoder {shape.params:,} parameters (largest layer {shape.largest_layer:,}),"
          f" D={shape.dim}, C={shape.num_classes:,}, head {base.head_label}"
          f"{' (class-sharded)' if head.sharded else ''}; {world} ranks x {fmt_bytes(budget)}, global batch "
          f"{base.global_batch}")
    print(f"\nper-rank memory as configured ({base.describe()}):\n{format_breakdown(now)}")
    print(f"\nheads at C={shape.num_classes:,}, D={shape.dim}, W={world}, b={base.micro_batch}:\n{format_costs(costs)}")
    if others < budget:
        print("advice: " + recommend(costs, budget - others))
    else:
        print(f"advice: the run as configured needs {fmt_bytes(others)} per rank besides its head, more than "
              f"{fmt_bytes(budget)}: no head fits that set-up; the set-ups below change ZeRO, offload or precision")
    print(f"\n{len(setups)} set-ups with global batch {base.global_batch}; best {min(args.top, len(ranked))}:")
    print(f"  {'#':>2s} {'peak/rank':>10s} {'host':>9s} {'fits':4s} {'cost':>5s}  set-up")
    for i, r in enumerate(ranked[:args.top], 1):
        print(f"  {i:2d} {fmt_bytes(r.peak):>10s} {fmt_bytes(r.host):>9s} {'yes' if r.fits else 'NO':4s} "
              f"{r.cost:5.2f}  {r.setup.describe()}")
    best = ranked[0]
    if not best.fits:
        print(f"\nnothing fits {fmt_bytes(budget)} per rank; writing the smallest anyway")
        best = min(ranked, key=lambda r: r.peak)
    from mhe_scale.plan.candidates import run_spec

    files = write_setup(best.setup, base, args.out, args.config, list(args.overrides),
                        float(cfg.train.clip_grad_norm or 0.0), run_spec(best.setup, ctx).engine, args.gpus, args.nodes,
                        can_ckpt)
    print(f"\nchosen: {best.setup.describe()}\n{format_breakdown(breakdown(best.setup, ctx))}")
    print(f"\nwrote {', '.join(str(p) for p in (files.deepspeed, files.accelerate, files.overrides) if p)}")
    print(f"launch:\n  {files.command}")
    if args.probe:
        from mhe_scale.plan.probe import format_probe, probe_setups

        rows = probe_setups([r.setup for r in ranked[:args.probe_top]], base, ctx, args, cfg)
        print("\n" + format_probe(rows))
    return 0


def _activation_line(cfg: Any, precision: str, checkpointing: bool):
    """The meta-device activation line of cfg's encoder with model.grad_checkpointing set as asked
    (cfg is read-only: a copy with the flag flipped is built when it differs)."""
    from mhe_scale.plan.shapes import meta_activation_line

    if getattr(cfg.model, "grad_checkpointing", checkpointing) == checkpointing:
        return meta_activation_line(cfg, precision)
    from omegaconf import OmegaConf

    other = OmegaConf.to_container(cfg, resolve=True)
    other["model"]["grad_checkpointing"] = checkpointing
    return meta_activation_line(_as_cfg(cfg, other), precision)


def _as_cfg(cfg: Any, data: dict) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.structured(type(OmegaConf.to_object(cfg))), data)
