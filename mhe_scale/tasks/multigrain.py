"""MultiGrain (Berman et al. 2019): one embedding for classes and instances.

    e  = GeM_p(backbone map)                        [B, D]  (models/gem.py)
    L  = λ · CE(classifier(e), class) + (1 − λ) · margin(ê, instance id)      (losses/margin.py)

Batches come from the repeated-augmentation sampler (each image N = 3 times per global batch,
copies spread over processes, data/samplers.py); the instance id is the image's index, returned
beside its class label (targets [B, 2] = (class, instance)). The margin loss runs on the embeddings
of the whole global micro-batch (all-gathered with gradient, parallel/collectives.py), so the
copies of an image that sit on other processes are its positives. Each process draws its own
negatives; the gathered gradient (grad_scale 1, summed over processes) then DDP's average give the
gradient of the mean of the processes' losses. β has its own optimizer group without weight decay.

    mhe-scale train configs/multigrain/cifar10_r18_joint_p3.yaml [model.lam=1.0 model.gem_p=1 ...]

Output as the other tasks: {output_dir}/config.yaml, results.json, results.md; checkpoints and
loss_log.jsonl (ce, margin, beta, ...) in the run's folder. Evaluation: top-1 / top-5 on the test
split (retrieval: eval/retrieval.py, tools/eval_retrieval.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from mhe_scale.config import ExperimentConfig, OptimConfig
from mhe_scale.data.image_dataset import ImageClassificationDataset
from mhe_scale.data.image_source import ImageDataConfig
from mhe_scale.engine.health import EmbeddingCheck
from mhe_scale.engine.loop import fit, named_sampler
from mhe_scale.engine.module import TrainingModule
from mhe_scale.engine.run_identity import run_config
from mhe_scale.eval.accuracy import topk_accuracy
from mhe_scale.eval.distributed import evaluating, test_batches
from mhe_scale.losses.margin import MarginLoss
from mhe_scale.models.gem import GeM
from mhe_scale.models.image import ImageModelConfig, build_image_backbone
from mhe_scale.parallel.collectives import all_gather_no_grad, all_gather_with_grad, world_group
from mhe_scale.tasks.classify import load_image_data
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import write_results


@dataclass(kw_only=True)
class MultiGrainModelConfig(ImageModelConfig):
    """model section of multigrain: the image backbone (ImageModelConfig) pooled by GeM + the joint loss."""

    gem_p: float = 3.0
    """GeM exponent p (1 = average pooling; the paper trains with 1 or 3)."""
    learn_p: bool = False
    """Train p with the network (the paper keeps it fixed while training, then tunes p*: tools/pstar.py)."""
    gem_eps: float = 1e-6
    """GeM lower clamp ε of the activations."""
    lam: float = 0.5
    """λ: weight of the classification loss; 1 − λ weighs the margin loss (paper: 0.5; 1 = CE only)."""
    margin_alpha: float = 0.2
    """Margin α of the margin loss."""
    beta_init: float = 1.2
    """Initial boundary β of the margin loss (learned, no weight decay)."""
    beta_lr: Optional[float] = None
    """Learning rate of β (default optim.lr)."""
    num_repeats: int = 3
    """Repeated augmentation: copies of each image per global batch (the batch must be a multiple)."""


@dataclass(kw_only=True)
class MultiGrainConfig(ExperimentConfig):
    task: str = "multigrain"
    data: ImageDataConfig = field(default_factory=lambda: ImageDataConfig(sampler="repeated_aug"))
    model: MultiGrainModelConfig = field(default_factory=MultiGrainModelConfig)


class InstanceDataset(Dataset):
    """An ImageClassificationDataset whose targets are (class, instance id = index) int64 [2]."""

    def __init__(self, base: ImageClassificationDataset) -> None:
        self.base = base

    @property
    def labels(self):
        return self.base.labels

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        image, label = self.base[index]
        instance = int(index[1]) if isinstance(index, tuple) else int(index)
        return image, torch.tensor([label, instance], dtype=torch.int64)


class MultiGrainModel(TrainingModule):
    """backbone (GeM-pooled) -> e [B, D]; classifier(e) [B, C]; margin on ê over the global batch.

    forward(images [B, 3, H, W], targets [B, 2] (class, instance)) -> (loss, {"ce", "margin",
    "accuracy", "beta", "pairs"}); "pairs" = positive pairs per anchor in the gathered batch (N − 1
    when every image's N copies are in it)."""

    def __init__(self, backbone: nn.Module, num_classes: int, lam: float = 0.5, margin: MarginLoss | None = None
                 ) -> None:
        super().__init__()
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"model.lam={lam} must be in [0, 1] (weight of the classification loss)")
        self.backbone, self.lam = backbone, float(lam)
        self.classifier = nn.Linear(int(backbone.num_features), num_classes)
        self.margin = margin if margin is not None else MarginLoss()

    def embed(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (any size) -> un-normalised embeddings e [B, D]."""
        return self.backbone.forward_features(images)

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if targets.dim() != 2 or targets.shape[1] != 2:
            raise ValueError(f"multigrain targets must be [B, 2] (class, instance id), got {list(targets.shape)}")
        e = self.embed(inputs)
        logits = self.classifier(e).float()
        ce = F.cross_entropy(logits, targets[:, 0])
        group = world_group()
        gathered = all_gather_with_grad(e.float(), group, grad_scale=1.0)  # loss replicated: see module docstring
        ids = all_gather_no_grad(targets[:, 1], group)
        margin, m = self.margin(gathered, ids)
        loss = self.lam * ce + (1.0 - self.lam) * margin
        pairs = ((ids[:, None] == ids[None, :]).sum() - len(ids)).float() / max(len(ids), 1)
        accuracy = (logits.detach().argmax(1) == targets[:, 0]).float().mean()
        return loss, {"ce": ce.detach(), "margin": margin.detach(), "accuracy": accuracy, "beta": m["beta"],
                      "pairs": pairs}

    def chance_losses(self) -> dict[str, float]:
        """The logged "ce" at uniform prediction: ln C (the margin term has no fixed level)."""
        return {"ce": math.log(self.classifier.out_features)}

    @torch.no_grad()
    def predict(self, inputs: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return self.classifier(self.embed(inputs)).topk(k, dim=1)


def build_multigrain_backbone(cfg: MultiGrainModelConfig) -> nn.Module:
    """The model section's backbone with GeM pooling (project ResNets take it as `pool`)."""
    external = cfg.name.startswith(("timm:", "torchvision:"))
    kwargs: dict[str, object] = {} if external or not cfg.zero_init_residual else {"zero_init_residual": True}
    pool = GeM(cfg.gem_p, learn_p=cfg.learn_p, eps=cfg.gem_eps)
    model = build_image_backbone(cfg.name, stem=None if external else cfg.stem, width=None if external else cfg.width,
                                 pretrained_path=cfg.pretrained_path, pool=pool, **kwargs)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_model(cfg: MultiGrainModelConfig, num_classes: int) -> MultiGrainModel:
    margin = MarginLoss(alpha=cfg.margin_alpha, beta_init=cfg.beta_init)
    return MultiGrainModel(build_multigrain_backbone(cfg), num_classes, cfg.lam, margin)


def build_optimizer(optim: OptimConfig, model: MultiGrainModel, beta_lr: float | None = None) -> torch.optim.Optimizer:
    """Groups: network (lr, weight decay), β (beta_lr or lr, no weight decay)."""
    beta = {id(p) for p in model.margin.beta_parameters()}
    network = [p for p in model.parameters() if id(p) not in beta]
    groups = [{"params": network, "lr": optim.lr, "weight_decay": optim.weight_decay, "name": "network"},
              {"params": model.margin.beta_parameters(), "lr": beta_lr if beta_lr is not None else optim.lr,
               "weight_decay": 0.0, "name": "beta"}]
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr)
    raise ValueError(f"optim.name={optim.name!r} is not supported; choose adamw or sgd")


