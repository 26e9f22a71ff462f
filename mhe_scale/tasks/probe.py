"""The classifier stage on a frozen pre-trained backbone (Kang et al. 2020 / 2021): a linear probe
(data.sampler=epoch) or cRT, classifier re-training with class-balanced sampling
(data.sampler=class_balanced), then accuracy overall and by shot group and the tau-normalised
classifier for every tau of probe.taus, all from one pass over the test set.

    mhe-scale train configs/longtail/cifar10_lt100_probe.yaml probe.checkpoint=runs/.../kcl [data.sampler=class_balanced]

probe.checkpoint: a model.safetensors, a step folder holding one, or a run folder: its NEWEST
checkpoints/step-* folder whose manifest verifies (engine/checkpoint.py; a newer folder that fails
verification is skipped with a warning naming it and why; a step folder named directly must verify).
A relative path is looked for from the working directory, then from the repository root, like the
other config paths (tasks/paths.py). The run prints which file it read. The backbone is read from its
"encoder.*" weights (contrastive and classify checkpoints name it so). The backbone stays in eval mode
(BN statistics frozen) with no gradient; after training every backbone tensor is compared with the
loaded one and a change is an error.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.config import ExperimentConfig
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset
from mhe_scale.data.image_folder import list_file_records
from mhe_scale.data.image_source import ImageDataConfig, task_records
from mhe_scale.data.longtail import counts_from_labels, shot_groups
from mhe_scale.engine.loop import fit, named_sampler
from mhe_scale.engine.model import make_optimizer
from mhe_scale.engine.run_identity import run_config
from mhe_scale.engine.module import Metrics, TrainingModule
from mhe_scale.engine.run_folder import NoCheckpointError, find_checkpoint
from mhe_scale.eval.longtail import TAUS, extract_features, shot_accuracy, shot_counts, tau_predictions
from mhe_scale.models.image import ImageModelConfig, build_image_model
from mhe_scale.models.state_fit import StateFitError, load_fitting, read_weights
from mhe_scale.tasks.paths import config_path_candidates
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import write_results


@dataclass(kw_only=True)
class ProbeSection:
    """probe section: which pre-trained backbone, and the tau grid."""

    checkpoint: Optional[str] = None
    """model.safetensors, a checkpoints/step-* folder, or a run folder (its newest verified step)."""
    taus: list[float] = field(default_factory=lambda: list(TAUS))
    """tau-normalisation grid: w_c / ||w_c||^tau, bias dropped (0 = the raw weights)."""
    bias: bool = True
    """The linear classifier's bias (tau-normalised scores never use it)."""
    shot_counts_from: Optional[str] = None
    """A list file (`path label` lines) whose per-class counts define the many / medium / few groups
    (default: the training records'). The balancedness report trains on balanced data and groups the
    classes by the long-tailed pre-training set's counts."""


@dataclass(kw_only=True)
class ProbeConfig(ExperimentConfig):
    task: str = "probe"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    probe: ProbeSection = field(default_factory=ProbeSection)


def resolve_checkpoint(path: str | Path) -> Path:
    """The model.safetensors a probe.checkpoint names (module docstring); errors say what was found.

    A run folder gives its newest step folder that verifies and holds model.safetensors; each newer
    one skipped is warned about (warnings.warn, naming it and why)."""
    p = next((c for c in config_path_candidates(str(path)) if c.exists()), Path(path))
    if p.is_file():
        return p
    try:
        found = find_checkpoint(p)
    except NoCheckpointError as err:
        raise NoCheckpointError(f"probe.checkpoint={str(path)!r}: {err}; point it at a pre-training run's folder") from None
    except ValueError as err:
        raise ValueError(f"probe.checkpoint={str(path)!r}: {err}") from None
    for older, why in found.skipped:
        warnings.warn(f"probe.checkpoint: {older} is newer than {found.folder.name} but unusable ({why}); "
                      f"reading {found.folder.name}", stacklevel=2)
    return found.folder / "model.safetensors"


def load_backbone(backbone: nn.Module, path: str | Path, prefix: str = "encoder.") -> dict[str, Tensor]:
    """Load the `prefix`* weights of the checkpoint into backbone (all of them, strictly); returns them."""
    file = resolve_checkpoint(path)
    state = read_weights(file, "point probe.checkpoint at a finished run folder")
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not tensors:
        raise ValueError(f"{file}: no '{prefix}*' weights (is it a contrastive / classify checkpoint?)")
    try:
        load_fitting(backbone, tensors)
    except StateFitError as err:  # another width / depth / stem: one line, not torch's one per tensor
        raise ValueError(f"{file}: its '{prefix}*' weights do not fit model.* ({err}); use the pre-training "
                         "run's model section") from None
    return tensors


