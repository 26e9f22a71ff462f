"""Training criteria behind one contract: `criterion(logits_or_features, targets) -> (loss, metrics)`.

    criterion = build_loss("asl", gamma_neg=4.0, clip=0.05, reduction="sum")
    loss, metrics = criterion(logits, targets)   # logits [B, C], targets [B, C] in {0, 1}, < 0 ignored

Importing the package registers the built-in criteria: ce, bce, asl, aam, margin, kcl, infonce
(see list_losses()).
"""

from mhe_scale.losses.base import Criterion, Metrics, build_loss, list_losses, register_loss
from mhe_scale.losses import aam, asl, bce, ce, kcl, margin  # noqa: F401,E402  (registers the built-in criteria)

__all__ = ["Criterion", "Metrics", "build_loss", "list_losses", "register_loss"]
