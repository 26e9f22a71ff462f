"""Sampled heads trained with row-sparse updates equal the dense update (exact catch-up)."""

from __future__ import annotations

import copy

import pytest
import torch

from mhe_scale.heads.base import create_head
from mhe_scale.optim import RowSparseAdamW, RowSparseSGD, refresh_all

C, D, B = 60, 8, 6
HEADS = {
    "partial_fc": dict(sample_rate=0.2),
    "mhs_union": dict(sizes=[12, 5], mode="batch_union", num_sampled_groups=3, bias=True),
    "mhs_row": dict(sizes=[12, 5], mode="per_sample", num_sampled_groups=3, cosine=True, margin=[1.0, 0.2, 0.0]),
    "mhc": dict(sizes=[6, 10], top_k_groups=2, hidden=4),  # label table sparse, the rest dense
}


def _train(name: str, kind: str, sparse: bool, steps: int = 5, accumulate: int = 2):
    torch.manual_seed(0)
    base = name.split("_")[0] if name != "partial_fc" else name
    head = create_head(base, in_features=D, num_classes=C, **HEADS[name]).double()
    head.generator = torch.Generator().manual_seed(5)
    if sparse:
        head.row_sparse_parameters()
    params = list(head.parameters())
    if kind == "sgd":
        opt = (RowSparseSGD if sparse else torch.optim.SGD)(params, lr=0.5, momentum=0.9, weight_decay=0.01)
    else:
        opt = (RowSparseAdamW if sparse else torch.optim.AdamW)(params, lr=0.05, eps=1e-30, weight_decay=0.1)
    data = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for _ in range(accumulate):
            x = torch.randn(B, D, generator=data, dtype=torch.float64)
            y = torch.randint(0, C, (B,), generator=data)
            (head(x, y).loss / accumulate).backward()
        if sparse:
            assert all(p.grad is None for p in head.row_sparse_parameters())  # no dense [C, D] gradient
        opt.step()
        opt.zero_grad(set_to_none=True)
    return head


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(HEADS))
def test_sparse_head_training_equals_dense(name: str, kind: str) -> None:
    dense, sparse = _train(name, kind, False), _train(name, kind, True)
    for (n, a), b in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(refresh_all(b), a, rtol=1e-6, atol=1e-9, msg=n)
    x = torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(sparse.eval().predict(x, 3)[0], dense.eval().predict(x, 3)[0])


def test_state_dict_is_caught_up() -> None:
    """state_dict of a sparse head after training equals the dense head's (save never holds stale rows)."""
    sparse = _train("partial_fc", "sgd", True)
    dense = _train("partial_fc", "sgd", False)
    torch.testing.assert_close(copy.deepcopy(sparse.state_dict())["weight"], dense.state_dict()["weight"])
