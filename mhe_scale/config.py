"""Typed experiment configs: dataclasses + YAML + dotted command-line overrides (OmegaConf).

    cfg = load_config("configs/demo/mhp_synthetic.yaml", ["head.sizes=[317,316]", "optim.lr=0.1"])

A YAML file is a delta over the defaults below; `_base_: other.yaml` (relative path) merges
another file first. Loading is strict: an unknown key or a value of the wrong type raises
ConfigError naming the key (and the file). Each component receives only its own sub-config.
Derived quantities (steps, warmup) are computed elsewhere into frozen plans, never written back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


@dataclass(kw_only=True)
class DataConfig:
    name: str = "synthetic"
    """Dataset kind: 'synthetic' (generated, planted structure) or a reader name added by tasks."""
    path: Optional[str] = None
    """Folder or file of a real dataset (unused by 'synthetic'). 'xc': a folder holding train.txt and
    test.txt in the Extreme Classification Repository format; a relative path is looked up from the
    working directory, then from the repository root."""
    normalize: str = "tfidf"
    """'xc': feature scaling, none | l2 | tfidf (idf from the training split, then L2 per row)."""
    label_order: str = "given"
    """'xc': label ids as in the files (given) or renumbered so that similar labels get neighbouring ids,
    hence share MHE prefixes / MHC groups (cluster: balanced 2-means tree over the training data)."""
    propensity_a: float = 0.55
    """A of the inverse propensities for PSP@k (Jain et al. 2016; 0.6 for Amazon, 0.5 for Wikipedia)."""
    propensity_b: float = 1.5
    """B of the inverse propensities for PSP@k (2.6 for Amazon, 0.4 for Wikipedia)."""
    num_classes: int = 100_000
    """Synthetic: number of labels C."""
    num_train: int = 60_000
    """Synthetic: training points."""
    num_test: int = 5_000
    """Synthetic: test points."""
    input_dim: int = 64
    """Synthetic: dimension of the input vectors."""
    labels_per_point: int = 1
    """Synthetic: 1 = single-label; >1 = multi-label with this many labels on average."""
    zipf_exponent: float = 1.1
    """Synthetic: label frequency of the r-th most frequent label is proportional to r^-exponent."""
    noise: float = 0.35
    """Synthetic: std of the per-point noise relative to the unit-scale label prototypes."""
    shuffle_label_ids: bool = False
    """Synthetic: permute label ids so they no longer follow the planted factor structure."""
    seed: int = 0
    """Seed of the generator (data is a pure function of the config)."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "mlp"
    """Encoder: 'mlp' (more are registered by tasks)."""
    hidden: int = 512
    """Hidden width of the MLP encoder."""
    num_features: int = 256
    """Embedding size D that the head sees."""
    depth: int = 2
    """Number of hidden layers."""
    dropout: float = 0.0
    """Dropout before the embedding."""


