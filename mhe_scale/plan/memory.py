"""Per-rank training memory of an encoder + head run, in closed form (pure: no process group, no tensors).

    run = RunSpec(backbone_params=25e6, largest_layer_params=2.4e6, engine=EngineSpec(zero_stage=2, precision="bf16"),
                  head=HeadSpec("partial_fc", num_classes=2_059_906, dim=512, sample_rate=0.2, sharded=True),
                  world=8, micro_batch=128, activations=ActivationLine(0, 90e6))
    breakdown = estimate(run)     # .terms: [Term(name, device_bytes, host_bytes, formula, source)], .device, .host

Notation: psi = parameters inside the DeepSpeed engine (encoder, plus a head that is not class-sharded),
L = the largest layer's parameters, N = world size (data-parallel ranks), p = bytes of a 16-bit/32-bit
parameter in the engine's precision (2 bf16/fp16, 4 fp32), K = optimizer-state bytes per parameter
(Adam/AdamW 8: exp_avg + exp_avg_sq in fp32; SGD with momentum 4; plain SGD 0), b = micro-batch per rank.
Every term carries its formula and its source (docs/planner.md lists them all).

Backbone model states follow DeepSpeed's own accounting (runtime/zero/stage_1_and_2.py and stage3.py,
`estimate_zero2/3_model_states_mem_needs`: "2 = params_16bit, 18 = 2 grads_16bit + 4 grads_32bit +
4 params_32bit + 8 optimizer states"), generalised to ZeRO-0/1, fp32 and SGD:
  ZeRO-1  params p*psi, grads p*psi,   fp32 master 4*psi/N, fp32 grad partition 4*psi/N, optimizer K*psi/N
  ZeRO-2  params p*psi, grads p*psi/N, the rest as ZeRO-1
  ZeRO-3  params p*psi/N, fp32 master / grad partition / optimizer /N, live parameters (p + p)*L
  ZeRO-0  (DeepSpeed without partitioning) bf16: BF16_Optimizer keeps params 2*psi, grads 2*psi, a full fp32
          grad buffer 4*psi and partitions master + optimizer (4 + K)*psi/N; fp32: params, grads, optimizer whole
  none    (accelerate DDP / one process, fp32 weights) params 4*psi, grads 4*psi, optimizer K*psi, DDP's
          flat gradient buckets 4*psi when N > 1, autocast's bf16 weight copies 2*psi with bf16.
  offload_optimizer moves master, fp32 grads, optimizer state (and ZeRO-2's grad partitions) to the host;
  offload_param (ZeRO-3) moves the 16-bit parameter partition there too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

MiB = 2 ** 20
GiB = 2 ** 30
OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
LOGIT_COPIES = 3
"""fp32 [rows, cols] tensors alive per head logits matrix at the backward's peak: the logits, the softmax
(exp) that cross-entropy saves, and the logits' gradient (margins act in place on the target column)."""
SHARDED_LOGIT_COPIES = 2
"""The same for a class-sharded fc / mhs (parallel/losses.py sharded_cross_entropy): the softmax is computed
in place and saved once, the gradient is one more; the logits die after the forward."""
COSINE_LOGIT_COPIES = 4
"""The same for cosine logits with a margin (partial_fc; fc with cosine=True), sharded or not: the cosines
(heads/linear.py cosine_similarity saves only its scaled product), the margin's output and the softmax with
its gradient."""


def logit_copies(head: "HeadSpec") -> int:
    """fp32 [rows, cols] copies of the head's logits at the backward's peak (measured on the real heads with a
    live-storage counter, tests/test_plan_memory.py): cosine 4, class-sharded fc / mhs 2, else 3."""
    if head.name == "partial_fc" or head.cosine:
        return COSINE_LOGIT_COPIES
    if head.sharded and head.name in ("fc", "mhs"):
        return SHARDED_LOGIT_COPIES
    return LOGIT_COPIES
