"""Single-label image classification with MHE heads (the MHE paper's CIFAR-10/100 and ImageNet runs):
an image backbone (models/image.py) + a head (fc, mhp, mhc, mhs; class-sharded with dist.shard_head)
trained by engine.fit, scored by top-1 / top-5 accuracy on the test split.

    mhe-scale train configs/classify/cifar10_r18_mhp.yaml [head={name:fc} train.epochs=1 ...]

Data: data.format archive (a .tar.gz such as ../shared/data/cifar10-jpeg, converted once into an
indexed RecordIO cache), folder, list or recordio (data/image_source.py); augmentation by
data.preset, decoded in the DataLoader workers (train.num_workers). Output as the other tasks:
{output_dir}/config.yaml, results.json, results.md; per head its checkpoints, loss_log.jsonl and
(with train.eval_every) eval_log.jsonl.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mhe_scale.config import ExperimentConfig, HeadConfig
from mhe_scale.data.image_dataset import ImageClassificationDataset, transform_preset
from mhe_scale.data.image_source import ImageDataConfig, task_records
from mhe_scale.engine.loop import fit, named_sampler
from mhe_scale.engine.model import Classifier, build_optimizers, build_run_head, count_parameters
from mhe_scale.engine.run_identity import run_config
from mhe_scale.eval.accuracy import topk_accuracy
from mhe_scale.models.image import ImageModelConfig, build_image_model
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import head_label, train_each_head, training_costs, write_results


@dataclass(kw_only=True)
class ClassifyConfig(ExperimentConfig):
    task: str = "classify"
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)


@dataclass(frozen=True)
class ImageData:
    train: ImageClassificationDataset
    test: ImageClassificationDataset
    num_classes: int
    description: str


def load_image_data(cfg: ImageDataConfig, accelerator=None) -> ImageData:
    """Train (augmented) and test (eval transform) datasets of the data section."""
    train_records, test_records = task_records(cfg, accelerator)
    found = int(train_records.labels.max()) + 1 if len(train_records) else 0
    num_classes = cfg.num_classes or found
    if found > num_classes or (len(test_records) and int(test_records.labels.max()) >= num_classes):
        raise ValueError(f"data.num_classes={num_classes} but {cfg.path} holds labels up to "
                         f"{max(found, int(test_records.labels.max()) + 1) - 1}; raise data.num_classes or leave it unset")
    train = ImageClassificationDataset(train_records, transform_preset(cfg.preset, True, size=cfg.image_size), cfg.seed)
    test = ImageClassificationDataset(test_records, transform_preset(cfg.preset, False, size=cfg.image_size), cfg.seed)
    return ImageData(train, test, num_classes, f"{cfg.name} ({cfg.format} {cfg.path}): {len(train):,} train / "
                                               f"{len(test):,} test images, {num_classes} classes, preset {cfg.preset}")


def accuracy(model: Classifier, test_set: Dataset, batch_size: int, accelerator=None, ema=None,
             desc: str = "eval") -> dict[str, float]:
    """Top-1 / top-5 accuracy (in [0, 1]) of model.predict over the whole test set (eval/accuracy.py)."""
    return topk_accuracy(model, test_set, batch_size, model.head.num_classes, accelerator, ema, desc)


def train_classifier(cfg: ClassifyConfig, head_cfg: HeadConfig, data: ImageData, accelerator,
                     folder: str) -> dict[str, Any]:
    """Fresh backbone (same seed for every head) + head; train, score -> {metrics, costs}."""
    torch.manual_seed(cfg.train.seed)
    backbone = build_image_model(cfg.model)
    head = build_run_head(head_cfg, cfg.dist.shard_head, backbone.num_features, data.num_classes, False,
                          seed=cfg.train.seed)
    model = Classifier(backbone, head)
    optimizer, head_optimizer = build_optimizers(cfg.optim, model)
    accelerator.print(f"[{head_label(head_cfg)}] {head!r}")
    sizes = {"head params (K)": count_parameters(head) / 1e3,  # before prepare: ZeRO-3 leaves empty partitions
             "backbone params (M)": count_parameters(backbone) / 1e6}

    def evaluate_now(ema=None) -> dict[str, float]:
        return accuracy(model, data.test, cfg.train.eval_batch_size, accelerator, ema, desc=f"eval {head_cfg.name}")

    labels = torch.as_tensor(data.train.labels)
    sampler = None if cfg.data.sampler == "epoch" else named_sampler(cfg.data.sampler, labels)
    result = fit(model, optimizer, data.train, cfg.train, accelerator, desc=f"train {head_cfg.name}",
                 out_dir=Path(cfg.train.output_dir) / folder, eval_fn=evaluate_now, run_name=folder,
                 head_optimizer=head_optimizer, sampler=sampler, run_config=run_config(cfg, head_cfg))
    start = time.perf_counter()
    metrics = evaluate_now(result.ema)
    costs = training_costs(result, head, optimizer, head_optimizer, accelerator, **sizes)
    costs["eval s"] = time.perf_counter() - start
    return {"metrics": metrics, "costs": costs}


@register_task("classify", ClassifyConfig, "single-label image classification (ResNet + fc / mhp / mhc / mhs head), "
               "top-1 / top-5 accuracy", data_names=())
def run_classify(cfg: ClassifyConfig, accelerator) -> dict[str, dict[str, Any]]:
    """Train cfg.head (and cfg.eval.baseline if set) on the images; print and save the tables."""
    start = time.perf_counter()
    data = load_image_data(cfg.data, accelerator)
    accelerator.print(f"{data.description} ({time.perf_counter() - start:.1f}s)")
    results = train_each_head(cfg, lambda head_cfg, folder: train_classifier(cfg, head_cfg, data, accelerator, folder))
    write_results(cfg, results, accelerator)
    return results
