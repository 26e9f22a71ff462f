"""Model-parallel (class-sharded) heads: shard plans, collectives, sharded losses.

The only package that calls torch.distributed. Everything takes `group` (None: one process,
same math, no collectives). Sharded heads: sharded_fc.py (fc, Partial FC), sharded_mhs.py,
sharded_mhc.py, on the shared machinery of sharded_heads.py; per-rank checkpoints that reshard on
load: checkpoint.py. See losses.py for the gradient convention (global mean loss, exact
local gradients, the factor W only in `all_gather_with_grad`'s backward).
"""

from mhe_scale.parallel.collectives import (all_gather_no_grad, all_gather_with_grad, all_reduce_max, all_reduce_sum,
                                            gather_sizes, get_rank, get_world_size, is_sharded)
from mhe_scale.parallel.losses import local_multi_hot, sharded_bce_with_logits, sharded_cross_entropy, sharded_topk
from mhe_scale.parallel.shard import ShardPlan, shard_range
from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead, ShardedPartialFCHead
from mhe_scale.parallel.sharded_mhc import ShardedCascadeLabelTable, ShardedMultiHeadCascadeHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead
from mhe_scale.parallel.checkpoint import export_merged, load_head_shard, load_resharded, save_head_shard, save_shard

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "all_reduce_max", "all_reduce_sum", "gather_sizes",
           "get_rank", "get_world_size", "is_sharded", "local_multi_hot", "sharded_bce_with_logits",
           "sharded_cross_entropy", "sharded_topk", "ShardPlan", "shard_range",
           "ShardedFullyConnectedHead", "ShardedPartialFCHead", "ShardedCascadeLabelTable", "ShardedMultiHeadCascadeHead",
           "ShardedMultiHeadSamplingHead", "export_merged", "load_head_shard", "load_resharded", "save_head_shard",
           "save_shard"]