def accuracy(model: MultiGrainModel, test_set: Dataset, batch_size: int, accelerator=None, ema=None
             ) -> dict[str, float]:
    """Top-1 / top-k (k = min(5, C)) of the classifier over the test set, summed over processes."""
    return topk_accuracy(model, test_set, batch_size, model.classifier.out_features, accelerator, ema,
                         "eval multigrain")


def eval_embeddings(model: MultiGrainModel, test_set: Dataset, batch_size: int, accelerator=None, ema=None
                    ) -> Tensor:
    """Embeddings e [b, D] of this process's first evaluation batch (b <= 256): the training-health check."""
    with evaluating(model, accelerator, ema):
        inputs, _ = next(iter(test_batches(model, test_set, min(batch_size, 256), accelerator, "embedding check")))
        return model.embed(inputs)


def run_label(cfg: MultiGrainModelConfig) -> str:
    return f"joint lam={cfg.lam:g} p={cfg.gem_p:g}"


@register_task("multigrain", MultiGrainConfig, "MultiGrain: GeM backbone trained with λ·CE + (1−λ)·margin on "
               "repeated-augmentation batches; top-1 / top-5", data_names=())
def run_multigrain(cfg: MultiGrainConfig, accelerator) -> dict[str, dict[str, Any]]:
    """Train the joint model on the image data; score top-1 / top-5; print and save the tables."""
    if cfg.data.sampler != "repeated_aug":
        raise ValueError(f"data.sampler={cfg.data.sampler!r}: multigrain trains on repeated_aug batches "
                         "(the margin loss needs the copies of each image); set data.sampler=repeated_aug")
    per_step = cfg.train.batch_size * accelerator.num_processes
    if per_step % cfg.model.num_repeats:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} x {accelerator.num_processes} processes = {per_step} "
                         f"is not a multiple of model.num_repeats={cfg.model.num_repeats}: a micro-step would split an "
                         "image's copies (the margin loss sees one micro-step); change train.batch_size")
    start = time.perf_counter()
    data = load_image_data(cfg.data, accelerator)
    accelerator.print(f"{data.description} ({time.perf_counter() - start:.1f}s)")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.num_classes)
    optimizer = build_optimizer(cfg.optim, model, cfg.model.beta_lr)
    train = InstanceDataset(data.train)
    folder = f"multigrain-lam{cfg.model.lam:g}-p{cfg.model.gem_p:g}"
    sampler = named_sampler("repeated_aug", torch.as_tensor(data.train.labels), num_repeats=cfg.model.num_repeats)

    check = EmbeddingCheck("multigrain embeddings at evaluation", accelerator.print)

    def evaluate_now(ema=None) -> dict[str, float]:
        check(eval_embeddings(model, data.test, cfg.train.eval_batch_size, accelerator, ema))
        return accuracy(model, data.test, cfg.train.eval_batch_size, accelerator, ema)

    result = fit(model, optimizer, train, cfg.train, accelerator, desc="train multigrain",
                 out_dir=Path(cfg.train.output_dir) / folder, eval_fn=evaluate_now, run_name=folder,
                 sampler=sampler, run_config=run_config(cfg))
    t0 = time.perf_counter()
    metrics = evaluate_now(result.ema)
    costs = {"train s": result.seconds, "samples/s": result.samples_per_second, "final loss": result.last_loss,
             "beta": float(model.margin.beta.detach()), "eval s": time.perf_counter() - t0}
    results = {run_label(cfg.model): {"metrics": metrics, "costs": costs}}
    write_results(cfg, results, accelerator)
    return results


