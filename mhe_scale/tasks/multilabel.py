"""Multi-label image classification (Prokofiev & Sovrasov 2022): an image backbone + a multi-label head
(pooled linear, pooled cosine, ML-Decoder, ML-GCN) trained with BCE / ASL / AAM by engine.fit; scored
by mAP and CP/CR/CF1, OP/OR/OF1, example P/R/F1 at 0.5 and at per-class thresholds tuned on a
held-out split.

    mhe-scale train configs/multilabel/coco_r50_mldecoder_asl.yaml [model.head=ml_gcn loss.name=aam ...]

Data: one JSON per split (data/multilabel_json.py): data.train_path, data.val_path (held-out, for the
thresholds; evaluation transform only), data.test_path. Output: {output_dir}/config.yaml,
results.json, results.md; in {output_dir}/{model.head}-{loss.name}/ the checkpoints, loss_log.jsonl
and thresholds.npy (float32 [C], sorted-class order). Recipe (docs/multilabel.md): data.rand_augment
[N, M]; recipe.early_stop_patience stops on validation mAP (train.eval_every evaluates the val split);
SAM is the engine's train.sam_rho; no OneCycle: the shipped configs use
cosine with warmup and EMA.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from mhe_scale.config import ExperimentConfig
from mhe_scale.data.image_dataset import transform_preset
from mhe_scale.data.rand_augment import with_rand_augment
from mhe_scale.data.multilabel_json import MultilabelAnnotations, MultilabelImageDataset, read_multilabel_json
from mhe_scale.engine.loop import fit
from mhe_scale.engine.model import make_optimizer, count_parameters
from mhe_scale.engine.module import TrainingModule
from mhe_scale.engine.run_identity import run_config
from mhe_scale.eval.distributed import evaluating, test_batches
from mhe_scale.eval.multilabel import mean_average_precision, multilabel_report
from mhe_scale.eval.thresholds import save_thresholds, tune_thresholds
from mhe_scale.losses import build_loss
from mhe_scale.models.image import ImageModelConfig, build_image_model
from mhe_scale.models.ml_decoder import MLDecoder
from mhe_scale.models.ml_gcn import MLGCNHead, cooccurrence_adjacency, load_label_embeddings
from mhe_scale.models.pooled_heads import PooledCosineHead, PooledLinearHead
from mhe_scale.tasks.early_stop import EarlyStopping
from mhe_scale.tasks.paths import config_path_candidates
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.report import resume_record, training_costs, write_results

HEADS = ("pooled", "pooled_cosine", "ml_decoder", "ml_gcn")


@dataclass(kw_only=True)
class MultilabelDataConfig:
    """data section of the multilabel task: one JSON per split (mhe_scale/data/multilabel_json.py)."""

    name: str = "coco"
    """A label for the dataset in tables and logs."""
    train_path: Optional[str] = None
    """Training split JSON (augmented)."""
    val_path: Optional[str] = None
    """Held-out split JSON the per-class thresholds are tuned on (evaluation transform); unset: no tuning."""
    test_path: Optional[str] = None
    """Test split JSON: every reported metric."""
    drop_unknown_labels: bool = False
    """Drop (and count) labels a split's classes do not name, instead of refusing the file."""
    image_root: Optional[str] = None
    """Folder every split's image paths start from, overriding each JSON's "image_root" (default: the JSON's
    own "image_root", else its folder); paths that leave it are refused."""
    check_images: bool = True
    """Stat every image at start-up and refuse (one line: how many are missing or empty, the first few named);
    false: a bad image fails only when first read."""
    preset: str = "imagenet"
    """Augmentation family (data/image_dataset.py transform_preset): imagenet | cifar."""
    image_size: Optional[int] = None
    """Side of the crops (default: the preset's)."""
    seed: int = 0
    """Seed of the per-sample augmentation (with the epoch and the index)."""
    rand_augment: Optional[list[float]] = None
    """[N, M]: RandAugment (data/rand_augment.py) after the training crop / flip, N ops of magnitude M
    (0..10) per sample; null: off."""


