"""Which head fits, and what each costs, for C classes, D-dim features, W ranks (pure; docs/planner.md).

    for row in head_costs(C=2_059_906, D=512, world=8, micro_batch=128): print(row)

Rule for MHC's number of groups G (two levels, K candidate groups per row in training): scoring a row costs
G group logits + K * ceil(C / G) candidate labels, smallest at G = sqrt(K * C); `mhc_groups` rounds that to a G
the labels fill exactly (ceil(C / ceil(C / G)) = G). The group layer then holds D * G parameters, small
next to the C * hidden label table.
Full FC is the right answer when it fits: it is exact, and at small C the MHE heads save nothing:
MHC carries a D * hidden projection and a C * hidden table (with hidden = 300 it is larger than D * C as soon
as C < ~hidden + G), MHP's D * sum(c_h) only wins once sum(c_h) << C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mhe_scale.plan.memory import (HeadSpec, default_sizes, fmt_bytes, head_logit_shape, head_params, logit_copies,
                                   optimizer_bytes)


def mhc_groups(num_classes: int, top_k: int = 10) -> int:
    """G for a two-level MHC head: ~sqrt(K * C), moved to the nearest G that ceil(C / G)-sized groups fill exactly."""
    c = int(num_classes)
    target = max(2, min(c, round(math.sqrt(max(top_k, 1) * c))))
    return -(-c // -(-c // target))  # groups actually filled by members of size ceil(C / target)


@dataclass(frozen=True)
class HeadCost:
    label: str
    spec: HeadSpec
    params: int
    """Parameters on the rank holding the most."""
    state_bytes: float
    """fp32 weights + grads + optimizer state of those parameters."""
    logits_bytes: float
    """fp32 logits (and their softmax and grad) of one training step at the micro-batch."""

    @property
    def total(self) -> float:
        return self.state_bytes + self.logits_bytes


MHS_GROUP_SIZE = 32
"""Members per group of the small-groups MHS option (c_2): a batch of B rows then scores about
min(B, C / c_2) x c_2 columns, narrower than Partial FC's r x C at large C (docs/benchmarks.md)."""


def head_options(num_classes: int, dim: int, world: int, multilabel: bool = False,
                 hidden: int = 300, top_k: int = 10) -> list[tuple[str, HeadSpec]]:
    """The heads the planner weighs: fc, partial_fc 0.1/0.2/0.3, mhp H=2/3, mhc (G by mhc_groups), mhs H=2 with square
    groups and (C >= 4 * 32^2) with groups of MHS_GROUP_SIZE members; the
    class-sharded partial_fc / mhc / mhs update row-sparsely, as optim.head_update=auto (the default) does."""
    c, shard = num_classes, world > 1
    out = [("fc", HeadSpec("fc", c, dim, sharded=shard, multilabel=multilabel))]
    if not multilabel:
        out += [(f"partial_fc {r}", HeadSpec("partial_fc", c, dim, sharded=shard, sample_rate=r,
                                                             row_sparse=shard)) for r in (0.1, 0.2, 0.3)]
    for h in (2, 3):
        if c >= 2 ** h:
            sizes = default_sizes(c, h)
            out.append((f"mhp {list(sizes)}", HeadSpec("mhp", c, dim, sizes=sizes, multilabel=multilabel)))
    if c >= 4:
        g = mhc_groups(c, top_k if multilabel else 1)
        sizes = (g, -(-c // g))
        out.append((f"mhc G={g}", HeadSpec("mhc", c, dim, sizes=sizes, sharded=shard, hidden=hidden, top_k_groups=top_k,
                                           multilabel=multilabel, row_sparse=shard)))
    if not multilabel and c >= 4:
        small = (-(-c // MHS_GROUP_SIZE), MHS_GROUP_SIZE)  # many small groups: the narrow softmax (docs/face.md)
        for sizes in (default_sizes(c, 2),) + ((small,) if c >= 4 * MHS_GROUP_SIZE ** 2 else ()):
            out.append((f"mhs {list(sizes)}", HeadSpec("mhs", c, dim, sizes=sizes, sharded=shard, mode="batch_union",
                                                       num_sampled_groups=1, row_sparse=shard)))
    return out


def head_cost(label: str, spec: HeadSpec, world: int, micro_batch: int, optimizer: str = "sgd") -> HeadCost:
    n = head_params(spec, world)
    rows, cols, _ = head_logit_shape(spec, world, micro_batch)
    return HeadCost(label, spec, n, (8 + optimizer_bytes(optimizer)) * n, logit_copies(spec) * 4 * rows * cols)


def head_costs(num_classes: int, dim: int, world: int, micro_batch: int, optimizer: str = "sgd",
               multilabel: bool = False, hidden: int = 300) -> list[HeadCost]:
    """HeadCost of every option of head_options, in that order."""
    return [head_cost(label, spec, world, micro_batch, optimizer)
            for label, spec in head_options(num_classes, dim, world, multilabel, hidden)]


def recommend(costs: list[HeadCost], budget_bytes: float) -> str:
    """One line: full FC when it fits the head's budget, else the cheapest head that does."""
    fc = next(c for c in costs if c.label == "fc")
    cheapest = min(costs, key=lambda c: c.total)
    if fc.total <= budget_bytes:
        extra = "" if cheapest.label == "fc" else f" (the cheapest, {cheapest.label}, saves {_gib(fc.total - cheapest.total)})"
        return f"full FC fits ({_gib(fc.total)} per rank): use it, it is exact{extra}"
    fitting = [c for c in costs if c.total <= budget_bytes]
    if not fitting:
        return f"no head fits {_gib(budget_bytes)}; the cheapest is {cheapest.label} at {_gib(cheapest.total)}: add ranks"
    best = min(fitting, key=lambda c: c.total)
    return f"full FC needs {_gib(fc.total)} > {_gib(budget_bytes)}; {best.label} fits at {_gib(best.total)}"


def _gib(n: float) -> str:
    return fmt_bytes(n)


def format_costs(costs: list[HeadCost]) -> str:
    lines = [f"{'head':28s} {'params/rank':>14s} {'weights+grad+opt':>17s} {'logits/step':>12s} {'total':>10s}"]
    for c in costs:
        lines.append(f"{c.label:28s} {c.params:>14,d} {_gib(c.state_bytes):>17s} {_gib(c.logits_bytes):>12s} "
                     f"{_gib(c.total):>10s}")
    return "\n".join(lines)
