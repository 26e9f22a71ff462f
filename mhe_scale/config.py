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

from mhe_scale.config_checks import bound_errors, merge_conflict, section_shape_errors


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


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
    head_momentum: Optional[float] = None
    """sgd momentum of the head, if different (default: momentum). 0 keeps no momentum buffer for the head: with
    the row-sparse update its state is then the weights plus one int64 step counter per row (C x 8 bytes)
    instead of twice the weights (docs/engine.md, "Row-sparse head updates")."""
    fused: bool = False
    """adamw: torch's fused kernel (torch.optim.AdamW(fused=True)): one pass over each parameter; on CPU ~7x faster
    than the default foreach step for a 10M-parameter layer (a TF-IDF MLP's first layer)."""
    no_decay_bias_norm: bool = False
    """Weight decay 0 for parameters with at most one dimension (biases, LayerNorm / BatchNorm weights), as
    LightXML's AdamW does (no_decay = bias, LayerNorm.weight); False: weight_decay applies to every parameter."""
    head_update: str = "auto"
    """auto | dense | sparse. sparse: a sampled head (partial_fc, mhs, mhc; class-sharded, dist.shard_head=true)
    updates only the rows a step touched, with lazy catch-up of skipped steps (docs/engine.md); dense: torch's
    optimizer over the whole head (insightface's semantics). auto: sparse for a class-sharded sampled head,
    dense otherwise."""
    head_catch_up: str = "closed_form"
    """closed_form | replay: how the sparse update applies a row's skipped steps. closed_form: one float64 product
    per row (equals dense to float rounding per catch-up; the cheap default); replay: step by step in float32 as
    the dense optimizer does (bit for bit dense, at its cost for those rows). docs/engine.md, "Row-sparse head
    updates"."""


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = 2.0
    """Passes over the training set (fractions allowed)."""
    max_steps: Optional[int] = field(default=None, metadata={"min": 1})
    """Train exactly this many optimizer steps, however many epochs that takes (it replaces train.epochs, as
    HF Trainer's max_steps does; None: train.epochs decides). The lr schedule, warm-up (clamped) and the last
    checkpoint span these steps; a resume continues to them (docs/engine.md, "Run length")."""
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
    """Learning-rate shape after warmup: constant | cosine | poly (counted in optimizer steps); or onecycle
    (cosine up from lr * initial_lr_ratio to lr over the warmup, then cosine down to lr * min_lr_ratio,
    as torch's OneCycleLR; the warmup is its pct_start * total steps)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from lr/warmup_steps up to lr."""
    min_lr_ratio: float = 0.0
    """cosine / poly: final learning rate as a fraction of lr."""
    poly_power: float = 1.0
    """poly: exponent of (1 - progress); 1.0 is linear decay."""
    initial_lr_ratio: float = 0.04
    """onecycle: the lr of the first step as a fraction of lr (torch's 1 / div_factor = 1 / 25)."""
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
    resume_changed: bool = False
    """Resume a checkpoint even though the run-defining config differs from the one it was written
    with (each difference is printed; the new optimizer settings apply from the resumed step on).
    False: such a resume is refused with the list of differing keys (docs/engine.md)."""
    sam_rho: Optional[float] = None
    """Sharpness-Aware Minimization radius rho (Foret et al. 2021; 0.05 in the paper): each optimizer step
    takes its gradient at w + rho g/||g|| (a second forward / backward; engine/sam.py). None: off.
    Refused with DeepSpeed, a class-sharded head, grad_accum_steps > 1 and fp16."""
    warmup_epochs: Optional[float] = None
    """Linear warmup given in epochs (converted with the run's steps per epoch, so it holds for any
    number of processes); give it or warmup_steps, not both."""


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
    timeout_s: float = 600.0
    """Seconds a process waits in a collective (all-reduce, barrier, ...) for the others before it stops with
    an error naming the rank that did not answer (a hung, stopped or cut-off process / node); torch's own
    default would be 30 min (gloo) or 10 min (NCCL). Raise it if one rank legitimately works alone longer."""


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
    """The sections every task shares. A task's schema (mhe_scale.tasks, `mhe-scale tasks`) subclasses
    it with its own typed `data` and `model` sections."""

    name: str = "experiment"
    """Run name (used in output_dir)."""
    task: str = "synthetic"
    """Registered task that trains this config (mhe-scale tasks lists them); when a file leaves it out,
    it is inferred from data.name."""
    data: Any = None
    """The task's data section."""
    model: Any = None
    """The task's model section."""
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
    return _merge(parent, raw, f"{path} (over its _base_ {base})")


