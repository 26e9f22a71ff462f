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
    idx_path: Optional[str] = None
    """face_recordio: the .idx of the .rec file given as data.path (default: data.path with suffix .idx)."""
    image_size: int = 112
    """face: side S of the square training images (aligned faces: 112); records of another size are resized,
    and the backbone is built for this input size."""
    dali: bool = False
    """face_recordio: decode, flip and normalise with NVIDIA DALI (GPU 'mixed' decoding under CUDA, CPU
    otherwise); if nvidia.dali cannot be imported the PyTorch reader is used and a warning printed."""
    random_flip: bool = True
    """face: horizontal flip of each training image with probability 0.5."""
    num_workers: int = 2
    """face: DALI decoding threads (data.dali); worker processes of face loaders built with
    mhe_scale.data.dali_face.build_face_loader (engine.fit reads in the main process)."""
    text_format: str = "auto"
    """'xmc_text': raw (AttentionXML/LightXML folder: {train,test}_raw_texts.txt + _labels.txt), jsonl
    (trn.json.gz / tst.json.gz label-feature files), reuters (one JSON array, split here) or auto (detect)."""
    max_length: int = 128
    """'xmc_text': tokens per document after truncation, [CLS] and [SEP] included."""
    text_fields: list[str] = field(default_factory=lambda: ["title", "content"])
    """'xmc_text' jsonl: keys of each JSON line joined (by a space) into the document text."""
    test_fraction: float = 0.25
    """'xmc_text' reuters: fraction of the documents held out as the test split (seeded by data.seed)."""
    cache_dir: Optional[str] = None
    """'xmc_text': folder of the HF datasets cache (rows and tokenised splits); None = datasets' default."""
    num_proc: int = 1
    """'xmc_text': processes for tokenisation (Dataset.map num_proc)."""
    max_train_points: Optional[int] = None
    """'xmc_text': keep only the first N training documents (smoke runs); None = all."""
    max_test_points: Optional[int] = None
    """'xmc_text': keep only the first N test documents (smoke runs); None = all."""
    streaming: bool = False
    """'xmc_text': read the training split as a stream while training (nothing cached; one counting pass
    first) instead of caching it as Arrow files; the test split is cached either way."""
    shuffle_buffer: int = 10000
    """'xmc_text' streaming: rows in the seeded shuffle buffer (<= 1: file order every epoch)."""


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
    width_mult: float = 1.0
    """mobilefacenet: channel width multiplier (small values for tests and CPU runs)."""
    path: Optional[str] = None
    """hf: local HF model folder (config.json, weights, tokenizer) or the alias 'minilm'; never downloaded."""
    last_k_cls: int = 1
    """hf: concatenate the [CLS] vectors of the last k layers (num_features = k * hidden; LightXML: 5)."""
    pooling: str = "cls"
    """hf: per-layer vector, cls (first token) or mean (attention-masked token mean)."""
    freeze_layers: int = 0
    """hf: freeze the embeddings and the lowest n transformer layers (0 = fine-tune everything)."""
    grad_checkpointing: bool = False
    """hf: recompute layer activations in backward (less memory, slower steps)."""
    sync_batchnorm: bool = False
    """face: with several processes, BatchNorm statistics over all of them (torch.nn.SyncBatchNorm, GPU
    only); false: each process normalises with its own micro-batch (differs from one process)."""


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
    level_weights: Optional[list[float]] = None
    """mhc: loss weight of each level (group level first); default all 1."""


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
    swa_start: Optional[int] = None
    """Stochastic weight averaging from this optimizer step on, used for evaluation (None: off)."""
    swa_start_epoch: Optional[float] = None
    """SWA from this epoch on (LightXML's swa_warmup), converted to a step with the run's steps per
    epoch; give it or swa_start, not both."""
    swa_every: int = 1
    """SWA: average the weights every this many optimizer steps."""
    save_every: int = 0
    """Optimizer steps between checkpoints under output_dir/.../checkpoints (0: no checkpoints); the last step is saved too."""
    keep_last: int = 3
    """Checkpoints kept on disk (oldest deleted first; 0 keeps all)."""
    resume: Union[bool, str] = "auto"
    """auto: continue from the newest valid checkpoint if one exists; true: must resume; false: start fresh."""
    loss_log: bool = True
    """Write every optimizer step's loss (and lr) to loss_log.jsonl in the run's output folder."""
    eval_every: int = 0
    """Optimizer steps between evaluations on the test set during training (0: only at the end);
    the metrics go to the trackers (dist.log_with) and to eval_log.jsonl in the run's folder."""
    num_workers: int = 0
    """DataLoader worker processes that build the training batches (0: the training process itself).
    Use them when batches are costly to make (decoding face images with PIL); the data order and
    the datasets' own per-point randomness (seeded by index) do not depend on it."""


