"""Encoder + head as one module, and the optimizer's parameter groups."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from mhe_scale.config import HeadConfig, OptimConfig
from mhe_scale.engine.module import TrainingModule
from mhe_scale.heads.base import ClassifierHead
from mhe_scale.heads.factory import build_head


class Classifier(TrainingModule):
    """inputs -> encoder.forward_features [B, D] -> head -> (loss, metrics): the training module of
    every encoder + head task. A class-sharded head (mhe_scale.parallel) is kept as a plain attribute,
    not a sub-module, so DDP / ZeRO never see it (see docs/architecture.md); a replicated head is a
    sub-module trained like the encoder. Checkpoints name the weights "encoder.*" and "head.*"."""

    def __init__(self, encoder: nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        from mhe_scale.engine.prepared import is_class_sharded

        self.encoder = encoder
        self.sharded = is_class_sharded(head)
        if self.sharded:
            self.__dict__["_sharded_head"] = head  # not a sub-module: outside DDP / ZeRO
        else:
            self.head = head

    def __getattr__(self, name: str) -> Any:
        if name == "head" and "_sharded_head" in self.__dict__:
            return self.__dict__["_sharded_head"]
        return super().__getattr__(name)

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.encoder.forward_features(inputs)
        if self.sharded:  # cast to the head's dtype BEFORE the head all-gathers the features (bf16 engines)
            dtype = next((p.dtype for p in self.head.parameters() if p.is_floating_point()), torch.float32)
            if features.is_floating_point() and features.dtype != dtype:
                features = features.to(dtype)
        loss, metrics = self.head(features, targets)  # heads turn autocast off themselves (fp32 logits)
        return loss, metrics

    def class_sharded_head(self) -> nn.Module | None:
        return self.head if self.sharded else None

    def zero3_leaf_modules(self) -> list[nn.Module]:
        # heads read sub-modules' weights directly: gather all of them when the head runs
        return [] if self.sharded else [self.head]

    def chance_losses(self) -> dict[str, float]:
        """{"loss": the head's chance level} for heads that know one (softmax fc: ln C; mhp ce: sum of digit
        entropies), else {}."""
        level = getattr(self.head, "chance_loss", lambda: None)()
        return {} if level is None else {"loss": float(level)}

    @torch.no_grad()
    def predict(self, inputs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.head.predict(self.encoder.forward_features(inputs), k)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def head_momentum(cfg: OptimConfig) -> float:
    """optim.head_momentum, default optim.momentum; refused for optimizers without momentum (adamw)."""
    if cfg.head_momentum is None:
        return cfg.momentum
    if cfg.name != "sgd":
        raise ValueError(f"optim.head_momentum={cfg.head_momentum} is an sgd setting; optim.name={cfg.name!r}: "
                         "remove optim.head_momentum or set optim.name=sgd")
    if not 0.0 <= cfg.head_momentum < 1.0:
        raise ValueError(f"optim.head_momentum={cfg.head_momentum} must be in [0, 1)")
    return float(cfg.head_momentum)


def _parameter_groups(cfg: OptimConfig, model: Classifier) -> tuple[dict, dict]:
    head_lr = cfg.head_lr if cfg.head_lr is not None else cfg.lr
    head = {"params": list(model.head.parameters()), "lr": head_lr, "name": "head"}
    momentum = head_momentum(cfg)  # also refuses a head momentum the optimizer cannot use
    if cfg.name == "sgd" and momentum != cfg.momentum:
        head["momentum"] = momentum
    return {"params": list(model.encoder.parameters()), "lr": cfg.lr, "name": "encoder"}, head


def split_no_decay(groups: list[dict]) -> list[dict]:
    """Each group split in two: matrices (ndim >= 2) keep the optimizer's weight decay; biases and
    normalisation weights (ndim <= 1) get weight_decay 0 in a group named "<name>.no_decay" (same lr).
    Empty groups are dropped."""
    out = []
    for group in groups:
        decay = [p for p in group["params"] if p.ndim >= 2]
        flat = [p for p in group["params"] if p.ndim <= 1]
        if decay:
            out.append(group | {"params": decay})
        if flat:
            out.append(group | {"params": flat, "weight_decay": 0.0, "name": f"{group.get('name', 'group')}.no_decay"})
    return out


def make_optimizer(cfg: OptimConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer of an optim section over the given parameter groups (each may set its own lr);
    for tasks that build their own groups (a probe's linear layer, a margin loss's beta)."""
    if cfg.no_decay_bias_norm:
        groups = split_no_decay(groups)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **({'fused': True} if cfg.fused else {}))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is not supported; choose adamw or sgd")


