"""Face recognition pre-training: a face backbone (IResNet, MobileFaceNet, ViT) + a margin head
(fc cosine + ArcFace/CosFace, partial_fc, mhs) trained by engine.fit; verification on .bin pair
files (LFW, CFP-FP, AgeDB-30) when eval.verification lists them.

    mhe-scale train configs/face/casia_r18_mhs.yaml [data.path=... head.name=partial_fc ...]

data.name selects the images:
- face_recordio: data.path is a .rec (insightface or im2rec layout), data.idx_path its .idx.
  data.dali=true decodes each batch with DALI (mhe_scale/data/dali_face.py), else PIL + FaceTransform.
  The head is built for data.num_classes identities, which must cover the file's labels.
- face_synthetic: random images (SyntheticFaceDataset, data.num_train of them, data.num_classes
  identities) for throughput runs.
Mixed precision comes from the launcher (`accelerate launch --mixed_precision bf16`; fp16 is refused
with dist.shard_head, which the face configs set); heads compute their logits in fp32 either way.
Output as the other tasks: {output_dir}/config.yaml,
results.json, results.md, and per head its checkpoints, loss_log.jsonl and (with train.eval_every)
eval_log.jsonl of the verification results: per .bin, "<name> acc" and "<name> acc std" (mean and
population std over the 10 folds) and "<name> TAR@FAR=1e-3" / "=1e-4" where the file holds enough
impostor pairs to measure that FAR (LFW's 3,000 resolve 1e-3, not 1e-4); see
mhe_scale/eval/verification.py and tools/eval_verification.py (scores a saved checkpoint).
Verification embeds with the backbone module itself, so it is not supported under ZeRO-3
(partitioned weights).

Batch norm with several processes: each process normalises with the statistics of its own
micro-batch (as in insightface's arcface_torch), so N processes do not train exactly like one
process on the union batch, from the first step on. model.sync_batchnorm=true converts the
backbone's BatchNorm layers to torch.nn.SyncBatchNorm (statistics over all processes) when more
than one process runs; torch's SyncBatchNorm (2.13) runs only on GPU (CUDA/XPU) tensors, so on
CPU processes the option is refused with an error.

The shipped configs/face/*.yaml point data.path and eval.verification at placeholders under
/train_tmp/: the task checks every file before training and stops with one line naming the key.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from mhe_scale.config import ConfigError, ExperimentConfig, HeadConfig
from mhe_scale.data.dali_face import DALIRecordDataset, FaceTransform, dali_available
from mhe_scale.data.face_dataset import FaceDataConfig, RecordIOFaceDataset, SyntheticFaceDataset
from mhe_scale.engine.loop import fit
from mhe_scale.engine.run_identity import run_config
from mhe_scale.engine.health import EmbeddingCheck
from mhe_scale.engine.host_memory import release_freed_memory
from mhe_scale.engine.model import Classifier, build_optimizers, build_run_head, count_parameters, describe_head_update
from mhe_scale.data.face_bin import read_face_bin
from mhe_scale.eval.verification import embed_images, pair_distances, verification_metrics
from mhe_scale.tasks.report import head_label, resume_record, train_each_head, training_costs, write_results
from mhe_scale.models.face import FACE_BACKBONES, FaceModelConfig, build_face_backbone
from mhe_scale.tasks.registry import register_task
from mhe_scale.tasks.paths import config_path_candidates

FACE_DATA = ("face_recordio", "face_synthetic")
PLACEHOLDER = "/train_tmp/"
"""Prefix of the dataset paths in the shipped configs/face/*.yaml (insightface's convention)."""
VERIFICATION_FARS = (1e-3, 1e-4)


@dataclass(kw_only=True)
class FaceConfig(ExperimentConfig):
    task: str = "face"
    data: FaceDataConfig = field(default_factory=FaceDataConfig)
    model: FaceModelConfig = field(default_factory=FaceModelConfig)


@dataclass(frozen=True)
class FaceData:
    train: Dataset
    """Items (image float32 [3, S, S] in [-1, 1], label int)."""
    num_classes: int
    """Identities the head is built for (data.num_classes)."""
    description: str


def resolve_file(path: str | None, key: str) -> Path:
    """A file named by config key `key`: as given (from the working directory), else from the repository root."""
    if not path:
        raise ConfigError(f"{key} is not set; point it at the file")
    candidates = config_path_candidates(path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    hint = (f"; the shipped configs/face/*.yaml hold a placeholder under {PLACEHOLDER}: set {key}=<your copy>"
            if str(path).startswith(PLACEHOLDER) else "")
    raise ConfigError(f"{key}={path!r}: no such file (tried {' and '.join(map(str, candidates))}){hint}")


def load_face_data(cfg: FaceDataConfig, batch_size: int, device: torch.device) -> FaceData:
    """The training images of cfg.name (face_recordio or face_synthetic); see the module docstring."""
    size = cfg.image_size
    if cfg.name == "face_synthetic":
        train = SyntheticFaceDataset(cfg.num_train, cfg.num_classes, size, cfg.seed, FaceTransform(cfg.random_flip))
        return FaceData(train, cfg.num_classes, f"synthetic faces: {len(train):,} images {size}x{size}, "
                                                f"{cfg.num_classes:,} identities")
    if cfg.name != "face_recordio":
        raise ValueError(f"data.name={cfg.name!r} is not a face dataset; choose one of {FACE_DATA}")
    rec = resolve_file(cfg.path, "data.path")
    idx = resolve_file(cfg.idx_path, "data.idx_path") if cfg.idx_path else rec.with_suffix(".idx")
    if not idx.is_file():
        raise ConfigError(f"{idx} (the .idx of data.path) does not exist; set data.idx_path")
    use_dali = cfg.dali and dali_available()
    if cfg.dali and not use_dali:
        warnings.warn(f"data.dali=true but nvidia.dali cannot be imported; reading {rec} with PIL instead", stacklevel=2)
    if use_dali:
        gpu = None if device.type != "cuda" else device.index if device.index is not None else torch.cuda.current_device()
        train: Any = DALIRecordDataset(rec, idx, max_batch_size=batch_size, flip=cfg.random_flip, size=size,
                                       device_id=gpu, num_threads=max(1, cfg.num_workers))
    else:
        train = RecordIOFaceDataset(rec, idx, transform=FaceTransform(cfg.random_flip, size))
    if train.num_classes > cfg.num_classes:
        raise ValueError(f"{rec} holds labels up to {train.num_classes - 1} but data.num_classes={cfg.num_classes}; "
                         f"set data.num_classes={train.num_classes} (or more)")
    reader = "DALI" + (" (GPU)" if device.type == "cuda" else " (CPU)") if use_dali else "PIL"
    return FaceData(train, cfg.num_classes, f"{rec}: {len(train):,} images, labels 0..{train.num_classes - 1}, head "
                                            f"for {cfg.num_classes:,} identities, {size}x{size}, decoded by {reader}")


def build_face_encoder(cfg: FaceModelConfig, image_size: int) -> nn.Module:
    """model.name (a face backbone) for image_size inputs; dropout / width_mult only where set."""
    if cfg.name not in FACE_BACKBONES:
        raise ValueError(f"model.name={cfg.name!r} is not a face backbone; choose one of {list(FACE_BACKBONES)}")
    kwargs: dict[str, Any] = {"num_features": cfg.num_features}
    if not cfg.name.startswith("vit"):
        kwargs["input_size"] = image_size
    elif image_size != 112:
        raise ValueError(f"model.name={cfg.name!r} is built for 112x112 faces; data.image_size={image_size}")
    if cfg.dropout:
        kwargs["dropout"] = cfg.dropout
    if cfg.width_mult != 1.0:
        kwargs["width_mult"] = cfg.width_mult
    backbone = build_face_backbone(cfg.name, **kwargs)
    if cfg.grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone


def sync_batchnorm(backbone: nn.Module, enabled: bool, num_processes: int, device: torch.device) -> nn.Module:
    """model.sync_batchnorm: BatchNorm -> torch.nn.SyncBatchNorm when several processes run (GPU only)."""
    if not enabled or num_processes < 2:
        return backbone
    if device.type not in ("cuda", "xpu"):
        raise ConfigError(f"model.sync_batchnorm=true with {num_processes} processes on {device.type}: torch's "
                          f"SyncBatchNorm runs only on GPU (CUDA/XPU) tensors; set model.sync_batchnorm=false "
                          f"(per-process batch statistics) or train on GPUs")
    return nn.SyncBatchNorm.convert_sync_batchnorm(backbone)


def verify(backbone: nn.Module, paths: list[str], batch_size: int, image_size: int,
           fars: tuple[float, ...] = VERIFICATION_FARS, check: EmbeddingCheck | None = None,
           progress: bool = False) -> dict[str, float]:
    """10-fold protocol on each .bin pair file -> {"<name> acc", "<name> acc std", "<name> TAR@FAR=<f>"}
    in [0, 1]; a TAR@FAR only where the file holds enough impostor pairs to measure that FAR. `check`
    (training health) sees each file's embeddings. The host memory freed by the phase before (training)
    and by each pass goes back to the OS (engine/host_memory.py); progress: a bar per file (pass it on
    the local main process only)."""
    out = {}
    release_freed_memory()
    for path in paths:
        file = resolve_file(path, "eval.verification")
        pairs = read_face_bin(file)
        embeddings = embed_images(backbone, pairs, batch_size, True, image_size,
                                  progress=f"verify {Path(str(file)).name}" if progress else None)
        if check is not None:
            check(embeddings)
        distances, issame = pair_distances(embeddings), pairs.issame
        del embeddings
        release_freed_memory()
        for i, far in enumerate(fars):
            with warnings.catch_warnings():
                if i > 0:  # the first target already warned about these distances
                    warnings.simplefilter("ignore")
                result = verification_metrics(distances, issame, far_target=far, name=str(file))
            if i == 0:
                out[f"{Path(path).stem} acc"] = result.accuracy
                out[f"{Path(path).stem} acc std"] = result.accuracy_std
            if result.far_resolved:
                out[f"{Path(path).stem} TAR@FAR={far:g}"] = result.tar
    return out


def train_face_head(cfg: ExperimentConfig, head_cfg: HeadConfig, data: FaceData, accelerator,
                    folder: str) -> dict[str, Any]:
    """Fresh backbone (same seed for every head) + head; train, verify -> {metrics, costs}."""
    torch.manual_seed(cfg.train.seed)
    backbone = build_face_encoder(cfg.model, cfg.data.image_size)
    backbone = sync_batchnorm(backbone, cfg.model.sync_batchnorm, accelerator.num_processes, accelerator.device)
    head = build_run_head(head_cfg, cfg.dist.shard_head, backbone.num_features, data.num_classes, False,
                          seed=cfg.train.seed)
    model = Classifier(backbone, head)
    optimizer, head_optimizer = build_optimizers(cfg.optim, model)
    accelerator.print(f"[{head_label(head_cfg)}] {head!r}")
    accelerator.print(f"[{head_label(head_cfg)}] {describe_head_update(cfg.optim, head)}")
    paths = list(cfg.eval.verification)
    sizes = {"head params (M)": count_parameters(head) / 1e6,  # before prepare: ZeRO-3 leaves empty partitions
             "backbone params (M)": count_parameters(backbone) / 1e6}

    check = EmbeddingCheck(f"[{head_label(head_cfg)}] face embeddings at verification", accelerator.print)

    def verify_now(ema=None) -> dict[str, float]:  # every process scores the pairs (same result everywhere)
        with ema.applied() if ema is not None else contextlib.nullcontext():
            return verify(backbone, paths, cfg.train.eval_batch_size, cfg.data.image_size, check=check,
                          progress=accelerator.is_local_main_process)

    result = fit(model, optimizer, data.train, cfg.train, accelerator, desc=f"train {head_cfg.name}",
                 out_dir=Path(cfg.train.output_dir) / folder, eval_fn=verify_now if paths else None, run_name=folder,
                 head_optimizer=head_optimizer, run_config=run_config(cfg, head_cfg))
    metrics = verify_now(result.ema) if paths else {}
    return {"metrics": metrics, "costs": training_costs(result, head, optimizer, head_optimizer, accelerator, **sizes),
            **resume_record(result)}


@register_task("face", FaceConfig, "face recognition pre-training (IResNet / MobileFaceNet / ViT + margin head), "
               "verification on .bin pairs", data_names=FACE_DATA)
def run_face(cfg: ExperimentConfig, accelerator) -> dict[str, dict[str, Any]]:
    """Train cfg.head (and cfg.eval.baseline if set) on the face data; print and save the tables."""
    start = time.perf_counter()
    data = load_face_data(cfg.data, cfg.train.batch_size, accelerator.device)
    for path in cfg.eval.verification:  # before training: a missing file would stop it at the first evaluation
        resolve_file(path, "eval.verification")
    accelerator.print(f"{data.description} ({time.perf_counter() - start:.1f}s)")
    results = train_each_head(cfg, lambda head_cfg, folder: train_face_head(cfg, head_cfg, data, accelerator, folder))
    write_results(cfg, results, accelerator)
    return results
