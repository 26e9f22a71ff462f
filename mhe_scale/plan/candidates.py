"""Candidate set-ups that keep a config's global batch, each priced by the memory model and ranked.

    base = Setup.from_config(cfg, world=8)
    ranked = rank(enumerate_setups(base, ctx), ctx, budget_bytes=80 * GiB)

A Setup is everything the planner may change: world size, micro-batch (with the gradient accumulation that
keeps global batch = b * accum * W), ZeRO stage, offload, precision, activation checkpointing and the head.
Ranking: set-ups that fit first; among them the ones that keep the config's head (a head change changes the
model), then those on the machines asked for (--gpus x --nodes), then the smallest relative step time
(RELATIVE_COST), then the fewest changes, then the smallest peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from mhe_scale.plan.advice import head_options
from mhe_scale.plan.memory import ActivationLine, Breakdown, EngineSpec, HeadSpec, RunSpec, estimate

RELATIVE_COST = {"checkpointing": 1.33, "offload_optimizer": 1.6, "offload_param": 2.0, "zero3": 1.1, "fp32": 2.0}
"""Rough step-time factors (a recomputed forward is ~1/3 of a step; a CPU optimizer step and PCIe traffic for
offload; ZeRO-3's extra all-gathers; fp32 vs bf16 tensor cores). Used only to order set-ups that fit;
`--probe` measures the real times."""


@dataclass(frozen=True)
class Setup:
    world: int
    micro_batch: int
    accum: int
    zero_stage: Optional[int]
    offload_optimizer: bool
    offload_param: bool
    precision: str
    checkpointing: bool
    head: HeadSpec
    head_label: str

    @property
    def global_batch(self) -> int:
        return self.world * self.micro_batch * self.accum

    def describe(self) -> str:
        off = "opt+param" if self.offload_param else ("opt" if self.offload_optimizer else "-")
        zero = "ddp" if self.zero_stage is None else f"zero{self.zero_stage}"
        return (f"W={self.world} b={self.micro_batch}x{self.accum} {zero} offload={off} {self.precision} "
                f"ckpt={'on' if self.checkpointing else 'off'} head={self.head_label}")


@dataclass(frozen=True)
class PlanContext:
    """Facts the candidates share: the encoder's size, the activation lines by (precision, checkpointing),
    the engine's bucket settings, the optimizer, the device kind."""

    backbone_params: int
    largest_layer: int
    activations: dict[tuple[str, bool], ActivationLine]
    optimizer: str = "adamw"
    momentum: float = 0.9
    device: str = "cuda"
    engine_extra: tuple[tuple[str, Any], ...] = ()
    """EngineSpec fields read from the config's DeepSpeed JSON (bucket sizes, overlap_comm)."""
    fixed_bytes: Optional[float] = None
    can_checkpoint: bool = False
    gpus_per_node: int = 1
    process_group_bytes: Optional[float] = None
    """Per-rank cost of a W > 1 process group (None: the memory model's default for the device)."""
    saves_checkpoints: bool = True
    head_momentum: Optional[float] = None
    """sgd momentum of a class-sharded head (optim.head_momentum; None: momentum)."""


def run_spec(s: Setup, ctx: PlanContext) -> RunSpec:
    engine = EngineSpec(zero_stage=s.zero_stage, precision=s.precision, optimizer=ctx.optimizer, momentum=ctx.momentum,
                        head_momentum=ctx.head_momentum,
                        offload_optimizer=s.offload_optimizer, offload_param=s.offload_param, device=ctx.device,
                        activation_checkpointing=s.checkpointing, **dict(ctx.engine_extra))
    return RunSpec(ctx.backbone_params, ctx.largest_layer, engine, s.head, s.world, s.micro_batch,
                   ctx.activations.get((s.precision, s.checkpointing)), ctx.fixed_bytes, ctx.process_group_bytes,
                   ctx.saves_checkpoints)


def breakdown(s: Setup, ctx: PlanContext) -> Breakdown:
    return estimate(run_spec(s, ctx))


def relative_cost(s: Setup) -> float:
    """Rough step time relative to bf16 ZeRO-0/1/2 without offload or checkpointing (see RELATIVE_COST);
    small micro-batches pay a per-micro-step overhead: x (1 + 0.5 / sqrt(b)) (b=1 1.5x, b=32 1.09x, b=512 1.02x)."""
    cost = 1.0
    if s.checkpointing:
        cost *= RELATIVE_COST["checkpointing"]
    if s.offload_param:
        cost *= RELATIVE_COST["offload_param"]
    elif s.offload_optimizer:
        cost *= RELATIVE_COST["offload_optimizer"]
    if s.zero_stage == 3:
        cost *= RELATIVE_COST["zero3"]
    if s.precision == "fp32":
        cost *= RELATIVE_COST["fp32"]
    return cost * (1.0 + 0.5 / s.micro_batch ** 0.5)


def _divisors_micro(per_rank: int) -> list[int]:
    """Micro-batches b dividing the per-rank batch: powers of two and the per-rank batch itself."""
    out = {per_rank}
    b = 1
    while b < per_rank:
        if per_rank % b == 0:
            out.add(b)
        b *= 2
    return sorted(out)


def enumerate_setups(base: Setup, ctx: PlanContext, heads: bool = True, stages: Optional[list] = None,
                     precisions: Optional[list[str]] = None, worlds: Optional[list[int]] = None) -> list[Setup]:
    """Every combination that keeps base.global_batch (worlds default: base.world and x2 / /2 in whole nodes)."""
    g = base.global_batch
    node = max(ctx.gpus_per_node, 1)
    if worlds is None:
        worlds = sorted({w for w in (base.world // 2, base.world, base.world * 2) if w >= 1 and w % node == 0
                         and g % w == 0} | {base.world})
    stages = stages if stages is not None else [None, 1, 2, 3]
    precisions = precisions or (["bf16", "fp32"] if base.precision != "fp32" else ["fp32", "bf16"])
    out: list[Setup] = []
    for world in worlds:
        if g % world:
            continue
        head_list = [(base.head_label, replace(base.head, sharded=base.head.sharded and world > 1))]
        if heads:
            head_list += [(label, spec) for label, spec in head_options(base.head.num_classes, base.head.dim, world,
                                                                        base.head.multilabel)
                          if label != base.head_label]
        for b in _divisors_micro(g // world):
            for stage in stages:
                offloads = [(False, False)] + ([(True, False)] if stage else []) + ([(True, True)] if stage == 3 else [])
                for off_opt, off_param in offloads:
                    for prec in precisions:
                        for ckpt in ([False, True] if ctx.can_checkpoint else [base.checkpointing]):
                            for label, spec in head_list:
                                out.append(Setup(world, b, g // (world * b), stage, off_opt, off_param, prec, ckpt,
                                                 spec, label))
    return out


@dataclass(frozen=True)
class Ranked:
    setup: Setup
    peak: float
    host: float
    fits: bool
    cost: float
    changes: tuple[str, ...]


def changes(s: Setup, base: Setup) -> tuple[str, ...]:
    """What differs from the config as it stands (names used in the table)."""
    out = []
    for name in ("world", "micro_batch", "zero_stage", "offload_optimizer", "offload_param", "precision",
                 "checkpointing", "head_label"):
        if getattr(s, name) != getattr(base, name):
            out.append(name)
    return tuple(out)


def rank(setups: list[Setup], ctx: PlanContext, budget_bytes: float, base: Setup,
         host_budget: Optional[float] = None) -> list[Ranked]:
    """Setups priced and ordered: fitting ones first, config's head before others, the asked world size before
    others, then cost, fewest changes, peak."""
    ranked = []
    for s in setups:
        b = breakdown(s, ctx)
        fits = b.device <= budget_bytes and (host_budget is None or b.host <= host_budget)
        ranked.append(Ranked(s, b.device, b.host, fits, relative_cost(s), changes(s, base)))
    ranked.sort(key=lambda r: (not r.fits, r.setup.head_label != base.head_label, r.setup.world != base.world,
                               round(r.cost, 3), len(r.changes), r.peak))
    return ranked