@dataclass(kw_only=True)
class MultilabelModelConfig(ImageModelConfig):
    """model section: the backbone keys of ImageModelConfig + the multi-label head."""

    stem: Optional[str] = "imagenet"
    head: str = "ml_decoder"
    """pooled | pooled_cosine | ml_decoder | ml_gcn."""
    cosine: bool = False
    """ml_decoder / ml_gcn: cosine scores (L2-normalised features and weights) for the AAM loss."""
    num_groups: Optional[int] = None
    """ml_decoder: query groups G (default min(100, C))."""
    decoder_dim: int = 768
    """ml_decoder: embedding width E of the decoder."""
    decoder_heads: int = 8
    """ml_decoder: attention heads."""
    decoder_ff: int = 2048
    """ml_decoder: feed-forward width."""
    decoder_dropout: float = 0.1
    """ml_decoder: dropout in the decoder layer."""
    gcn_embeddings: Optional[str] = None
    """ml_gcn: float .npy [C, e] of label embeddings in sorted-class order (kept fixed); unset: learned."""
    gcn_embed_dim: int = 300
    """ml_gcn: width of learned label embeddings."""
    gcn_hidden: int = 1024
    """ml_gcn: width of the first graph convolution."""
    gcn_tau: float = 0.4
    """ml_gcn: co-occurrence binarisation threshold τ."""
    gcn_rho: float = 0.25
    """ml_gcn: off-diagonal re-weighting ρ."""


@dataclass(kw_only=True)
class MultilabelLossConfig:
    """loss section: a criterion of mhe_scale/losses by name; unset keys keep the criterion's default."""

    name: str = "asl"
    """bce | asl (logit heads) | aam (cosine heads: pooled_cosine, or model.cosine=true)."""
    gamma_pos: Optional[float] = None
    """asl / aam: focusing of the positives."""
    gamma_neg: Optional[float] = None
    """asl / aam: focusing of the negatives."""
    clip: Optional[float] = None
    """asl: probability margin m of the negatives."""
    s: Optional[float] = None
    """aam: scale of the cosines (published 17-23)."""
    m: Optional[float] = None
    """aam: angular margin (published 0)."""
    k: Optional[float] = None
    """aam: weight of the positive term (published 0.7)."""
    reduction: Optional[str] = None
    """sum | mean over the entries of the batch."""


@dataclass(kw_only=True)
class MultilabelRecipeConfig:
    """recipe section: training-recipe options of the paper beyond the engine's (docs/multilabel.md)."""

    early_stop_patience: Optional[int] = None
    """Stop after this many train.eval_every evaluations without a rise of validation mAP (needs
    data.val_path and train.eval_every > 0); null: train to the end."""
    early_stop_min_delta: float = 0.0
    """A rise of validation mAP counts only when larger than this."""


@dataclass(kw_only=True)
class MultilabelConfig(ExperimentConfig):
    task: str = "multilabel"
    data: MultilabelDataConfig = field(default_factory=MultilabelDataConfig)
    model: MultilabelModelConfig = field(default_factory=MultilabelModelConfig)
    loss: MultilabelLossConfig = field(default_factory=MultilabelLossConfig)
    recipe: MultilabelRecipeConfig = field(default_factory=MultilabelRecipeConfig)


def check_recipe(cfg: MultilabelConfig) -> None:
    """Refuse recipe options that cannot work, before any data is read."""
    patience = cfg.recipe.early_stop_patience
    if patience is None:
        return
    if patience < 1 or cfg.recipe.early_stop_min_delta < 0:
        raise ValueError(f"recipe.early_stop_patience={patience} / early_stop_min_delta="
                         f"{cfg.recipe.early_stop_min_delta}: need patience >= 1 and min_delta >= 0")
    if not cfg.data.val_path:
        raise ValueError("recipe.early_stop_patience needs data.val_path: early stopping watches validation mAP")
    if cfg.train.eval_every <= 0:
        raise ValueError("recipe.early_stop_patience needs train.eval_every > 0 (steps between validation mAP "
                         "evaluations)")