class LinearProbe(TrainingModule):
    """Frozen backbone (eval mode, no gradient) + Linear(D, C) trained with CE. Checkpoint names
    "encoder.*" and "fc.*"."""

    def __init__(self, encoder: nn.Module, num_classes: int, bias: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.fc = nn.Linear(encoder.num_features, num_classes, bias=bias)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.encoder.eval()  # BN statistics frozen, in training too
        return self

    def features(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.encoder.forward_features(x)

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        logits = self.fc(self.features(inputs).float())
        loss = F.cross_entropy(logits, targets)
        return loss, {"accuracy": (logits.detach().argmax(1) == targets).float().mean()}


def backbone_moved(encoder: nn.Module, loaded: dict[str, Tensor]) -> list[str]:
    """Names of backbone tensors (weights and BN statistics) that differ from the loaded ones."""
    return [k for k, v in encoder.state_dict().items() if not torch.equal(v.detach().cpu(), loaded[k].cpu())]


def probe_metrics(module: LinearProbe, test: ImageClassificationDataset, groups: Tensor, taus: list[float],
                  batch_size: int, accelerator=None) -> dict[str, float]:
    """Accuracy (percent-free, in [0, 1]) overall / many / medium / few of the classifier and of its
    tau-normalised versions, from one feature pass over the test set."""
    feats, labels = extract_features(module.encoder, test, batch_size, accelerator, "probe eval")
    with torch.no_grad():
        plain = module.fc(feats.to(module.fc.weight.device)).argmax(1)
        by_tau = tau_predictions(feats.to(module.fc.weight.device), module.fc.weight, taus)
    out = shot_accuracy(shot_counts(plain, labels, groups))
    for tau, pred in zip(taus, by_tau):
        out |= {f"tau{tau:g}_{k}": v for k, v in shot_accuracy(shot_counts(pred, labels, groups)).items()}
    return out


@register_task("probe", ProbeConfig, "linear probe / cRT on a frozen pre-trained backbone; accuracy by shot group "
               "and tau-normalisation", data_names=())
def run_probe(cfg: ProbeConfig, accelerator) -> dict[str, dict[str, Any]]:
    if not cfg.probe.checkpoint:
        raise ValueError("probe.checkpoint is not set; point it at a pre-training run (tasks/contrastive.py)")
    train_records, test_records = task_records(cfg.data, accelerator)
    num_classes = cfg.data.num_classes or int(train_records.labels.max()) + 1
    size = cfg.data.image_size
    train = ImageClassificationDataset(train_records, transform_preset(cfg.data.preset, True, size=size), cfg.data.seed)
    test = ImageClassificationDataset(test_records, transform_preset(cfg.data.preset, False, size=size))
    torch.manual_seed(cfg.train.seed)
    backbone = build_image_model(cfg.model)
    checkpoint = resolve_checkpoint(cfg.probe.checkpoint)
    loaded = load_backbone(backbone, checkpoint)
    module = LinearProbe(backbone, num_classes, cfg.probe.bias)
    optimizer = make_optimizer(cfg.optim, [{"params": list(module.fc.parameters()), "lr": cfg.optim.lr, "name": "fc"}])
    group_labels = train_records.labels
    if cfg.probe.shot_counts_from:
        if not Path(cfg.probe.shot_counts_from).is_file():
            raise FileNotFoundError(f"probe.shot_counts_from={cfg.probe.shot_counts_from!r} is not a file; give the "
                                    "long-tailed training list whose per-class counts define the shot groups")
        group_labels = list_file_records(cfg.probe.shot_counts_from, ".", check_exists=False).labels
    groups = torch.as_tensor(shot_groups(counts_from_labels(group_labels, num_classes)))
    sampler = None if cfg.data.sampler == "epoch" else named_sampler(cfg.data.sampler, torch.as_tensor(train.labels))
    folder = "crt" if cfg.data.sampler == "class_balanced" else f"probe-{cfg.data.sampler}"
    accelerator.print(f"{cfg.data.name}: {len(train):,} train / {len(test):,} test images, {num_classes} classes; "
                      f"backbone from {checkpoint}")

    def evaluate(ema=None) -> dict[str, float]:
        return probe_metrics(module, test, groups, list(cfg.probe.taus), cfg.train.eval_batch_size, accelerator)

    start = time.perf_counter()
    result = fit(module, optimizer, train, cfg.train, accelerator, desc=f"train {folder}",
                 out_dir=Path(cfg.train.output_dir) / folder, eval_fn=evaluate, run_name=folder, sampler=sampler,
                 run_config=run_config(cfg))
    moved = backbone_moved(module.encoder, loaded)
    if moved:
        raise RuntimeError(f"probe: backbone tensors changed during training: {moved[:5]}")
    metrics = evaluate()
    costs = {"train s": result.seconds, "samples/s": result.samples_per_second, "final loss": result.last_loss,
             "total s": time.perf_counter() - start}
    results = {folder: {"metrics": metrics, "costs": costs}}
    write_results(cfg, results, accelerator, note="backbone unchanged (every weight and BN statistic compared)")
    return results