CATCH_UP_COPIES = {"adamw": 7, "adam": 7, "sgd": 4}
"""fp32 [rows, width] tensors alive at the peak of the row-sparse optimizer's catch-up of skipped steps
(mhe_scale/optim/row_sparse.py _apply_skipped; AdamW: the rows, exp_avg, exp_avg_sq read by index_select and
four temporaries of the update; SGD with momentum: rows, buffer and two; plain SGD 2). Measured on the real
optimizer in tests/test_plan_memory.py."""
REFRESH_CHUNK_ROWS = 1 << 16
"""Rows a full refresh of a row-sparse head catches up at once (mhe_scale.optim.row_sparse)."""
PREDICT_CHUNK_COLUMNS = 1 << 16
"""Columns a sharded MHS head scores (and catches up) at once in predict (mhe_scale.heads.mhs)."""
CUDA_FIXED_BYTES = 1 * GiB
"""CUDA context + cuBLAS/NCCL workspaces per rank (typical 0.6-1 GiB on A100/H100; measure with --probe)."""
CPU_FIXED_BYTES = 600 * MiB
"""Resident size of a CPU training process after importing torch, accelerate and DeepSpeed (gloo runs)."""
CPU_PROCESS_GROUP_BYTES = 8 * MiB
"""Extra resident size of each rank of a W > 1 CPU run (torchrun worker + gloo process group + DeepSpeed's
comm set-up) over a one-process run; measured by tools/bench_plan_memory.py as base(W=2) - base(W=1) of
lines fitted at each world size: 0.2-8.1 MiB at C = 10K, 100K and 1M, fp32 and bf16 (docs/benchmarks.md).
`--probe` measures it at the target world size."""
CUDA_PROCESS_GROUP_BYTES = 0.0
"""NCCL's communicator buffers are counted in CUDA_FIXED_BYTES (and lie outside max_memory_allocated)."""


def optimizer_bytes(optimizer: str, momentum: float = 0.9) -> int:
    """K, optimizer-state bytes per fp32 parameter: AdamW/Adam 8 (two moments), SGD 4 with momentum, 0 without."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optim.name={optimizer!r}: the memory model knows {OPTIMIZERS}")
    if optimizer in ("adamw", "adam"):
        return 8
    return 4 if momentum else 0


def param_bytes(precision: str) -> int:
    """p: bytes of an engine parameter (and of its gradient) in this precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    return 4 if precision == "fp32" else 2


@dataclass(frozen=True)
class Term:
    """One line of the breakdown: bytes on the accelerator and on the host of ONE rank."""

    name: str
    device: float
    host: float = 0.0
    formula: str = ""
    source: str = ""


@dataclass(frozen=True)
class EngineSpec:
    """How the encoder trains: zero_stage None = no DeepSpeed (accelerate DDP / one process)."""

    zero_stage: Optional[int] = None
    precision: str = "fp32"
    optimizer: str = "adamw"
    momentum: float = 0.9
    head_momentum: Optional[float] = None
    """sgd momentum of a class-sharded head's own optimizer (None: momentum)."""
    offload_optimizer: bool = False
    offload_param: bool = False
    reduce_bucket_size: float = 5e8
    allgather_bucket_size: float = 5e8
    overlap_comm: Optional[bool] = None
    """None: DeepSpeed's default (True for ZeRO-3, else False)."""
    prefetch_bucket_size: float = 5e7
    max_live_parameters: float = 1e9
    device: str = "cuda"
    """cuda: buffers count whole (the caching allocator reserves them); cpu: only the pages that get touched."""
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage} must be None, 0, 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs ZeRO-3 (DeepSpeed offloads parameters only at stage 3)")
        if self.offload_optimizer and not self.zero_stage:
            raise ValueError("offload_optimizer needs ZeRO-1, 2 or 3")
        param_bytes(self.precision)
        optimizer_bytes(self.optimizer, self.momentum)

    @property
    def head_sgd_momentum(self) -> float:
        return self.momentum if self.head_momentum is None else self.head_momentum

    @property
    def overlap(self) -> bool:
        return self.overlap_comm if self.overlap_comm is not None else self.zero_stage == 3