def build_criterion(cfg: MultilabelLossConfig) -> nn.Module:
    kwargs = {k: getattr(cfg, k) for k in ("gamma_pos", "gamma_neg", "clip", "s", "m", "k", "reduction")
              if getattr(cfg, k) is not None}
    try:
        return build_loss(cfg.name, **kwargs)  # type: ignore[return-value]
    except ValueError as err:
        raise ValueError(f"loss: {err}") from None


class MultilabelNet(nn.Module):
    """images [B, 3, H, W] -> backbone (pooled / tokens / map, as the head reads) -> scores [B, C].

    logits = logit_scale * (scores - logit_shift): the AAM head's s and m (p = σ(s (cos − m))), 1 and 0
    for logit heads; both are buffers, so checkpoints and exports carry them."""

    def __init__(self, backbone: nn.Module, head: nn.Module, scale: float = 1.0, shift: float = 0.0) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.register_buffer("logit_scale", torch.tensor(float(scale)))
        self.register_buffer("logit_shift", torch.tensor(float(shift)))

    def forward(self, images: Tensor) -> Tensor:
        kind = self.head.input_kind
        if kind == "tokens":
            x = self.backbone.forward_tokens(images)
        elif kind == "map":
            x = self.backbone.forward_feature_map(images)
        else:
            x = self.backbone.forward_features(images)
        return self.head(x)

    def logits(self, images: Tensor) -> Tensor:
        return self.logit_scale * (self(images).float() - self.logit_shift)


class MultilabelClassifier(TrainingModule):
    """(images, multi-hot targets [B, C]) -> criterion(net(images), targets); checkpoints hold the net."""

    def __init__(self, net: MultilabelNet, criterion: nn.Module) -> None:
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.criterion(self.net(inputs).float(), targets)

    def checkpoint_module(self) -> nn.Module:
        return self.net


def build_head(cfg: MultilabelModelConfig, in_features: int, num_classes: int,
               train_targets: np.ndarray | None) -> nn.Module:
    """The head of a model section; ml_gcn counts its label graph from the training targets [N, C]."""
    if cfg.head == "pooled":
        return PooledLinearHead(in_features, num_classes)
    if cfg.head == "pooled_cosine":
        return PooledCosineHead(in_features, num_classes)
    if cfg.head == "ml_decoder":
        return MLDecoder(in_features, num_classes, cfg.num_groups, cfg.decoder_dim, cfg.decoder_heads,
                         cfg.decoder_ff, cfg.decoder_dropout, cfg.cosine)
    if cfg.head == "ml_gcn":
        adjacency = (cooccurrence_adjacency(torch.from_numpy(train_targets), cfg.gcn_tau, cfg.gcn_rho)
                     if train_targets is not None else torch.eye(num_classes))  # export: the checkpoint's buffer
        embeddings = None
        if cfg.gcn_embeddings:
            path = next((p for p in config_path_candidates(cfg.gcn_embeddings) if p.exists()), Path(cfg.gcn_embeddings))
            embeddings = load_label_embeddings(path, num_classes)
        return MLGCNHead(in_features, num_classes, adjacency, embeddings, cfg.gcn_embed_dim, cfg.gcn_hidden,
                         cfg.cosine)
    raise ValueError(f"model.head={cfg.head!r} is not known; choose one of {HEADS}")


