"""Representation pre-training on (long-tailed) images (Kang et al. ICLR 2021): MoCo v1/v2, KCL, or
plain cross-entropy, trained by engine.fit; scored by weighted kNN on the test split, overall and by
shot group (many / medium / few by the training counts).

    mhe-scale train configs/longtail/cifar10_lt100_kcl.yaml [contrastive.method=moco train.epochs=1 ...]

contrastive.method: moco (InfoNCE, k = 0) | kcl (k_positives same-class queue positives) | ce (backbone +
the config's head, e.g. head.name fc, trained with its loss). Data as the classify task (data.format list with tools/make_longtail.py's lists).
Output: {output_dir}/{method}/checkpoints/step-*/model.safetensors (the backbone under "encoder.*",
which tasks/probe.py loads), loss_log.jsonl; results.json / results.md with the kNN accuracies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mhe_scale.config import ExperimentConfig
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset
from mhe_scale.data.image_source import ImageDataConfig, task_records
from mhe_scale.data.longtail import counts_from_labels, shot_groups
from mhe_scale.data.two_views import TwoViewDataset, contrastive_transform
from mhe_scale.engine.health import EmbeddingCheck
from mhe_scale.engine.loop import fit
from mhe_scale.engine.run_identity import run_config
from mhe_scale.engine.model import Classifier, make_optimizer, build_optimizer, build_run_head
from mhe_scale.eval.longtail import extract_features, knn_predict, shot_accuracy, shot_counts
from mhe_scale.models.image import ImageModelConfig, build_image_model
from mhe_scale.models.moco import MoCo, warn_if_queue_is_large
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import write_results

logger = logging.getLogger(__name__)
METHODS = ("moco", "kcl", "ce")


@dataclass(kw_only=True)
class ContrastiveSection:
    """contrastive section: the pre-training method and its MoCo / KCL settings."""

    method: str = "kcl"
    """moco | kcl | ce."""
    version: int = 2
    """MoCo v1 (linear projection, colour jitter always) | v2 (MLP projection, jitter p = 0.8)."""
    dim: int = 128
    """Embedding size of the projection."""
    queue_size: int = 65536
    """K: keys in the queue; divisible by train.batch_size x processes."""
    momentum: float = 0.999
    """m of the key encoder update θ_k <- m θ_k + (1 - m) θ_q."""
    temperature: float = 0.07
    """T of the softmax over {own key} ∪ queue (MoCo v1 0.07, v2 0.2)."""
    k_positives: Optional[int] = 6
    """kcl: same-class queue positives per anchor (null: all of them); moco uses 0."""
    unselected: str = "keep"
    """kcl: same-class queue entries not drawn are keep (negatives) | zero | mask."""
    split_bn: int = 1
    """BN sub-batches per process (single-device shuffle-BN; 8 as MoCo's 8 GPUs)."""
    shuffle_keys: bool = True
    """Shuffle the key batch across the BN splits."""
    knn_k: int = 200
    """kNN evaluation: neighbours."""
    knn_temperature: float = 0.1
    """kNN evaluation: vote weight exp(s / T)."""


@dataclass(kw_only=True)
class ContrastiveConfig(ExperimentConfig):
    task: str = "contrastive"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    contrastive: ContrastiveSection = field(default_factory=ContrastiveSection)


def check_contrastive(cfg: ContrastiveConfig, num_processes: int, num_train: int) -> None:
    """Raise ValueError naming the bad contrastive.* key; warn on a queue that is large for the data."""
    c = cfg.contrastive
    if c.method not in METHODS:
        raise ValueError(f"contrastive.method={c.method!r} must be one of {METHODS}")
    if c.method == "ce":
        return
    per_step = cfg.train.batch_size * num_processes
    if c.queue_size % per_step:
        raise ValueError(f"contrastive.queue_size={c.queue_size} must be divisible by train.batch_size x processes "
                         f"= {per_step} (keys enqueued per micro-batch); e.g. {max(1, c.queue_size // per_step) * per_step}")
    if cfg.train.batch_size % c.split_bn:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by contrastive.split_bn={c.split_bn}")
    warning = warn_if_queue_is_large(c.queue_size, num_train)
    if warning:
        logger.warning(warning)


def build_module(cfg: ContrastiveConfig, num_classes: int, rank: int = 0, world: int = 1, group=None):
    """The training module of contrastive.method (fresh backbone seeded by train.seed)."""
    c = cfg.contrastive
    torch.manual_seed(cfg.train.seed)
    backbone = build_image_model(cfg.model)
    if c.method == "ce":
        head = build_run_head(cfg.head, False, backbone.num_features, num_classes, False)
        return Classifier(backbone, head)
    return MoCo(backbone, dim=c.dim, mlp=c.version == 2, queue_size=c.queue_size, momentum=c.momentum,
                temperature=c.temperature, k_positives=0 if c.method == "moco" else c.k_positives,
                unselected=c.unselected, split_bn=c.split_bn, shuffle_keys=c.shuffle_keys, seed=cfg.train.seed,
                rank=rank, world=world, group=group)


def build_module_optimizer(cfg: ContrastiveConfig, module) -> torch.optim.Optimizer:
    if isinstance(module, Classifier):
        return build_optimizer(cfg.optim, module)
    return make_optimizer(cfg.optim, [{"params": [p for p in module.parameters() if p.requires_grad],
                                        "lr": cfg.optim.lr, "name": "encoder"}])


@register_task("contrastive", ContrastiveConfig, "representation pre-training (MoCo v1/v2, KCL, CE) on long-tailed "
               "images, kNN accuracy by shot group", data_names=())
def run_contrastive(cfg: ContrastiveConfig, accelerator) -> dict[str, dict[str, Any]]:
    from mhe_scale.parallel.collectives import world_group

    start = time.perf_counter()
    train_records, test_records = task_records(cfg.data, accelerator)
    num_classes = cfg.data.num_classes or int(train_records.labels.max()) + 1
    c = cfg.contrastive
    check_contrastive(cfg, accelerator.num_processes, len(train_records))
    size = cfg.data.image_size
    if c.method == "ce":
        train = ImageClassificationDataset(train_records, transform_preset(cfg.data.preset, True, size=size), cfg.data.seed)
    else:
        train = TwoViewDataset(train_records, contrastive_transform(cfg.data.preset, c.version, size), cfg.data.seed)
    plain = ImageClassificationDataset(train_records, transform_preset(cfg.data.preset, False, size=size))
    test = ImageClassificationDataset(test_records, transform_preset(cfg.data.preset, False, size=size))
    accelerator.print(f"{cfg.data.name}: {len(train):,} train / {len(test):,} test images, {num_classes} classes "
                      f"({time.perf_counter() - start:.1f}s)")
    module = build_module(cfg, num_classes, accelerator.process_index, accelerator.num_processes, world_group())
    optimizer = build_module_optimizer(cfg, module)
    groups = torch.as_tensor(shot_groups(counts_from_labels(train_records.labels, num_classes)))

    check = EmbeddingCheck(f"{c.method} encoder features at evaluation", accelerator.print)

    def knn_eval(ema=None) -> dict[str, float]:
        encoder = module.encoder
        bank, bank_labels = extract_features(encoder, plain, cfg.train.eval_batch_size, accelerator, "bank")
        feats, labels = extract_features(encoder, test, cfg.train.eval_batch_size, accelerator, "test")
        check(feats)
        pred = knn_predict(bank, bank_labels, feats, num_classes, c.knn_k, c.knn_temperature)
        out = {f"knn_{k}": v for k, v in shot_accuracy(shot_counts(pred, labels, groups)).items()}
        if c.method == "ce":  # the CE-trained net's own classifier (Kang et al.'s "supervised CE" row)
            with torch.no_grad():
                device = next(module.head.parameters()).device
                top = module.head.predict(feats.to(device), 1)[1][:, 0]
            out |= {f"classifier_{k}": v for k, v in shot_accuracy(shot_counts(top, labels, groups)).items()}
        return out

    folder = c.method
    result = fit(module, optimizer, train, cfg.train, accelerator, desc=f"pretrain {folder}",
                 out_dir=Path(cfg.train.output_dir) / folder, eval_fn=knn_eval, run_name=folder,
                 run_config=run_config(cfg))
    metrics = knn_eval()
    costs = {"train s": result.seconds, "samples/s": result.samples_per_second, "final loss": result.last_loss}
    results = {folder: {"metrics": metrics, "costs": costs}}
    write_results(cfg, results, accelerator)
    return results