# ---------------------------------------------------------------- p*: GeM's p for a new test resolution


def per_class_subset(labels: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """Indices of `per_class` random images of each class (all of a class that has fewer), sorted."""
    labels = torch.as_tensor(labels).long()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    order = order[torch.argsort(labels[order], stable=True)]  # by class, random inside
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    keep = torch.cat([order[s:s + min(per_class, int(c))] for s, c in zip(starts.tolist(), counts.tolist())])
    return keep.sort().values


def finetune_p(model: MultiGrainModel, batches, lr: float, steps: int, power: float = 1.0,
               momentum: float = 0.9) -> list[float]:
    """Train GeM's p alone with CE on the classifier (the rest frozen, backbone in eval mode), SGD with
    polynomial decay lr·(1 − t/steps)^power over `steps` batches (one pass); p stays >= 1.
    batches: (images [B, 3, H, W], labels [B]) pairs. Returns p after each step."""
    from mhe_scale.models.gem import find_gem

    gem = find_gem(model)
    p = gem.make_learnable()
    frozen = [q for q in model.parameters() if q is not p and q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    model.eval()
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, 1.0 - t / steps) ** power)
    history = []
    try:
        for step, (images, labels) in enumerate(batches):
            if step >= steps:
                break
            loss = F.cross_entropy(model.classifier(model.embed(images)).float(), labels.long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                p.clamp_(min=1.0)
            history.append(float(p.detach()))
    finally:
        for q in frozen:
            q.requires_grad_(True)
    return history


@torch.no_grad()
def cross_validate_p(model: MultiGrainModel, batches: list, grid: list[float]) -> dict[float, float]:
    """Top-1 (in [0, 1]) of the classifier on held-out (images, labels) batches for every p of the grid;
    GeM's p is left at the best one."""
    from mhe_scale.models.gem import find_gem

    gem = find_gem(model)
    model.eval()
    scores = {}
    for p in grid:
        gem.set_p(p)
        hits = total = 0
        for images, labels in batches:
            hits += int((model.classifier(model.embed(images)).argmax(1) == labels).sum())
            total += len(labels)
        scores[float(p)] = hits / max(total, 1)
    gem.set_p(max(scores, key=scores.__getitem__))  # the first best of the grid
    return scores