@dataclass(kw_only=True)
class HeadConfig:
    """Head name plus the union of head arguments; unset (None) arguments keep the head's own
    default, and setting one the chosen head does not take is an error naming it."""

    name: str = "mhp"
    """Registered head: fc, partial_fc, mhp, mhc, mhs (see mhe_scale.heads.list_heads())."""
    sizes: Optional[list[int]] = None
    """MHE head sizes c_h (prod >= C); default factorize(C, num_heads)."""
    num_heads: Optional[int] = None
    """MHE: number of heads H when sizes is unset."""
    loss: Optional[str] = None
    """MHP: ce | bce | joint."""
    cosine: Optional[bool] = None
    """fc / mhs: cosine logits."""
    margin: Optional[list[float]] = None
    """(m1, m2, m3) combined margin: ArcFace [1.0, 0.5, 0.0], CosFace [1.0, 0.0, 0.4]."""
    scale: Optional[float] = None
    """Cosine logit scale s."""
    margin_straight_through: Optional[bool] = None
    """Margin changes values but not gradients (see CombinedMargin)."""
    bias: Optional[bool] = None
    """Bias on plain linear logits."""
    sample_rate: Optional[float] = None
    """partial_fc: fraction of classes in each softmax."""
    mode: Optional[str] = None
    """mhs: per_sample | batch_union."""
    num_sampled_groups: Optional[int] = None
    """mhs: groups per softmax."""
    num_groups: Optional[int] = None
    """mhc: number of label groups G (sizes = [G, ceil(C/G)])."""
    top_k_groups: Optional[int] = None
    """mhc: candidate groups K."""
    hidden: Optional[int] = None
    """mhc: label-embedding width."""
    beam: Optional[int] = None
    """mhc single-label: groups searched at prediction."""
    label_bias: Optional[bool] = None
    """mhc: per-label bias."""


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """adamw | sgd."""
    lr: float = 2e-3
    """Learning rate of the encoder (and of the head unless head_lr is set)."""
    head_lr: Optional[float] = None
    """Learning rate of the head, if different."""
    weight_decay: float = 0.0
    """Decoupled (adamw) or L2 (sgd) weight decay."""
    momentum: float = 0.9
    """sgd momentum."""


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = 2.0
    """Passes over the training set (fractions allowed)."""
    batch_size: int = 256
    """Per-process micro-batch size."""
    eval_batch_size: int = 1024
    """Batch size for evaluation."""
    log_every: int = 50
    """Steps between log lines."""
    output_dir: str = "runs/${name}"
    """Where the resolved config, metrics and checkpoints go."""
    seed: int = 0
    """Seed for initialisation and data order."""
    threads: Optional[int] = None
    """torch CPU threads (None: torch's default)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (global batch = batch_size * processes * grad_accum_steps)."""
    clip_grad_norm: Optional[float] = None
    """Clip the global L2 norm of the gradients to this value before each optimizer step (None: off)."""
    schedule: str = "constant"
    """Learning-rate shape after warmup: constant | cosine | poly (counted in optimizer steps)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps up to lr."""
    min_lr_ratio: float = 0.0
    """cosine / poly: final learning rate as a fraction of lr."""
    poly_power: float = 1.0
    """poly: exponent of (1 - progress); 1.0 is linear decay."""
    ema_decay: Optional[float] = None
    """Exponential moving average of the weights with this decay, used for evaluation (None: off)."""
    save_every: int = 0
    """Optimizer steps between checkpoints under output_dir/.../checkpoints (0: no checkpoints); the last step is saved too."""
    keep_last: int = 3
    """Checkpoints kept on disk (oldest deleted first; 0 keeps all)."""
    resume: Union[bool, str] = "auto"
    """auto: continue from the newest valid checkpoint if one exists; true: must resume; false: start fresh."""
    loss_log: bool = True
    """Write every optimizer step's loss (and lr) to loss_log.jsonl in the run's output folder."""


@dataclass(kw_only=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    """k values for P@k / nDCG@k."""
    baseline: Optional[HeadConfig] = None
    """Optionally also train this head on the same data and report both (demo comparison)."""


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    """Run name (used in output_dir)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through _base_")
    try:
        raw = OmegaConf.load(path)
    except Exception as exc:  # yaml errors carry line numbers in their text
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got a list")
    base = raw.pop("_base_", None)
    if base is None:
        return raw
    parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
    return OmegaConf.merge(parent, raw)  # type: ignore[return-value]


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).split("\n")[0]
    return ConfigError(f"{source}: bad config key '{key}': {msg}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = ExperimentConfig) -> Any:
    """YAML file (optional) + dotted overrides -> a validated, read-only config object.

    Overrides look like `head.sizes=[317,316]`, `optim.lr=0.1`, `head.margin=null`.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _read_yaml(Path(path)))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=0.1")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override {item!r}") from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "interpolation") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys without a value: {missing}; set them in the YAML or as key=value")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved with every run)."""
    return OmegaConf.to_yaml(cfg)


def to_object(cfg: Any) -> Any:
    """A plain dataclass instance (detached from OmegaConf) of a loaded config."""
    return OmegaConf.to_object(cfg)


__all__ = ["ConfigError", "DataConfig", "ModelConfig", "HeadConfig", "OptimConfig", "TrainConfig",
           "EvalConfig", "ExperimentConfig", "load_config", "to_yaml", "to_object", "MISSING"]
