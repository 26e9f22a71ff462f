"""The joint loss on 2 gloo processes (embeddings all-gathered for the margin loss, backbone
gradients averaged as DDP does) gives the single-process gradient of the same global batch when
both processes draw the same negatives (same seed)."""

import torch
from torch import nn

from mhe_scale.losses.margin import MarginLoss
from mhe_scale.parallel.collectives import get_rank
from mhe_scale.parallel.testing import run_in_processes
from mhe_scale.tasks.multigrain import MultiGrainModel


class Linear(nn.Module):
    """A BN-free backbone: images [B, 3, 2, 2] -> [B, 6]."""

    num_features = 6

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Linear(12, 6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(x.flatten(1))


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.arange(4).repeat_interleave(3)  # 4 images x 3 copies
    x = torch.randn(4, 3, 2, 2, generator=g)[ids] + 0.8 * torch.randn(12, 3, 2, 2, generator=g)
    targets = torch.stack([ids % 3, ids], dim=1)
    return x, targets


def model():
    torch.manual_seed(1)
    return MultiGrainModel(Linear(), 3, 0.5, MarginLoss(beta_init=1.3)).double()


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def two_ranks(group, _):
    import torch.distributed as dist

    rank = get_rank(group)
    x, t = batch()
    m = model()
    torch.manual_seed(5)  # same negatives on both ranks
    loss, _ = m(x.double()[rank * 6:(rank + 1) * 6], t[rank * 6:(rank + 1) * 6])
    loss.backward()
    for p in m.parameters():  # what DDP does: average over ranks
        dist.all_reduce(p.grad, group=group)
        p.grad /= 2
    return grads(m)


def test_two_processes_give_the_single_process_gradient():
    x, t = batch()
    m = model()
    torch.manual_seed(5)
    loss, _ = m(x.double(), t)
    loss.backward()
    expected = grads(m)
    for got in run_in_processes(two_ranks, 2, 0):
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, rtol=1e-9, atol=1e-12, msg=name)
