"""Margin loss with distance-weighted negative sampling (Wu et al. 2017), as used by MultiGrain.

    ê = e / ||e||;  d_ij = ||ê_i − ê_j||  (in [0, 2])
    positives  (i, j): i != j, same instance id (the other repeated-augmentation copies of image i)
    negatives  for every positive pair (i, j), one k drawn from row i of
               q_ik ∝ w_ik,  log w_ik = (2 − n)·log d̄_ik − ((n − 3)/2)·log(1 − d̄_ik²/4),
               d̄ = max(d, cutoff = 0.5) (n = embedding dim: w is the inverse density of distances
               between random points of the unit sphere), w_ik = 0 for same-instance k and for
               d_ik >= nonzero_loss_cutoff = 1.4 (terms that cannot be active); a row with no
               admissible k falls back to uniform over its other-instance samples.
    loss = Σ_(i,j) [α + d_ij − β]_+ + Σ_(i,k) [α − d_ik + β]_+, divided by the number of active
           (> 0) terms;  α = 0.2, β learned (init 1.2; give it its own optimizer group without
           weight decay, see `beta_parameters`).

Sampling runs on the embeddings' device with torch.multinomial (optionally with a generator);
the weights are computed without gradient (the draw is not differentiated). The clamp at
`cutoff` applies to the sampling weights only; the hinge terms use the true distances.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mhe_scale.losses.base import Metrics, compute_dtype, register_loss


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """L2-normalised rows [B, D] -> Euclidean distances [B, B] (sqrt made safe at 0 for gradients)."""
    x = nn.functional.normalize(embeddings, dim=1)
    sq = (2.0 - 2.0 * x @ x.t()).clamp_min(0.0)
    return torch.sqrt(sq + 1e-12)


def negative_weights(dist: Tensor, same: Tensor, dim: int, cutoff: float = 0.5,
                     nonzero_loss_cutoff: float = 1.4) -> Tensor:
    """Sampling probabilities [B, B] of the negatives of each anchor row (rows sum to 1).

    dist [B, B] distances, same [B, B] bool (same instance, diagonal included), dim = n."""
    d = dist.detach().to(torch.float64).clamp_min(cutoff)
    log_w = (2.0 - dim) * d.log() - ((dim - 3.0) / 2.0) * torch.log((1.0 - 0.25 * d * d).clamp_min(1e-8))
    allowed = ~same & (dist.detach() < nonzero_loss_cutoff)
    log_w = log_w.masked_fill(~allowed, float("-inf"))
    row_max = log_w.amax(dim=1, keepdim=True)
    w = torch.exp(log_w - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    w = torch.nan_to_num(w, nan=0.0)
    empty = w.sum(dim=1, keepdim=True) == 0
    w = torch.where(empty, (~same).to(w.dtype), w)  # fallback: uniform over other instances
    return w / w.sum(dim=1, keepdim=True).clamp_min(1e-300)


@register_loss("margin")
class MarginLoss(nn.Module):
    """criterion(embeddings [B, D], instance_ids [B]) -> (loss, metrics) (module docstring).

    Args:
        alpha: margin α around the boundary.
        beta_init: initial boundary β (a parameter).
        cutoff: lower clamp of distances in the sampling weights.
        nonzero_loss_cutoff: negatives at or beyond this distance are never drawn.
    metrics: "beta", "active" (fraction of active terms), "d_pos", "d_neg" (mean distances).
    """

    def __init__(self, alpha: float = 0.2, beta_init: float = 1.2, cutoff: float = 0.5,
                 nonzero_loss_cutoff: float = 1.4) -> None:
        super().__init__()
        if alpha < 0 or not 0 <= cutoff < nonzero_loss_cutoff <= 2.0:
            raise ValueError(f"margin: need alpha >= 0 and 0 <= cutoff < nonzero_loss_cutoff <= 2, got "
                             f"alpha={alpha}, cutoff={cutoff}, nonzero_loss_cutoff={nonzero_loss_cutoff}")
        self.alpha, self.cutoff, self.nonzero_loss_cutoff = float(alpha), float(cutoff), float(nonzero_loss_cutoff)
        self.beta = nn.Parameter(torch.tensor(float(beta_init)))

    def beta_parameters(self) -> list[nn.Parameter]:
        """Parameters for an optimizer group without weight decay."""
        return [self.beta]

    def sample(self, dist: Tensor, ids: Tensor, dim: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """(anchor, positive, negative) indices [P] each: every positive pair once per direction,
        one negative drawn for it from the anchor's row of negative_weights (dim = embedding size);
        -1 where the batch holds no other instance (that pair gets no negative term)."""
        same = ids.view(-1, 1) == ids.view(1, -1)
        pos = same & ~torch.eye(len(ids), dtype=torch.bool, device=ids.device)
        anchor, positive = pos.nonzero(as_tuple=True)
        if len(anchor) == 0:
            empty = anchor.new_zeros(0)
            return empty, empty, empty
        probs = negative_weights(dist, same, dim, self.cutoff,
                                 self.nonzero_loss_cutoff)
        rows = probs[anchor]
        lonely = rows.sum(dim=1) == 0  # the batch holds no other instance: no negative (marked -1)
        rows = torch.where(lonely[:, None], torch.ones_like(rows), rows)
        negative = torch.multinomial(rows, 1, replacement=True, generator=generator).view(-1)
        return anchor, positive, torch.where(lonely, torch.full_like(negative, -1), negative)

    def forward(self, embeddings: Tensor, ids: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Metrics]:
        if embeddings.dim() != 2 or ids.shape != embeddings.shape[:1]:
            raise ValueError(f"margin: embeddings must be [B, D] and instance ids [B], got "
                             f"{tuple(embeddings.shape)} and {tuple(ids.shape)}")
        x = embeddings.to(compute_dtype(embeddings))
        dist = pairwise_distances(x)
        anchor, positive, negative = self.sample(dist, ids, x.shape[1], generator)
        beta = self.beta.to(x.dtype)
        has_neg = negative >= 0
        d_pos, d_neg = dist[anchor, positive], dist[anchor, negative.clamp_min(0)]
        pos_terms = (self.alpha + d_pos - beta).clamp_min(0)
        neg_terms = torch.where(has_neg, (self.alpha - d_neg + beta).clamp_min(0), torch.zeros_like(d_neg))
        active = (pos_terms > 0).sum() + (neg_terms > 0).sum()
        loss = (pos_terms.sum() + neg_terms.sum()) / active.clamp_min(1).to(x.dtype)
        if len(anchor) == 0:  # no positives in the batch: a zero that still reaches beta and the inputs
            loss = 0.0 * (beta + x.sum())
        terms = max(2 * len(anchor), 1)
        metrics = {"beta": self.beta.detach().float(), "active": active.detach().float() / terms,
                   "d_pos": d_pos.detach().float().mean() if len(anchor) else x.new_zeros(()).float(),
                   "d_neg": d_neg[has_neg].detach().float().mean() if bool(has_neg.any()) else x.new_zeros(()).float()}
        return loss, metrics

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}"
