"""Config boundary for class-sharded heads: HeadConfig + process group -> a sharded head.

The sharded heads take the single-process heads' arguments plus `group`, so the same HeadConfig
(checked by heads.factory.head_kwargs) builds either. MHP has no sharded form: its head is
D * sum(c_h) parameters, small enough to replicate (it then trains like the encoder).
"""

from __future__ import annotations

from torch.distributed import ProcessGroup

from mhe_scale.config import ConfigError, HeadConfig
from mhe_scale.heads.factory import head_kwargs
from mhe_scale.parallel.sharded_fc import ShardedFullyConnectedHead, ShardedPartialFCHead
from mhe_scale.parallel.sharded_heads import ShardedHead
from mhe_scale.parallel.sharded_mhc import ShardedMultiHeadCascadeHead
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead

SHARDED_HEADS: dict[str, type] = {
    "fc": ShardedFullyConnectedHead,
    "partial_fc": ShardedPartialFCHead,
    "mhs": ShardedMultiHeadSamplingHead,
    "mhc": ShardedMultiHeadCascadeHead,
}


def build_sharded_head(cfg: HeadConfig, in_features: int, num_classes: int, multilabel: bool,
                       group: ProcessGroup | None, init_seed: int = 0) -> ShardedHead:
    """The class-sharded version of the head cfg names; group=None is one process (same math)."""
    if cfg.name not in SHARDED_HEADS:
        raise ConfigError(f"dist.shard_head=true but head {cfg.name!r} has no sharded form; shardable heads: "
                          f"{sorted(SHARDED_HEADS)} (mhp is small enough to replicate: set dist.shard_head=false)")
    cls = SHARDED_HEADS[cfg.name]
    return cls(in_features, num_classes, multilabel=multilabel, group=group, init_seed=init_seed, **head_kwargs(cfg))
