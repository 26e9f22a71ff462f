"""Generated extreme-label datasets with planted structure (the demo's built-in data).

Label frequencies follow a power law (the r-th most frequent label has weight r^-a; which label
gets which rank is random). Each label y has a prototype in R^input_dim built from latent
factors: y's mixed-radix digits (sizes from factorize(C, 2)) pick one vector from each factor
table, prototype = (A[d0] + B[d1]) / sqrt(2) + 0.5 * own_y, so labels share parts and a head
that factorises the label space can learn them from few examples; a point is the (mean of its
labels') prototype plus Gaussian noise. `shuffle_label_ids=True` permutes the ids so that the
factor structure no longer follows the ids (the harder case for MHE heads).
Everything is a pure function of the config, so every process generates the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mhe_scale.labels.codec import PAD, LabelCodec, factorize


@dataclass(kw_only=True)
class SyntheticDataConfig:
    """data section of the synthetic task (generated extreme-label data with planted structure)."""

    name: str = "synthetic"
    """Dataset kind: 'synthetic' (generated, planted structure) or a reader name added by tasks."""
    num_classes: int = field(default=100_000, metadata={"min": 2})
    """Synthetic: number of labels C."""
    num_train: int = field(default=60_000, metadata={"min": 1})
    """Synthetic: training points."""
    num_test: int = field(default=5_000, metadata={"min": 1})
    """Synthetic: test points."""
    input_dim: int = 64
    """Synthetic: dimension of the input vectors."""
    labels_per_point: int = 1
    """Synthetic: 1 = single-label; >1 = multi-label, about this many labels drawn per point
    (uniform 1..2n-1 draws by label frequency; repeats within a point are dropped)."""
    zipf_exponent: float = 1.1
    """Synthetic: label frequency of the r-th most frequent label is proportional to r^-exponent."""
    noise: float = 0.35
    """Synthetic: std of the per-point noise relative to the unit-scale label prototypes."""
    shuffle_label_ids: bool = False
    """Synthetic: permute label ids so they no longer follow the planted factor structure."""
    seed: int = 0
    """Seed of the generator (data is a pure function of the config)."""


@dataclass(frozen=True)
class SyntheticSplit(Dataset):
    """inputs [N, input_dim] float32; targets [N] (single-label) or [N, L] padded with -1."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.inputs[i], self.targets[i]


@dataclass(frozen=True)
class SyntheticData:
    train: SyntheticSplit
    test: SyntheticSplit
    num_classes: int
    multilabel: bool
    label_counts: Tensor
    """Training frequency of each label [C] (for propensity-scored metrics)."""


def zipf_weights(num_classes: int, exponent: float, gen: torch.Generator) -> Tensor:
    """Sampling weight per label id: rank r (random per id) gets r^-exponent, normalised."""
    ranks = torch.randperm(num_classes, generator=gen).double() + 1.0
    weights = ranks.pow(-exponent)
    return weights / weights.sum()


def label_prototypes(num_classes: int, dim: int, gen: torch.Generator) -> Tensor:
    """[C, dim] unit-scale prototypes sharing two latent factor tables (see module doc)."""
    codec = LabelCodec(factorize(num_classes, 2), num_classes)
    digits = codec.encode(torch.arange(num_classes), check=False)
    tables = [torch.randn(c, dim, generator=gen) for c in codec.sizes]
    shared = (tables[0][digits[:, 0]] + tables[1][digits[:, 1]]) / 2 ** 0.5
    own = torch.randn(num_classes, dim, generator=gen)
    proto = shared + 0.5 * own
    return proto / proto.norm(dim=1, keepdim=True) * dim ** 0.5 / 4


def _sample_labels(n: int, per_point: int, weights: Tensor, gen: torch.Generator) -> Tensor:
    if per_point == 1:
        return torch.multinomial(weights, n, replacement=True, generator=gen)
    # multi-label: draw 1..2*per_point-1 labels per point (mean per_point) with replacement, in
    # one vectorised call, then drop repeats within a row; rows are padded with PAD at the end
    counts = torch.randint(1, 2 * per_point, (n,), generator=gen)
    width = int(counts.max())
    drawn = torch.multinomial(weights, n * width, replacement=True, generator=gen).view(n, width)
    keep = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)
    rows = torch.where(keep, drawn, torch.full_like(drawn, PAD)).sort(dim=1).values
    repeat = torch.zeros_like(rows, dtype=torch.bool)
    repeat[:, 1:] = rows[:, 1:] == rows[:, :-1]
    rows = rows.masked_fill(repeat, PAD)
    pads_last = (rows == PAD).to(torch.int8).argsort(dim=1, stable=True)
    return rows.gather(1, pads_last)


def _inputs(targets: Tensor, proto: Tensor, noise: float, gen: torch.Generator) -> Tensor:
    if targets.dim() == 1:
        clean = proto[targets]
    else:
        valid = (targets != PAD).unsqueeze(-1).float()
        clean = (proto[targets.clamp(min=0)] * valid).sum(1) / valid.sum(1)
    scale = proto.norm(dim=1).mean() / proto.shape[1] ** 0.5
    return clean + noise * scale * torch.randn(clean.shape, generator=gen)


def make_synthetic(cfg: SyntheticDataConfig) -> SyntheticData:
    """Build train and test splits from a SyntheticDataConfig (name 'synthetic')."""
    if cfg.num_classes < 2:
        raise ValueError(f"data.num_classes must be >= 2, got {cfg.num_classes}")
    if cfg.labels_per_point < 1:
        raise ValueError(f"data.labels_per_point must be >= 1, got {cfg.labels_per_point}")
    gen = torch.Generator().manual_seed(cfg.seed)
    proto = label_prototypes(cfg.num_classes, cfg.input_dim, gen)
    if cfg.shuffle_label_ids:
        proto = proto[torch.randperm(cfg.num_classes, generator=gen)]
    weights = zipf_weights(cfg.num_classes, cfg.zipf_exponent, gen)
    splits = []
    for n in (cfg.num_train, cfg.num_test):
        targets = _sample_labels(n, cfg.labels_per_point, weights, gen)
        splits.append(SyntheticSplit(_inputs(targets, proto, cfg.noise, gen), targets))
    train_targets = splits[0].targets
    flat = train_targets[train_targets != PAD] if train_targets.dim() == 2 else train_targets
    counts = torch.bincount(flat, minlength=cfg.num_classes)
    return SyntheticData(splits[0], splits[1], cfg.num_classes, cfg.labels_per_point > 1, counts)