def _merge(base: DictConfig, delta: DictConfig, source: str) -> DictConfig:
    """OmegaConf.merge, with a section given as a list or a value over a mapping named (OmegaConf raises
    a bare TypeError there)."""
    conflict = merge_conflict(base, delta)
    if conflict:
        raise ConfigError(f"{source}: {conflict}")
    try:
        return OmegaConf.merge(base, delta)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from exc


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = str(exc).split("\n")[0]
    return ConfigError(f"{source}: bad config key '{key}': {msg}")


def _unknown_keys(raw: Any, schema: Any, prefix: str = "") -> list[str]:
    """Every dotted key of the raw tree that the dataclass `schema` does not declare."""
    import dataclasses
    import typing

    if not isinstance(raw, DictConfig) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema if isinstance(schema, type) else type(schema))
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = []
    for key in raw.keys():
        dotted = f"{prefix}{key}"
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            unknown.append(dotted + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
            continue
        kind = hints.get(str(key))
        for arg in (typing.get_args(kind) or (kind,)):
            if dataclasses.is_dataclass(arg):
                unknown += _unknown_keys(raw._get_node(key), arg, dotted + ".")
                break
    return unknown


def _apply_override(raw: DictConfig, item: str) -> DictConfig:
    """key=value onto the raw tree; `section={...}` (a whole section given as a mapping) REPLACES it
    (head={name:fc,cosine:true} switches the head without resetting the old head's keys one by one)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=0.1")
    key, value = item.split("=", 1)
    key = key.strip()
    whole_section = "." not in key and value.strip().startswith("{")
    if whole_section:
        import re

        item = f"{key}=" + re.sub(r"([{,]\s*[A-Za-z_][\w]*):(?=\S)", r"\1: ", value)  # {name:fc} as {name: fc}
    try:
        parsed = OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as exc:
        raise _explain(exc, f"override {item!r}") from exc
    if whole_section:
        raw = raw.copy()
        raw[key] = parsed[key]
        return raw
    return _merge(raw, parsed, f"override {item!r}")


_PATH_LIST_KEYS = (("eval", "verification"),)


def _one_path_as_list(raw: DictConfig) -> DictConfig:
    """A single path given where a list of paths is expected (`eval.verification=/x.bin`) -> [path]."""
    for section, key in _PATH_LIST_KEYS:
        node = raw.get(section) if isinstance(raw, DictConfig) else None
        if isinstance(node, DictConfig) and isinstance(node.get(key), str):
            node[key] = [node[key]] if node[key] else []
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                schema: type | None = None) -> Any:
    """YAML file (optional) + dotted overrides -> a validated, read-only config object.

    Overrides look like `head.sizes=[317,316]`, `optim.lr=0.1`, `head.margin=null`, or a whole
    section `head={name:fc,cosine:true}`. The schema is the task's (`task:` in the file, or inferred
    from data.name; mhe_scale.tasks); every key it does not declare is named in one error.
    """
    raw: DictConfig = _read_yaml(Path(path)) if path is not None else OmegaConf.create({})
    for item in overrides or []:
        raw = _apply_override(raw, item)
    raw = _one_path_as_list(raw)
    source = f"{path}" + (" + overrides" if overrides else "") if path is not None else "overrides"
    if schema is None:
        from mhe_scale.tasks.registry import resolve_task

        task = resolve_task(raw, source)
        schema = task.schema
        if "task" not in raw:
            raw.task = task.name
    shapes = section_shape_errors(raw, schema)
    if shapes:
        raise ConfigError(f"{source}: {shapes[0]}")
    unknown = _unknown_keys(raw, schema)
    if unknown:
        where = f"task {raw.get('task')!r}" if "task" in raw else schema.__name__
        raise ConfigError(f"{source}: {where} does not take key(s) {', '.join(unknown)} (mhe-scale tasks lists "
                          "each task's keys); remove or rename them")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), raw)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from exc
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "interpolation") from exc
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config keys without a value: {missing}; set them in the YAML or as key=value")
    low = bound_errors(cfg, schema)
    if low:
        raise ConfigError(f"{source}: {'; '.join(low)}")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (saved with every run)."""
    return OmegaConf.to_yaml(cfg)


def to_object(cfg: Any) -> Any:
    """A plain dataclass instance (detached from OmegaConf) of a loaded config."""
    return OmegaConf.to_object(cfg)


__all__ = ["ConfigError", "HeadConfig", "OptimConfig", "TrainConfig",
           "DistConfig", "EvalConfig", "ExperimentConfig", "load_config", "to_yaml", "to_object", "MISSING"]