@dataclass(kw_only=True)
class DistConfig:
    """How the processes train together (see mhe_scale/engine/accelerator.py and launch/README.md).
    The number of processes and machines comes from the launcher, not from here."""

    mixed_precision: Optional[str] = None
    """no | bf16 | fp16 (GPU only); None: the launcher's choice (accelerate launch --mixed_precision), else no.
    The encoder runs in that precision; heads always compute fp32 logits and losses."""
    deepspeed_config: Optional[str] = None
    """DeepSpeed JSON file (e.g. launch/deepspeed/zero2.json): train the encoder with DeepSpeed ZeRO. Its "auto"
    entries are filled from train.* and dist.mixed_precision; numbers there must agree with them."""
    zero_stage: Optional[int] = None
    """DeepSpeed ZeRO stage 0-3 without a JSON file (a minimal config is generated); with deepspeed_config it
    replaces the file's stage. None and no deepspeed_config: no DeepSpeed (unless the launcher asked for it)."""
    log_with: Optional[str] = None
    """Experiment tracker: tensorboard (event files under train.output_dir/tensorboard) or None (off)."""
    shard_head: bool = False
    """Split the head's classes (or groups, or label table) across all processes (mhe_scale.parallel):
    fc, partial_fc, mhs and mhc; kept out of DDP / ZeRO with its own optimizer and per-rank files."""


@dataclass(kw_only=True)
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    """k values for P@k / nDCG@k."""
    baseline: Optional[HeadConfig] = None
    """Optionally also train this head on the same data and report both (demo comparison)."""
    verification: list[str] = field(default_factory=list)
    """face: .bin pair files (LFW, CFP-FP, AgeDB-30 layout) scored with the 10-fold protocol after training
    and every train.eval_every steps; empty: no verification."""
    prediction_k: int = 0
    """XMC tasks: also write the top-k test predictions of each head to its run folder
    (predictions.txt, 'id:score' pairs best first, one line per test point, the format
    tools/eval_xmc.py reads); 0: none."""


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = "experiment"
    """Run name (used in output_dir)."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
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


_PATH_LIST_KEYS = (("eval", "verification"),)


def _one_path_as_list(raw: DictConfig) -> DictConfig:
    """A single path given where a list of paths is expected (`eval.verification=/x.bin`) -> [path]."""
    for section, key in _PATH_LIST_KEYS:
        node = raw.get(section) if isinstance(raw, DictConfig) else None
        if isinstance(node, DictConfig) and isinstance(node.get(key), str):
            node[key] = [node[key]] if node[key] else []
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = ExperimentConfig) -> Any:
    """YAML file (optional) + dotted overrides -> a validated, read-only config object.

    Overrides look like `head.sizes=[317,316]`, `optim.lr=0.1`, `head.margin=null`.
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        try:
            cfg = OmegaConf.merge(cfg, _one_path_as_list(_read_yaml(Path(path))))
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=0.1")
        try:
            cfg = OmegaConf.merge(cfg, _one_path_as_list(OmegaConf.from_dotlist([item])))
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
           "DistConfig", "EvalConfig", "ExperimentConfig", "load_config", "to_yaml", "to_object", "MISSING"]
