"""Model-parallel (class-sharded) heads: shard plans, collectives, sharded losses.

The only package that calls torch.distributed. Everything takes `group` (None: one process,
same math, no collectives). See losses.py for the gradient convention (global mean loss, exact
local gradients, the factor W only in `all_gather_with_grad`'s backward).
"""

from mhe_scale.parallel.collectives import (all_gather_no_grad, all_gather_with_grad, all_reduce_max, all_reduce_sum,
                                            gather_sizes, get_rank, get_world_size, is_sharded)
from mhe_scale.parallel.losses import local_multi_hot, sharded_bce_with_logits, sharded_cross_entropy, sharded_topk
from mhe_scale.parallel.shard import ShardPlan, shard_range

__all__ = ["all_gather_no_grad", "all_gather_with_grad", "all_reduce_max", "all_reduce_sum", "gather_sizes",
           "get_rank", "get_world_size", "is_sharded", "local_multi_hot", "sharded_bce_with_logits",
           "sharded_cross_entropy", "sharded_topk", "ShardPlan", "shard_range"]