@dataclass(frozen=True)
class HeadSpec:
    """The classifier head; sharded = dist.shard_head (outside ZeRO, 1/N of the classes or groups per rank)."""

    name: str
    num_classes: int
    dim: int
    sizes: Optional[tuple[int, ...]] = None
    sharded: bool = False
    bias: Optional[bool] = None
    cosine: bool = False
    sample_rate: float = 1.0
    mode: str = "per_sample"
    num_sampled_groups: int = 16
    top_k_groups: int = 10
    hidden: int = 300
    label_bias: bool = True
    multilabel: bool = False
    row_sparse: bool = False
    """optim.head_update resolved to sparse (a class-sharded partial_fc / mhs / mhc, mhe_scale.optim): no
    gradient for the O(C) rows (the sampled rows' gradient is the gathered-weights term), one int64
    row counter per row instead."""


@dataclass(frozen=True)
class ActivationLine:
    """Encoder activations per rank = base + per_sample * b (bytes), fitted from two micro-batches."""

    base: float
    per_sample: float
    source: str = "not measured"


@dataclass(frozen=True)
class RunSpec:
    backbone_params: float
    """Encoder parameters (the head's are added when the head is not class-sharded)."""
    largest_layer_params: float
    engine: EngineSpec
    head: HeadSpec
    world: int = 1
    micro_batch: int = 1
    activations: Optional[ActivationLine] = None
    fixed_bytes: Optional[float] = None
    """Runtime fixed cost per rank (None: CUDA_FIXED_BYTES / CPU_FIXED_BYTES by engine.device)."""
    process_group_bytes: Optional[float] = None
    """Per-rank cost of the process group when world > 1 (None: CPU_/CUDA_PROCESS_GROUP_BYTES by device;
    0 when an activation line fitted at this world size already holds it)."""
    saves_checkpoints: bool = True
    """The run saves checkpoints: a row-sparse head's state_dict then catches up all its rows at once."""


@dataclass(frozen=True)
class Breakdown:
    terms: list[Term] = field(default_factory=list)

    @property
    def device(self) -> float:
        return sum(t.device for t in self.terms)

    @property
    def host(self) -> float:
        return sum(t.host for t in self.terms)

    def get(self, name: str) -> Term:
        return next(t for t in self.terms if t.name == name)


# ---------------------------------------------------------------- backbone model states
DS_SOURCE = "DeepSpeed runtime/zero/stage_1_and_2.py, stage3.py (estimate_zero*_model_states_mem_needs)"


def backbone_states(psi: float, largest: float, engine: EngineSpec, world: int) -> list[Term]:
    """Parameters, gradients, fp32 master copy and optimizer state of the engine's psi parameters on one rank."""
    p, k, n = param_bytes(engine.precision), optimizer_bytes(engine.optimizer, engine.momentum), world
    stage, off = engine.zero_stage, engine.offload_optimizer

    def t(name: str, nbytes: float, formula: str, host: bool = False, source: str = DS_SOURCE) -> Term:
        return Term(name, 0.0 if host else nbytes, nbytes if host else 0.0, formula, source)

    if stage is None:
        terms = [t("params", 4 * psi, "4*psi (fp32 weights)", source="torch"),
                 t("grads", 4 * psi, "4*psi", source="torch"),
                 t("optimizer", k * psi, f"{k}*psi (torch {engine.optimizer})", source="torch")]
        if n > 1:
            terms.append(t("ddp buckets", 4 * psi, "4*psi (DDP's flat gradient buckets)", source="torch DDP Reducer"))
        if engine.precision != "fp32":
            terms.append(t("autocast weights", 2 * psi, "2*psi (bf16 weight casts cached per forward)",
                           source="torch.autocast"))
        return terms
    if stage == 0:
        if engine.precision == "fp32":
            return [t("params", 4 * psi, "4*psi"), t("grads", 4 * psi, "4*psi"),
                    t("optimizer", k * psi, f"{k}*psi")]
        return [t("params", 2 * psi, "2*psi"), t("grads", 2 * psi, "2*psi"),
                t("fp32 grads", 4 * psi, "4*psi (BF16_Optimizer's flat fp32 gradient buffer)",
                  source="DeepSpeed runtime/bf16_optimizer.py"),
                t("fp32 master", 4 * psi / n, "4*psi/N", source="DeepSpeed runtime/bf16_optimizer.py"),
                t("optimizer", k * psi / n, f"{k}*psi/N", source="DeepSpeed runtime/bf16_optimizer.py")]
    if stage == 3:
        terms = [t("params", p * psi / n, f"{p}*psi/N", host=engine.offload_param),
                 t("live params", 2 * p * largest, f"{2 * p}*L (gathered largest layer + its grads)")]
    else:
        grads = p * psi / n if stage == 2 else p * psi
        terms = [t("params", p * psi, f"{p}*psi"),
                 t("grads", grads, f"{p}*psi" + ("/N" if stage == 2 else ""), host=off and stage == 2)]
    terms += [t("fp32 master", 4 * psi / n, "4*psi/N", host=off),
              t("fp32 grads", 4 * psi / n, "4*psi/N", host=off),
              t("optimizer", k * psi / n, f"{k}*psi/N ({engine.optimizer})", host=off)]
    return terms


