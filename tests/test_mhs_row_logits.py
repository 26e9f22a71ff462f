"""MHS per_sample logits (heads/mhs.py per_row_group_logits): equal to a naive per-row gather (loss and
gradients of weight, bias, features; plain and cosine + margin; several row chunks), and no tensor of the
per-row copy's size [B, M * c_2, D] is ever allocated (forward + backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mhe_scale.heads.mhs as mhs_module
from mhe_scale.heads.linear import CombinedMargin
from mhe_scale.heads.mhs import per_row_group_logits, sample_groups_per_row

G, C2, D, B, M = 12, 5, 6, 9, 4


def _naive(weight, bias, features, groups, margin, cols):
    """Row by row, group by group: logits[b, m * c_2 + j] = <w[groups[b, m], j], f_b> (+ b, or cosine + margin)."""
    out = []
    for b in range(groups.shape[0]):
        f = features[b]
        row = []
        for g in groups[b].tolist():
            w = weight[g]
            if margin is not None:
                row.append(F.normalize(w, dim=1) @ F.normalize(f, dim=0))
            else:
                row.append(w @ f + (bias[g] if bias is not None else 0))
        out.append(torch.cat(row))
    logits = torch.stack(out)
    return logits if margin is None else margin(logits, cols)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("chunk", [1 << 24, 2 * M * C2 * D])  # one chunk; several chunks (2 rows each)
def test_equals_naive_per_row_gather(monkeypatch, cosine: bool, chunk: int) -> None:
    monkeypatch.setattr(mhs_module, "ROW_GROUP_CHUNK_ELEMENTS", chunk, raising=False)  # absent before the fix
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, G, (B,), generator=g)
    targets[1] = targets[0]  # shared groups between rows
    groups = sample_groups_per_row(targets, G, M, g)
    cols = torch.randint(0, C2, (B,), generator=g)
    margin = CombinedMargin(1.0, 0.3, 0.1, 8.0) if cosine else None
    results = []
    for fn in (per_row_group_logits, _naive):
        weight = torch.randn(G, C2, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                             requires_grad=True)
        bias = None if cosine else torch.randn(G, C2, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                                               requires_grad=True)
        features = torch.randn(B, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64,
                               requires_grad=True)
        logits = fn(weight, bias, features, groups, margin, cols)
        loss = F.cross_entropy(logits, cols)
        loss.backward()
        results.append((logits.detach(), weight.grad, features.grad, None if bias is None else bias.grad))
    for got, want in zip(*results):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_per_row_weight_copy(monkeypatch) -> None:
    """B rows x M groups: the old path gathered [B, M * c_2, D] (B * M * c_2 * D elements); now the
    largest tensor is the union of the groups' rows or one chunk of rows (16 here)."""
    g, c2, d, b, m = 64, 16, 32, 256, 8
    chunk = 16 * m * c2 * d
    monkeypatch.setattr(mhs_module, "ROW_GROUP_CHUNK_ELEMENTS", chunk, raising=False)  # absent before the fix
    targets = torch.randint(0, g, (b,), generator=torch.Generator().manual_seed(0))
    groups = sample_groups_per_row(targets, g, m, torch.Generator().manual_seed(1))
    weight = torch.randn(g, c2, d, requires_grad=True)
    features = torch.randn(b, d, requires_grad=True)
    with _LargestTensor() as mode:
        logits = per_row_group_logits(weight, None, features, groups, None, groups[:, 0] * 0)
        logits.logsumexp(dim=1).sum().backward()
    assert mode.largest <= max(g * c2 * d, chunk, b * m * c2), (mode.largest, b * m * c2 * d)
