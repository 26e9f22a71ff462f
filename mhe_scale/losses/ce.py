"""Softmax cross-entropy with label smoothing and ignored targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.losses.base import Metrics, check_reduction, compute_dtype, reduce_kept, register_loss


@register_loss("ce")
class CrossEntropy(nn.Module):
    """CE over logits [B, C] with targets [B] class ids; targets == ignore_index are dropped.

    With label smoothing ε the target distribution is (1 − ε)·onehot + ε/C (PyTorch's convention).
    reduction: 'mean' over kept rows (0 when none is kept) or 'sum'. metrics: 'accuracy', the top-1
    accuracy over kept rows.
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -1, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"ce: label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing, self.ignore_index = float(label_smoothing), int(ignore_index)
        self.reduction = check_reduction(reduction, "ce")

    def forward(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"ce: logits must be [B, C] and targets [B], got {tuple(logits.shape)} and "
                             f"{tuple(targets.shape)}")
        x = logits.to(compute_dtype(logits))
        keep = targets != self.ignore_index
        per_row = F.cross_entropy(x, targets.long(), ignore_index=self.ignore_index, reduction="none",
                                  label_smoothing=self.label_smoothing)  # [B], 0 on ignored rows
        loss = reduce_kept(per_row, keep, self.reduction)
        hits = (x.detach().argmax(dim=1) == targets) & keep
        accuracy = hits.sum().float() / keep.sum().clamp_min(1).float()
        return loss, {"accuracy": accuracy}

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