def bucket_terms(psi: float, engine: EngineSpec) -> list[Term]:
    """DeepSpeed's communication buffers: the reduce (ipg) bucket, doubled with overlap_comm, or the
    all-gather bucket at the step (they do not coexist: the larger counts); ZeRO-3's prefetch bucket.
    On CPU only min(bucket, psi) elements get touched (untouched pages are not resident)."""
    if not engine.zero_stage:
        return []
    p = param_bytes(engine.precision)
    cap = (lambda x: min(x, psi)) if engine.device == "cpu" else (lambda x: x)
    copies = 2 if engine.overlap else 1
    reduce = copies * p * cap(engine.reduce_bucket_size)
    gather = p * cap(engine.allgather_bucket_size) if engine.zero_stage in (1, 2) else 0.0
    src = "DeepSpeed zero config: reduce_bucket_size, allgather_bucket_size, overlap_comm (ipg buffers)"
    terms = [Term("comm buckets", max(reduce, gather), 0.0,
                  f"max({copies}*{p}*reduce_bucket_size, {p}*allgather_bucket_size)", src)]
    if engine.zero_stage == 3:
        live = min(engine.prefetch_bucket_size, engine.max_live_parameters, psi)
        terms.append(Term("prefetch bucket", p * live, 0.0, f"{p}*min(prefetch_bucket_size, max_live_parameters, psi)",
                          "DeepSpeed stage3_prefetch_bucket_size / stage3_max_live_parameters"))
    return terms


# ---------------------------------------------------------------- head
def default_sizes(num_classes: int, heads: int) -> tuple[int, ...]:
    """Balanced factorisation (c_1..c_H, prod >= C) as mhe_scale.labels.codec.factorize chooses it."""
    from mhe_scale.labels.codec import factorize  # pure python

    return tuple(int(c) for c in factorize(num_classes, heads))


