"""MoCo v1 / v2 (He et al. 2020; Chen et al. 2020) and KCL (Kang et al. 2021) as a TrainingModule.

    module = MoCo(backbone, dim=128, mlp=True, queue_size=4096, momentum=0.99, temperature=0.2,
                  k_positives=6, split_bn=8)
    loss, metrics = module(views, labels)      # views [B, 2, 3, H, W] (data/two_views.py), labels [B]

- Query encoder = backbone.forward_features + projection (v1: Linear(D, dim); v2: D -> D -> ReLU -> dim),
  registered sub-modules (trained by DDP / ZeRO-1/2; ZeRO-3 is not supported: the momentum update
  reads whole weights). Checkpoints name them "encoder.*" and "projector.*" (probe.py reads "encoder.*").
- Key encoder: a copy kept as a plain attribute (not a sub-module: DDP never averages and ZeRO never
  partitions it), updated in after_optimizer_step as  θ_k <- m θ_k + (1 - m) θ_q; its BN statistics
  are its own. Its batch is shuffled (seeded) before and unshuffled after the forward.
- Split BN (`split_bn` = G): every BatchNorm2d normalises G contiguous sub-batches separately, as G
  processes with per-process BN would; with the key batch shuffled this is shuffle-BN on one device.
- Queue: K L2-normalised keys [K, dim] and their labels [K] (-1 = empty: the queue starts empty and is
  left out of the softmax until filled), FIFO; each micro-batch's keys are all-gathered across
  processes (parallel.collectives) and enqueued after its loss, so every process holds the same queue.
  K must be divisible by the keys enqueued per micro-batch (micro batch x processes).
- Loss: losses.kcl (k_positives = 0: InfoNCE; k: KCL; None: all same-class queue entries).
  metrics: accuracy (own key ranked first), positives, chance = log(1 + filled queue entries).
- extra_state(): key encoder, queue, labels, pointer and the shuffle / draw generator, one
  safetensors file per process ("moco-rank{r}-of-{W}.safetensors"). Resuming on W' != W processes
  (`saved_by_other_world`): rank r loads rank (r mod W)'s file (queue, pointer and key weights are the
  same on every rank) and re-seeds its generator from it and r.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mhe_scale.engine.checkpoint import ExtraState
from mhe_scale.engine.module import Metrics, TrainingModule
from mhe_scale.losses.kcl import KPositiveContrastive

logger = logging.getLogger(__name__)


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training forward normalises `num_splits` contiguous sub-batches separately
    (running statistics: the mean of the splits' updates). Same parameters and state-dict names as
    nn.BatchNorm2d; evaluation is plain BN."""

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % g:
            raise ValueError(f"split BN: a batch of {n} does not split into {g} equal parts; make the micro "
                             f"batch a multiple of contrastive.split_bn")
        if self.momentum is None:
            raise ValueError("split BN needs a BatchNorm momentum (cumulative averaging is not supported)")
        grouped = x.view(g, n // g, c, h, w).transpose(0, 1).reshape(n // g, g * c, h, w)
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        out = F.batch_norm(grouped, mean, var, self.weight.repeat(g), self.bias.repeat(g), True, self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked += 1
        return out.view(n // g, g, c, h, w).transpose(0, 1).reshape(n, c, h, w)


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """module with every nn.BatchNorm2d replaced by a SplitBatchNorm2d (same state); in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device if child.affine else "cpu"))
        else:
            convert_split_bn(child, num_splits)
    return module


def projection_head(in_features: int, dim: int, mlp: bool) -> nn.Module:
    """v1: Linear(D, dim); v2: Linear(D, D) -> ReLU -> Linear(D, dim)."""
    if not mlp:
        return nn.Linear(in_features, dim)
    return nn.Sequential(nn.Linear(in_features, in_features), nn.ReLU(inplace=True), nn.Linear(in_features, dim))


class _Encoder(nn.Module):
    def __init__(self, encoder: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.encoder, self.projector = encoder, projector

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.encoder.forward_features(x)), dim=1)


class MoCo(TrainingModule):
    """Module docstring. rank / world: this process and the process count (for the key shuffle seed
    and the checkpoint file names); group: the process group keys are all-gathered over (None: one)."""

    def __init__(self, backbone: nn.Module, *, dim: int = 128, mlp: bool = True, queue_size: int = 65536,
                 momentum: float = 0.999, temperature: float = 0.07, k_positives: int | None = 0,
                 unselected: str = "keep", split_bn: int = 1, shuffle_keys: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1, group=None) -> None:
        super().__init__()
        if queue_size < 1 or not 0.0 <= momentum < 1.0 or split_bn < 1:
            raise ValueError(f"MoCo: queue_size={queue_size} must be >= 1, momentum={momentum} in [0, 1), "
                             f"split_bn={split_bn} >= 1")
        self.encoder = convert_split_bn(backbone, split_bn) if split_bn > 1 else backbone
        self.projector = projection_head(backbone.num_features, dim, mlp)
        self.criterion = KPositiveContrastive(k_positives, temperature, unselected)
        key = copy.deepcopy(_Encoder(self.encoder, self.projector))
        for p in key.parameters():
            p.requires_grad_(False)
        self.__dict__["key_encoder"] = key  # not a sub-module
        self.momentum, self.shuffle_keys, self.rank, self.world, self.group = momentum, shuffle_keys, rank, world, group
        self.queue = torch.zeros(queue_size, dim)  # plain tensors: not in the state dict, not broadcast by DDP
        self.queue_labels = torch.full((queue_size,), -1, dtype=torch.int64)
        self.pointer = 0
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        self.criterion.generator = self.generator

    def _move(self, device: torch.device) -> None:
        if self.queue.device != device:
            self.key_encoder.to(device)
            self.queue, self.queue_labels = self.queue.to(device), self.queue_labels.to(device)

    def query(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> L2-normalised query embeddings [B, dim]."""
        return F.normalize(self.projector(self.encoder.forward_features(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: Tensor) -> Tensor:
        """images [B, 3, H, W] -> L2-normalised key embeddings [B, dim] (batch shuffled across BN splits)."""
        self.key_encoder.train(self.training)
        if not (self.shuffle_keys and self.training):
            return self.key_encoder(x)
        perm = torch.randperm(len(x), generator=self.generator).to(x.device)
        return self.key_encoder(x[perm])[torch.argsort(perm)]

    def forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Metrics]:
        if inputs.dim() != 5 or inputs.shape[1] != 2:
            raise ValueError(f"MoCo: inputs must be two views [B, 2, C, H, W] (data/two_views.py), got "
                             f"{tuple(inputs.shape)}")
        self._move(inputs.device)
        q = self.query(inputs[:, 0])
        k = self.keys(inputs[:, 1])
        loss, metrics = self.criterion((q, k.to(q.dtype), self.queue.to(q.dtype), self.queue_labels), targets)
        filled = (self.queue_labels >= 0).sum()
        metrics["chance"] = torch.log1p(filled.float())
        if self.training:
            self._enqueue(k, targets)
        return loss, metrics

    @torch.no_grad()
    def _enqueue(self, keys: Tensor, labels: Tensor) -> None:
        from mhe_scale.parallel.collectives import all_gather_no_grad

        keys = all_gather_no_grad(keys.float().contiguous(), self.group)
        labels = all_gather_no_grad(labels.long().contiguous(), self.group)
        size = len(self.queue)
        if size % len(keys):
            raise ValueError(f"MoCo: contrastive.queue_size={size} is not divisible by the {len(keys)} keys enqueued "
                             f"per micro-batch (train.batch_size x processes); choose a multiple of {len(keys)}")
        # modulo: a run resumed with another micro batch x processes may hold a pointer off its new stride
        rows = torch.arange(self.pointer, self.pointer + len(keys), device=keys.device) % size
        # out of place: the loss graph of this micro-batch still holds the old queue
        self.queue = self.queue.index_copy(0, rows, keys.to(self.queue.dtype))
        self.queue_labels = self.queue_labels.index_copy(0, rows, labels)
        self.pointer = (self.pointer + len(keys)) % size

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        query = list(self.encoder.parameters()) + list(self.projector.parameters())
        key = list(self.key_encoder.encoder.parameters()) + list(self.key_encoder.projector.parameters())
        for pk, pq in zip(key, query):
            pk.mul_(self.momentum).add_(pq.detach().to(pk.device), alpha=1.0 - self.momentum)

    def _file(self, folder: Path) -> Path:
        return Path(folder) / f"moco-rank{self.rank}-of-{self.world}.safetensors"

    def extra_state(self) -> list[ExtraState]:
        from safetensors.torch import load_file, save_file

        def save(folder: Path) -> None:
            tensors = {f"key.{n}": t.detach().cpu().contiguous() for n, t in self.key_encoder.state_dict().items()}
            tensors |= {"queue": self.queue.cpu().contiguous(), "queue_labels": self.queue_labels.cpu().contiguous(),
                        "pointer": torch.tensor([self.pointer]), "generator": self.generator.get_state()}
            save_file(tensors, str(self._file(folder)))

        def load(folder: Path) -> None:
            path, saved_world = self._file(folder), self.world
            if not path.is_file():  # saved by another number of processes
                path, saved_world = saved_by_other_world(Path(folder), self.rank, self.world)
            tensors = load_file(str(path))
            device = self.queue.device
            self.key_encoder.load_state_dict({n[4:]: t for n, t in tensors.items() if n.startswith("key.")})
            self.queue, self.queue_labels = tensors["queue"].to(device), tensors["queue_labels"].to(device)
            self.pointer = int(tensors["pointer"][0])
            self.generator.set_state(tensors["generator"])
            if saved_world != self.world:  # ranks sharing a saved generator would draw alike: one new stream each
                seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
                self.generator.manual_seed(seed + self.rank)

        return [ExtraState("moco", save, load)]


def saved_by_other_world(folder: Path, rank: int, world: int) -> tuple[Path, int]:
    """The MoCo file rank `rank` of `world` processes resumes from when the checkpoint was saved by W'
    processes: rank (rank mod W')'s -> (path, W'). Every saved rank holds the same queue, labels, pointer
    and key-encoder weights (keys are all-gathered, the query weights averaged); only the key encoder's
    BN statistics and the generator are per process."""
    found = sorted(folder.glob("moco-rank*-of-*.safetensors"))
    worlds = {int(p.stem.rsplit("-of-", 1)[1]) for p in found}
    if len(worlds) != 1:
        raise FileNotFoundError(f"{folder}: no MoCo state for rank {rank} of {world} (found "
                                f"{[p.name for p in found]}); resume from a complete checkpoint folder")
    saved = worlds.pop()
    path = folder / f"moco-rank{rank % saved}-of-{saved}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (checkpoint holds {[p.name for p in found]}); the checkpoint "
                                "is incomplete: resume from an earlier step folder")
    if rank == 0:
        logger.warning("MoCo state saved by %d processes, resumed on %d: each rank continues from rank (r mod %d)'s "
                       "queue and key encoder with its own new key-shuffle / positive-draw stream (not bit-exact "
                       "with an uninterrupted %d-process run)", saved, world, saved, saved)
    return path, saved


def warn_if_queue_is_large(queue_size: int, num_train: int, fraction: float = 0.25) -> str | None:
    """A warning when the queue holds more than `fraction` of the training set (keys of the same images
    from recent steps then crowd the negatives), else None."""
    if queue_size > fraction * num_train:
        return (f"contrastive.queue_size={queue_size:,} is {queue_size / num_train:.0%} of the {num_train:,} training "
                f"images (over {fraction:.0%}): many negatives are other views of recent images; consider a smaller "
                f"queue (chance level log(K+1) = {math.log(queue_size + 1):.2f})")
    return None
