"""The sampled heads' training step reads nothing back from the device when the sample is at least the
batch (issue: no host synchronisation per step on the hot path). Counted on CPU as calls of
aten._local_scalar_dense (what .item(), int(t), bool(t) run); the label-range check is patched out here
(on an accelerator it is asynchronous; on CPU it is tested in test_labels / test_head_contract)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mhe_scale.heads.base as heads_base
from mhe_scale.heads import create_head
from mhe_scale.parallel import ShardedMultiHeadSamplingHead, ShardedPartialFCHead


class CountScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def step_reads(head: torch.nn.Module, batch: int, classes: int, sparse: bool) -> int:
    if sparse:
        head.row_sparse_parameters()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, classes, (batch,), generator=g)
    head.train()
    with CountScalarReads() as mode:
        head(features, labels).loss.backward()
    return mode.reads


@pytest.fixture
def no_label_check(monkeypatch):
    monkeypatch.setattr(heads_base, "check_label_range", lambda *a, **k: None)


HEADS = {
    "partial_fc": lambda: create_head("partial_fc", in_features=16, num_classes=400, sample_rate=0.1),
    "sharded partial_fc": lambda: ShardedPartialFCHead(16, 400, sample_rate=0.1),
    "sharded mhs batch_union": lambda: ShardedMultiHeadSamplingHead(16, 400, sizes=[40, 10], mode="batch_union",
                                                                     num_sampled_groups=32, cosine=True),
}


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("sparse", [False, True])
def test_no_device_read_when_the_sample_covers_the_batch(name, sparse, no_label_check):
    assert step_reads(HEADS[name](), batch=8, classes=400, sparse=sparse) == 0


def test_a_batch_larger_than_the_sample_still_counts_its_positives(no_label_check):
    # 40 sampled classes < 64 rows: the kept width depends on the batch's distinct labels (one read)
    head = create_head("partial_fc", in_features=16, num_classes=400, sample_rate=0.1)
    assert step_reads(head, batch=64, classes=400, sparse=False) >= 1
    head.train()
    labels = torch.arange(64) * 6  # 64 distinct positives > 40 wanted: all kept
    out = head(torch.randn(64, 16), labels)
    assert out.metrics["kept_classes"].item() == 64