def build_net(cfg: MultilabelConfig, num_classes: int, train_targets: np.ndarray | None) -> MultilabelNet:
    """Backbone + head + the logit scale of the loss (cosine heads must train with aam, logit heads must not)."""
    criterion = build_criterion(cfg.loss)
    backbone = build_image_model(cfg.model)
    head = build_head(cfg.model, backbone.num_features, num_classes, train_targets)
    cosine = bool(getattr(head, "cosine", False))
    if cosine != (cfg.loss.name == "aam"):
        raise ValueError(f"loss.name={cfg.loss.name!r} does not fit model.head={cfg.model.head!r} (cosine={cosine}): "
                         "aam trains cosine heads (pooled_cosine, or model.cosine=true); bce / asl train logit heads")
    scale, shift = (criterion.s, criterion.m) if cosine else (1.0, 0.0)
    return MultilabelNet(backbone, head, scale, shift)


@dataclass(frozen=True)
class MultilabelData:
    train: MultilabelImageDataset
    val: MultilabelImageDataset | None
    test: MultilabelImageDataset
    classes: list[str]
    description: str


def _find(path: str, key: str) -> Path:
    found = next((p for p in config_path_candidates(path) if p.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{key}={path!r} does not exist")
    return found


def _split(path: Optional[str], key: str, cfg: MultilabelDataConfig) -> MultilabelAnnotations:
    if not path:
        raise ValueError(f"{key} is not set; point it at a multi-label JSON (mhe_scale/data/multilabel_json.py)")
    root = _find(cfg.image_root, "data.image_root") if cfg.image_root else None
    return read_multilabel_json(_find(path, key), drop_unknown=cfg.drop_unknown_labels, check_exists=cfg.check_images,
                                image_root=root)


def train_transform(cfg: MultilabelDataConfig):
    """The preset's training augmentation, with RandAugment(N, M) before ToTensor when data.rand_augment is set."""
    tf = transform_preset(cfg.preset, True, size=cfg.image_size)
    if cfg.rand_augment is None:
        return tf
    ra = list(cfg.rand_augment)
    if len(ra) != 2 or ra[0] != int(ra[0]):
        raise ValueError(f"data.rand_augment={ra}: give [N, M] (N ops, an integer; magnitude M in 0..10) or null")
    try:
        return with_rand_augment(tf, int(ra[0]), float(ra[1]))
    except ValueError as err:
        raise ValueError(f"data.rand_augment: {err}") from None


def load_multilabel_data(cfg: MultilabelDataConfig) -> MultilabelData:
    """Train (augmented), val (held-out, eval transform; optional) and test datasets; every split must
    name the training split's classes."""
    train = _split(cfg.train_path, "data.train_path", cfg)
    others = {key: _split(path, key, cfg) if path else None
              for key, path in (("data.val_path", cfg.val_path), ("data.test_path", cfg.test_path))}
    if others["data.test_path"] is None:
        raise ValueError("data.test_path is not set; every metric is computed on the test split")
    for key, split in others.items():
        if split is not None and split.classes != train.classes:
            raise ValueError(f"{key}={split.source}: its classes differ from data.train_path's ({len(split.classes)} vs "
                             f"{len(train.classes)}); list the same classes in every split")
    eval_tf = transform_preset(cfg.preset, False, size=cfg.image_size)
    val = others["data.val_path"]
    data = MultilabelData(MultilabelImageDataset(train, train_transform(cfg), cfg.seed),
                          MultilabelImageDataset(val, eval_tf, cfg.seed) if val is not None else None,
                          MultilabelImageDataset(others["data.test_path"], eval_tf, cfg.seed), train.classes, "")
    dropped = sum(s.dropped_labels for s in (train, *others.values()) if s is not None)
    text = (f"{cfg.name}: {len(data.train):,} train / {len(data.val) if data.val else 0:,} val / {len(data.test):,} "
            f"test images, {len(train.classes)} classes, {train.targets.sum(1).mean():.2f} labels per train image"
            + (f", {dropped} unknown labels dropped" if dropped else ""))
    return MultilabelData(data.train, data.val, data.test, data.classes, text)


def share_buffers(net: nn.Module) -> None:
    """Every process takes process 0's buffers (BN running statistics are updated per process), so all
    parts of a split are scored by the model process 0 saves."""
    from accelerate.utils import broadcast

    for buf in net.buffers():
        buf.copy_(broadcast(buf.detach().clone(), from_process=0))


def predict_probabilities(model: MultilabelClassifier, dataset: MultilabelImageDataset, batch_size: int,
                          accelerator=None, ema=None, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities float32 [N, C], targets bool [N, C]) of the whole split on every process: each
    process scores its contiguous part (eval/distributed.py), the parts are gathered in rank order."""
    probs, targets = [], []
    with evaluating(model, accelerator, ema):
        if accelerator is not None and accelerator.num_processes > 1:
            share_buffers(model.net)
        for inputs, y in test_batches(model, dataset, batch_size, accelerator, desc):
            probs.append(torch.sigmoid(model.net.logits(inputs)).float())
            targets.append(y.float().to(probs[-1].device))
    p, y = torch.cat(probs), torch.cat(targets)
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.gather(torch.tensor([len(p)], device=p.device)).cpu().tolist()
        both = accelerator.gather(accelerator.pad_across_processes(torch.cat([p, y], 1), dim=0)).cpu()
        most = max(count)
        both = torch.cat([both[r * most: r * most + n] for r, n in enumerate(count)])
        p, y = both[:, : p.shape[1]], both[:, p.shape[1]:]
    return p.cpu().numpy(), y.cpu().numpy() > 0.5


def threshold_source(data: MultilabelData) -> dict[str, Any] | None:
    """Where the thresholds are tuned: {"tuned_on": val JSON, "test_images_shared": images also in the
    scored test split, "same_file": val JSON is the test JSON}; None without a val split (nothing tuned)."""
    if data.val is None:
        return None
    val, test = data.val.annotations, data.test.annotations
    return {"tuned_on": val.source, "test_images_shared": len(set(val.paths) & set(test.paths)),
            "same_file": Path(val.source).resolve() == Path(test.source).resolve()}


def threshold_split_warning(data: MultilabelData) -> str | None:
    """One line when the thresholds would be tuned on images of the split being scored (data.val_path is
    the test file, or shares images with it): every @tuned metric is then optimistic. None otherwise."""
    source = threshold_source(data)
    if source is None or not (source["same_file"] or source["test_images_shared"]):
        return None
    what = ("is the scored test split" if source["same_file"] else
            f"shares {source['test_images_shared']} of its {len(data.val)} images with the scored test split")
    return (f"warning: thresholds are tuned on data.val_path={source['tuned_on']}, which {what} (data.test_path="
            f"{data.test.annotations.source}): every @tuned metric is optimistic; hold out a validation split "
            "(tools/import_coco.py / import_voc.py --val-fraction) and set data.val_path to it")


def evaluate(model: MultilabelClassifier, data: MultilabelData, batch_size: int, accelerator=None, ema=None,
             run_dir: Path | None = None) -> dict[str, float]:
    """Test metrics at 0.5 and, with a val split, at thresholds tuned on it (saved to run_dir/thresholds.npy
    by the main process); prints CF1 / OF1 before and after tuning."""
    probs, targets = predict_probabilities(model, data.test, batch_size, accelerator, ema, "eval test")
    thresholds = None
    if data.val is not None:
        val_probs, val_targets = predict_probabilities(model, data.val, batch_size, accelerator, ema, "eval val")
        thresholds = tune_thresholds(val_probs, val_targets)
        if run_dir is not None and (accelerator is None or accelerator.is_main_process):
            run_dir.mkdir(parents=True, exist_ok=True)
            save_thresholds(run_dir / "thresholds.npy", thresholds)
    report = multilabel_report(probs, targets, thresholds)
    report.pop("map_classes")
    if thresholds is not None and accelerator is not None:
        accelerator.print(f"test CF1 {report['CF1@0.5']:.4f} -> {report['CF1@tuned']:.4f}, OF1 {report['OF1@0.5']:.4f} "
                          f"-> {report['OF1@tuned']:.4f} (thresholds tuned on {data.val.annotations.source})")
    return report


def run_folder(cfg: MultilabelConfig) -> str:
    return f"{cfg.model.head}{'-cos' if cfg.model.cosine else ''}-{cfg.loss.name}"


def train_multilabel(cfg: MultilabelConfig, data: MultilabelData, accelerator) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    net = build_net(cfg, len(data.classes), data.train.annotations.targets)
    model = MultilabelClassifier(net, build_criterion(cfg.loss))
    head_lr = cfg.optim.head_lr if cfg.optim.head_lr is not None else cfg.optim.lr
    optimizer = make_optimizer(cfg.optim, [
        {"params": list(net.backbone.parameters()), "lr": cfg.optim.lr, "name": "encoder"},
        {"params": [p for p in net.head.parameters() if p.requires_grad], "lr": head_lr, "name": "head"}])
    folder = run_folder(cfg)
    run_dir = Path(cfg.train.output_dir) / folder
    accelerator.print(f"[{folder}] {net.head!r}")
    sizes = {"head params (K)": count_parameters(net.head) / 1e3,
             "backbone params (M)": count_parameters(net.backbone) / 1e6}

    def evaluate_now(ema=None) -> dict[str, float]:
        """Periodic metrics: of the val split (keys val_*) when there is one, else of the test split."""
        split, prefix, desc = (data.val, "val_", "eval val") if data.val is not None else (data.test, "", "eval test")
        probs, targets = predict_probabilities(model, split, cfg.train.eval_batch_size, accelerator, ema, desc)
        return {prefix + k: v for k, v in multilabel_report(probs, targets).items() if k != "map_classes"}

    stopper, extras = None, []
    if cfg.recipe.early_stop_patience is not None:
        stopper = EarlyStopping("val_mAP", cfg.recipe.early_stop_patience, cfg.recipe.early_stop_min_delta)
        extras.append(stopper.extra_state(accelerator.is_main_process))
    result = fit(model, optimizer, data.train, cfg.train, accelerator, desc=f"train {folder}", out_dir=run_dir,
                 eval_fn=evaluate_now, run_name=folder, run_config=run_config(cfg), extra_state=extras,
                 stop_fn=stopper)
    start = time.perf_counter()
    metrics = evaluate(model, data, cfg.train.eval_batch_size, accelerator, result.ema, run_dir)
    costs = training_costs(result, net.head, optimizer, None, accelerator, **sizes)
    costs["eval s"] = time.perf_counter() - start
    costs["mAP classes"] = int(mean_average_precision(np.zeros(data.test.annotations.targets.shape),
                                                      data.test.annotations.targets)[1])
    early = {} if stopper is None else {"early_stop": {"stopped": result.stopped_early, **stopper.state()}}
    if early and early["early_stop"]["stopped"]:
        accelerator.print(f"[{folder}] stopped early: val mAP {stopper.best:.4f} at step {stopper.best_step} was not "
                          f"beaten in {stopper.patience} evaluations")
    return {"metrics": metrics, "costs": costs, "resumed_from": result.resumed_from, **resume_record(result), **early}


@register_task("multilabel", MultilabelConfig, "multi-label image classification (ResNet + pooled / ML-Decoder / "
               "ML-GCN head, BCE / ASL / AAM), mAP and F1 at 0.5 and tuned thresholds", data_names=())
def run_multilabel(cfg: MultilabelConfig, accelerator) -> dict[str, dict[str, Any]]:
    check_recipe(cfg)
    start = time.perf_counter()
    data = load_multilabel_data(cfg.data)
    accelerator.print(f"{data.description} ({time.perf_counter() - start:.1f}s)")
    warning = threshold_split_warning(data)
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)
    results = {run_folder(cfg): train_multilabel(cfg, data, accelerator)}
    source = threshold_source(data)
    if source is not None:  # results.json says where the thresholds came from
        for result in results.values():
            result["thresholds"] = source
    write_results(cfg, results, accelerator)
    return results
