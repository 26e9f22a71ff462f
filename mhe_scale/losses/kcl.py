"""K-positive contrastive loss (KCL, Kang et al. ICLR 2021) over a MoCo queue; k = 0 is InfoNCE.

For anchor i (query q_i, own key k_i, L2-normalised [D]) and the queue Q [K, D] with labels y_Q [K]:
logits s_i = [q_i . k_i, q_i . Q_1, ..., q_i . Q_K] / T   ([1 + K]), and the positives are the own
key plus exactly min(k, available) queue entries drawn uniformly without replacement among those
with y_Q = y_i (all of them for k = None, i.e. k = infinity: supervised contrastive with a queue).
The loss is the soft-target cross-entropy  -(1/|P_i|) sum_{p in P_i} log softmax(s_i)_p  averaged
over anchors. Same-class queue entries NOT drawn are, by `unselected`:
  keep  - negatives in the softmax (Kang et al.),
  zero  - their logit replaced by 0 (a constant in the denominator, no gradient),
  mask  - left out of the softmax.
Queue entries with label < 0 (not yet filled) are always left out.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.losses.base import Metrics, compute_dtype, register_loss

UNSELECTED = ("keep", "zero", "mask")


def select_positives(labels: Tensor, queue_labels: Tensor, k: int | None, generator: torch.Generator | None = None,
                     ) -> Tensor:
    """bool [B, K]: for each anchor, min(k, #same-class) same-class queue entries drawn uniformly
    without replacement (all same-class entries for k=None; none for k=0). labels [B], queue_labels [K]."""
    same = (labels.view(-1, 1) == queue_labels.view(1, -1)) & (queue_labels.view(1, -1) >= 0)
    if k is None:
        return same
    if k == 0 or same.numel() == 0:
        return torch.zeros_like(same)
    # random keys in [0, 1) for eligible entries, -1 elsewhere; the k largest are a uniform draw
    keys = torch.rand(same.shape, generator=generator, device="cpu" if generator is None else generator.device)
    keys = torch.where(same, keys.to(same.device), torch.full_like(keys, -1.0, device=same.device))
    top = keys.topk(min(k, keys.shape[1]), dim=1)
    chosen = torch.zeros_like(same)
    chosen.scatter_(1, top.indices, top.values >= 0)
    return chosen


def contrastive_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """[B, 1 + K]: column 0 = q . own key, then q . queue entries, all divided by the temperature."""
    own = (q * k).sum(dim=1, keepdim=True)
    return torch.cat([own, q @ queue.t()], dim=1) / temperature


@register_loss("kcl")
class KPositiveContrastive(nn.Module):
    """criterion((q, k, queue, queue_labels), labels) -> (loss, metrics) of the module docstring.

    q, k: [B, D] (L2-normalised by the caller), queue: [K, D], queue_labels int [K] (< 0 = empty slot),
    labels int [B]. k_positives: int >= 0 or None (all same-class entries). generator: the seeded
    source of the positive draws (its device must match the labels'); None uses torch's global RNG.
    metrics: accuracy (own key ranked first), positives (mean |P_i|), chance (log(1 + K)).
    """

    def __init__(self, k_positives: int | None = 0, temperature: float = 0.07, unselected: str = "keep") -> None:
        super().__init__()
        if k_positives is not None and k_positives < 0:
            raise ValueError(f"kcl: k_positives={k_positives} must be >= 0 or None (all same-class entries)")
        if not temperature > 0:
            raise ValueError(f"kcl: temperature={temperature} must be > 0")
        if unselected not in UNSELECTED:
            raise ValueError(f"kcl: unselected={unselected!r} must be one of {UNSELECTED}")
        self.k_positives, self.temperature, self.unselected = k_positives, float(temperature), unselected
        self.generator: torch.Generator | None = None

    def forward(self, inputs: tuple[Tensor, Tensor, Tensor, Tensor], labels: Tensor) -> tuple[Tensor, Metrics]:
        q, k, queue, queue_labels = inputs
        if q.dim() != 2 or k.shape != q.shape or queue.dim() != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(f"kcl: q and k must be [B, D] and the queue [K, D], got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(queue.shape)}")
        dtype = compute_dtype(q)
        logits = contrastive_logits(q.to(dtype), k.to(dtype), queue.to(dtype), self.temperature)
        chosen = select_positives(labels, queue_labels, self.k_positives, self.generator)
        same = (labels.view(-1, 1) == queue_labels.view(1, -1))
        empty = (queue_labels < 0).view(1, -1).expand_as(chosen)
        unselected = same & ~chosen & ~empty
        queue_logits = logits[:, 1:]
        if self.unselected == "zero":
            queue_logits = torch.where(unselected, torch.zeros_like(queue_logits), queue_logits)
        drop = empty | (unselected if self.unselected == "mask" else torch.zeros_like(unselected))
        queue_logits = queue_logits.masked_fill(drop, -math.inf)
        logits = torch.cat([logits[:, :1], queue_logits], dim=1)
        positives = torch.cat([torch.ones_like(chosen[:, :1]), chosen], dim=1).to(logits.dtype)  # [B, 1 + K]
        log_p = F.log_softmax(logits, dim=1)
        per_anchor = -(positives * log_p.masked_fill(positives == 0, 0.0)).sum(1) / positives.sum(1)
        loss = per_anchor.mean()
        accuracy = (logits.detach().argmax(dim=1) == 0).float().mean()
        metrics = {"accuracy": accuracy, "positives": positives.sum(1).mean().detach(),
                   "chance": torch.tensor(math.log(1 + queue.shape[0]), device=loss.device)}
        return loss, metrics

    def extra_repr(self) -> str:
        return f"k_positives={self.k_positives}, temperature={self.temperature}, unselected={self.unselected!r}"


@register_loss("infonce")
def infonce(temperature: float = 0.07) -> KPositiveContrastive:
    """MoCo's InfoNCE: KCL with no queue positives (the own key is the only positive)."""
    return KPositiveContrastive(0, temperature)