def build_optimizer(cfg: OptimConfig, model: Classifier) -> torch.optim.Optimizer:
    """Two parameter groups, encoder and head (the head may have its own lr); with
    optim.no_decay_bias_norm each is split into decayed matrices and undecayed biases / norm weights."""
    return make_optimizer(cfg, list(_parameter_groups(cfg, model)))


def optimizer_state_numel(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> int:
    """Number of optimizer-state elements held for `params` (e.g. Adam: 2 per weight)."""
    wanted = {id(p) for p in params}
    total = 0
    for p, state in optimizer.state.items():
        if id(p) in wanted:
            total += sum(v.numel() for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def build_run_head(cfg: HeadConfig, shard: bool, in_features: int, num_classes: int, multilabel: bool,
                   seed: int = 0) -> ClassifierHead:
    """The head a run trains: class-sharded over all processes when `shard` (dist.shard_head)."""
    if not shard:
        return build_head(cfg, in_features, num_classes, multilabel)
    from mhe_scale.parallel.collectives import world_group
    from mhe_scale.parallel.factory import build_sharded_head

    return build_sharded_head(cfg, in_features, num_classes, multilabel, world_group(), init_seed=seed)


def resolve_head_update(head_update: str, head: nn.Module) -> str:
    """optim.head_update -> "dense" | "sparse". auto: sparse for a sampled head (partial_fc, mhs, mhc)
    that is class-sharded (dist.shard_head=true, also on one process), dense otherwise (docs/engine.md)."""
    from mhe_scale.engine.prepared import is_class_sharded

    if head_update not in ("auto", "dense", "sparse"):
        raise ValueError(f"optim.head_update={head_update!r} is not supported; choose auto, dense or sparse")
    if head_update != "auto":
        return head_update
    return "sparse" if is_class_sharded(head) and hasattr(head, "row_sparse_parameters") else "dense"


def describe_head_update(cfg: OptimConfig, head: nn.Module) -> str:
    """The line a run prints first about its head's update: what optim.head_update resolved to and why, e.g.
    "head update: sparse (optim.head_update=auto: a class-sharded sampled head), catch-up closed_form"."""
    from mhe_scale.engine.prepared import is_class_sharded

    resolved = resolve_head_update(cfg.head_update, head)
    if cfg.head_update != "auto":
        why = f"optim.head_update={cfg.head_update}"
    elif resolved == "sparse":
        why = "optim.head_update=auto: a class-sharded sampled head"
    else:
        why = ("optim.head_update=auto: " + ("this class-sharded head samples no rows" if is_class_sharded(head)
                                             else "the head is replicated (dist.shard_head=false)"))
    line = f"head update: {resolved} ({why})"
    return line + f", catch-up {cfg.head_catch_up} (optim.head_catch_up)" if resolved == "sparse" else line


def build_optimizers(cfg: OptimConfig, model: Classifier) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    """(optimizer, head_optimizer): one optimizer with encoder and head groups for a replicated
    head; for a class-sharded head, the encoder's optimizer and a separate one for the shard
    (which stays out of DDP / ZeRO, see docs/engine.md)."""
    from mhe_scale.engine.prepared import is_class_sharded
    from mhe_scale.optim.row_sparse import CATCH_UPS

    if cfg.head_catch_up not in CATCH_UPS:
        raise ValueError(f"optim.head_catch_up={cfg.head_catch_up!r} is not supported; choose one of {list(CATCH_UPS)}")
    sparse = resolve_head_update(cfg.head_update, model.head) == "sparse"
    if sparse and not (is_class_sharded(model.head) and hasattr(model.head, "row_sparse_parameters")):
        raise ValueError(f"optim.head_update=sparse needs a sampled head (partial_fc, mhs) sharded with "
                         f"dist.shard_head=true (also on one process); got {type(model.head).__name__}: set "
                         "optim.head_update=dense")
    if not is_class_sharded(model.head):
        return build_optimizer(cfg, model), None
    encoder, head = _parameter_groups(cfg, model)
    if sparse:
        from mhe_scale.optim import build_row_sparse_optimizer

        model.head.row_sparse_parameters()
        return make_optimizer(cfg, [encoder]), build_row_sparse_optimizer(cfg.name, [head], cfg.lr, cfg.weight_decay,
                                                                           head_momentum(cfg), cfg.head_catch_up)
    return make_optimizer(cfg, [encoder]), make_optimizer(cfg, [head])