def largest_shard(items: int, world: int) -> int:
    """Items held by rank 0 (the largest share) of a contiguous split: ceil(items / world)."""
    return -(-items // world)


def _sizes(head: HeadSpec) -> tuple[int, ...]:
    return tuple(head.sizes) if head.sizes else default_sizes(head.num_classes, 2)


def _bias(head: HeadSpec, default: bool) -> bool:
    return head.bias if head.bias is not None else default


def head_params(head: HeadSpec, world: int = 1) -> int:
    """Parameters of the head on the rank holding the most (its whole size when not sharded)."""
    w = world if head.sharded else 1
    c, d = head.num_classes, head.dim
    if head.name == "fc":
        rows = largest_shard(c, w)
        return rows * d + (rows if _bias(head, True) and not head.cosine else 0)
    if head.name == "partial_fc":
        return largest_shard(c, w) * d
    if head.name == "mhp":
        total = sum(_sizes(head))
        return total * d + (total if _bias(head, True) else 0)
    if head.name == "mhs":
        groups, members = _sizes(head)
        rows = largest_shard(groups, w) * members
        return rows * d + (rows if _bias(head, False) and not head.cosine else 0)
    if head.name == "mhc":
        sizes = _sizes(head)
        strides = [math.prod(sizes[h + 1:]) for h in range(len(sizes))]
        prefixes = [-(-c // s) for s in strides]  # n_h, last = C
        levels = len(sizes) - 1
        n = prefixes[0] * d + prefixes[0] + levels * (d * head.hidden + head.hidden)
        per_prefix = head.hidden + (1 if head.label_bias else 0)
        n += sum(prefixes[h] * per_prefix for h in range(1, levels))
        return n + largest_shard(c, w) * per_prefix
    raise ValueError(f"head.name={head.name!r}: the memory model knows fc, partial_fc, mhp, mhc, mhs")


def head_logit_shape(head: HeadSpec, world: int, micro_batch: int) -> tuple[int, int, int]:
    """(rows, logit columns, weight rows gathered per step) of the head's training softmax on one rank.
    A sharded head sees the all-gathered batch (rows = b*N) and its own 1/N of the columns."""
    w = world if head.sharded else 1
    rows = micro_batch * w
    c = head.num_classes
    if head.name == "fc":
        return rows, largest_shard(c, w), 0
    if head.name == "partial_fc":
        local = largest_shard(c, w)
        kept = min(local, max(math.ceil(head.sample_rate * local), math.ceil(rows / w)))
        return rows, kept, kept
    if head.name == "mhp":
        return rows, sum(_sizes(head)), 0
    if head.name == "mhs":
        groups, members = _sizes(head)
        m = min(head.num_sampled_groups, groups)
        if head.mode == "batch_union":
            seen = groups * (1.0 - (1.0 - 1.0 / groups) ** rows)  # expected distinct groups in the batch
            local = min(largest_shard(groups, w), math.ceil(max(m, seen) / w))
            return rows, local * members, local * members
        local = min(m, largest_shard(groups, w))
        union = min(largest_shard(groups, w), rows * local)  # the sampled groups are read once (per_row_group_logits)
        return rows, local * members, union * members
    if head.name == "mhc":
        sizes = _sizes(head)
        k = head.top_k_groups if head.multilabel else 1
        return rows, -(-c // math.prod(sizes[1:])) + k * sizes[-1], rows * k * sizes[-1]
    raise ValueError(f"head.name={head.name!r}: the memory model knows fc, partial_fc, mhp, mhc, mhs")


def row_sparse_shape(head: HeadSpec, world: int) -> tuple[int, int]:
    """(rows, parameters) of the head's row-sparse tensors on the largest rank: partial_fc's weight,
    mhs's weight (+ bias), mhc's last-level label table (+ its bias); (0, 0) for a dense update."""
    if not (head.row_sparse and head.sharded):
        return 0, 0
    w = world
    if head.name == "partial_fc":
        rows = largest_shard(head.num_classes, w)
        return rows, rows * head.dim
    if head.name == "mhs":
        groups, members = _sizes(head)
        rows = largest_shard(groups, w) * members
        return rows, rows * head.dim + (rows if _bias(head, False) and not head.cosine else 0)
    if head.name == "mhc":
        rows = largest_shard(head.num_classes, w)
        return rows, rows * (head.hidden + (1 if head.label_bias else 0))
    return 0, 0


def mhc_unique_rows(head: HeadSpec, world: int, micro_batch: int) -> int:
    """U: distinct label rows an MHC step gathers on the largest rank: the expected distinct groups among the
    rows x K group draws, G (1 - (1 - 1/G)^(rows K)), of which a sharded rank owns 1/W (groups are contiguous
    label ranges), times the group size c_last; at most the rows x K x c_last gathered."""
    sizes = _sizes(head)
    groups, members = -(-head.num_classes // math.prod(sizes[1:])), sizes[-1]
    w = world if head.sharded else 1
    k = head.top_k_groups if head.multilabel else 1
    draws = micro_batch * w * k
    seen = groups * (1.0 - (1.0 - 1.0 / groups) ** draws)
    return min(draws * members, math.ceil(seen / w) * members)


def catch_up_bytes(rows: int, width: int, optimizer: str, momentum: float = 0.9) -> float:
    """Peak bytes of the row-sparse optimizer catching up `rows` rows of `width` fp32 values at once:
    CATCH_UP_COPIES[optimizer] * 4 * rows * width, plus the int64 ids, last step and skipped count (24 * rows)."""
    return catch_up_copies(optimizer, momentum) * 4 * rows * width + 24 * rows


def catch_up_copies(optimizer: str, momentum: float = 0.9) -> int:
    """CATCH_UP_COPIES of the optimizer; plain SGD (no momentum buffer) 2: the rows and their decayed copy."""
    return CATCH_UP_COPIES[optimizer] if optimizer != "sgd" or momentum else 2


def catch_up_shape(head: HeadSpec, world: int, saves: bool) -> tuple[int, int]:
    """(rows, width) a row-sparse sharded head catches up at once outside the training step: partial_fc its rows
    (refresh_all in predict and state_dict), mhs its rows when it saves and a predict chunk of
    PREDICT_CHUNK_COLUMNS otherwise, mhc its label-table rows when it saves (predict reads only candidate rows),
    each full refresh at most REFRESH_CHUNK_ROWS at a time; (0, 0) otherwise."""
    rows, _ = row_sparse_shape(head, world)
    if not rows:
        return 0, 0
    whole = min(rows, REFRESH_CHUNK_ROWS)  # refresh_all catches up in chunks (mhe_scale/optim/row_sparse.py)
    if head.name == "partial_fc":
        return whole, head.dim
    if head.name == "mhs":
        members = _sizes(head)[1]
        chunk = max(1, PREDICT_CHUNK_COLUMNS // members) * members
        return (whole if saves else min(rows, chunk)), head.dim
    return (whole, head.hidden) if saves else (0, 0)


def head_terms(head: HeadSpec, engine: EngineSpec, world: int, micro_batch: int) -> list[Term]:
    """The head's per-rank memory. Sharded (outside ZeRO): fp32 weights, grads and its own optimizer's
    state of its shard; always: the gathered features and the fp32 logits of the training softmax."""
    terms: list[Term] = []
    n_params = head_params(head, world)
    k = optimizer_bytes(engine.optimizer, engine.head_sgd_momentum)
    src = "mhe_scale/parallel (class-sharded head, own torch optimizer)"
    sparse_rows, sparse_params = row_sparse_shape(head, world)
    if head.sharded:
        terms += [Term("head params", 4 * n_params, 0.0, "4*P_head (fp32 shard)", src),
                  Term("head grads", 4 * (n_params - sparse_params), 0.0,
                       "4*(P_head - P_rows) (row-sparse rows: see gathered weights)" if sparse_params else "4*P_head",
                       src),
                  Term("head optimizer", k * n_params, 0.0, f"{k}*P_head ({engine.optimizer})", src)]
        if sparse_rows:
            terms.append(Term("head row counters", 8 * sparse_rows, 0.0, "8*rows (int64 row_step per row)",
                              "mhe_scale/optim/row_sparse.py"))
    rows, cols, gathered = head_logit_shape(head, world, micro_batch)
    if head.sharded and world > 1:
        terms.append(Term("gathered features", 2 * 4 * rows * head.dim, 0.0, "2*4*(b*N)*D (all-gathered + grad)",
                          "parallel/collectives.py all_gather with grad"))
    copies = logit_copies(head)
    terms.append(Term("head logits", copies * 4 * rows * cols, 0.0,
                      f"{copies}*4*rows*cols, rows={rows}, cols={cols}", "fp32 logits, softmax, grad (logit_copies)"))
    if gathered:
        width = head.hidden if head.name == "mhc" else head.dim
        terms.append(Term("head gathered weights", 2 * 4 * gathered * width, 0.0,
                          f"2*4*{gathered}*{width} (sampled weight rows + grad)",
                          "index_select of the sampled rows (mhe_scale/optim/rows.py gather_rows)"))
        if head.name == "mhc" and sparse_rows:
            # a row-sparse MHC gathers with repeats (gather_rows(unique=False)): besides the expansion [n, h] and
            # its gradient, the leaf of the U distinct rows [U, h] and its gradient
            u = mhc_unique_rows(head, world, micro_batch)
            terms.append(Term("head gathered leaf", 2 * 4 * u * width, 0.0,
                              f"2*4*U*{width}, U={u} (expected distinct groups of the batch on this rank x c_last)",
                              "mhe_scale/optim/rows.py gather_rows(unique=False)"))
    return terms


def catch_up_terms(run: RunSpec, transient: float) -> list[Term]:
    """The row-sparse head's catch-up outside the training step (eval / save), counted as its excess over the
    training step's head tensors `transient` (logits, gathered features and weights), which it does not meet."""
    rows, width = catch_up_shape(run.head, run.world, run.saves_checkpoints)
    if not rows:
        return []
    peak = catch_up_bytes(rows, width, run.engine.optimizer, run.engine.head_sgd_momentum)
    return [Term("head catch-up", max(0.0, peak - transient), 0.0,
                 f"max(0, copies*4*{rows}*{width} + 24*{rows} - head step tensors), copies = "
                 f"{catch_up_copies(run.engine.optimizer, run.engine.head_sgd_momentum)}",
                 "mhe_scale/optim/row_sparse.py _apply_skipped (refresh_all in predict / state_dict)")]


def engine_params(run: RunSpec) -> float:
    """psi: parameters the DeepSpeed engine (or DDP) holds: the encoder, plus a head that is not class-sharded."""
    return run.backbone_params + (0 if run.head.sharded else head_params(run.head, 1))


def estimate(run: RunSpec) -> Breakdown:
    """All terms of one rank at micro-batch run.micro_batch."""
    if run.world < 1 or run.micro_batch < 1:
        raise ValueError(f"world={run.world} and micro_batch={run.micro_batch} must be >= 1")
    psi = engine_params(run)
    largest = max(run.largest_layer_params, 0 if run.head.sharded else head_params(run.head, 1))
    terms = backbone_states(psi, largest, run.engine, run.world)
    terms += bucket_terms(psi, run.engine)
    terms += head_terms(run.head, run.engine, run.world, run.micro_batch)
    step_tensors = ("gathered features", "head logits", "head gathered weights", "head gathered leaf")
    terms += catch_up_terms(run, sum(t.device for t in terms if t.name in step_tensors))
    line = run.activations
    if line is not None:
        terms.append(Term("activations", line.base + line.per_sample * run.micro_batch, 0.0,
                          f"{line.base / MiB:.1f} MiB + {line.per_sample / MiB:.2f} MiB * b", line.source))
    fixed = run.fixed_bytes
    if fixed is None:
        fixed = CUDA_FIXED_BYTES if run.engine.device == "cuda" else CPU_FIXED_BYTES
    terms.append(Term("runtime", fixed, 0.0, "fixed per process", "CUDA context / imported libraries"))
    terms += process_group_terms(run)
    return Breakdown(terms)


def process_group_terms(run: RunSpec) -> list[Term]:
    """The per-rank cost of running W > 1 processes (launcher worker, gloo/NCCL process group, DeepSpeed's comm
    init) over one process: nothing at W = 1, else run.process_group_bytes or the device's measured default."""
    if run.world == 1:
        return []
    pg = run.process_group_bytes
    if pg is None:
        pg = CUDA_PROCESS_GROUP_BYTES if run.engine.device == "cuda" else CPU_PROCESS_GROUP_BYTES
    if not pg:
        return []
    return [Term("process group", pg, 0.0, "base(W) - base(1) of activation lines fitted at W and at 1 process",
                 "tools/bench_plan_memory.py (gloo + torchrun on CPU); --probe measures it at the target W")]


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"
