"""Multi-label heads against naive references: ML-Decoder (group FC, cross-attention layer),
pooled linear / cosine heads, ML-GCN's label graph and channel attention."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mhe_scale.models.ml_decoder import MLDecoder
from mhe_scale.models.ml_gcn import MLGCNHead, cooccurrence_adjacency, load_label_embeddings
from mhe_scale.models.pooled_heads import PooledCosineHead, PooledLinearHead


def naive_group_fc(h, weight, bias, num_classes, cosine):
    b, g, e = h.shape
    out = torch.zeros(b, num_classes, dtype=h.dtype)
    for i in range(b):
        for c in range(num_classes):
            grp, j = divmod(c, weight.shape[2])
            x, w = h[i, grp], weight[grp, :, j]
            out[i, c] = (x @ w) / ((x.norm() * w.norm()) if cosine else 1.0) + bias[c]
    return out


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("classes,groups", [(7, 3), (10, 10), (5, None)])
def test_group_fc_equals_a_loop_over_groups(cosine, classes, groups):
    torch.manual_seed(0)
    dec = MLDecoder(6, classes, num_groups=groups, embed_dim=8, num_heads=2, ff_dim=16, cosine=cosine).double()
    dec.bias.data.normal_()
    h = torch.randn(3, dec.num_groups, 8, dtype=torch.float64)
    torch.testing.assert_close(dec.group_fc(h), naive_group_fc(h, dec.group_weight, dec.bias, classes, cosine))
    assert dec.num_groups == (groups or classes) and dec.per_group == math.ceil(classes / dec.num_groups)


def test_default_groups_and_fixed_queries():
    assert MLDecoder(4, 250, embed_dim=8, num_heads=2, ff_dim=8).num_groups == 100
    dec = MLDecoder(4, 12, embed_dim=8, num_heads=2, ff_dim=8)
    assert "queries" not in dict(dec.named_parameters()) and "queries" in dec.state_dict()
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in dec.modules()) == 1  # cross-attention only
    before = dec.queries.clone()
    opt = torch.optim.SGD(dec.parameters(), lr=1.0)
    dec(torch.randn(2, 5, 4)).sum().backward()
    opt.step()
    torch.testing.assert_close(dec.queries, before)


def test_decoder_layer_equals_a_hand_written_cross_attention():
    torch.manual_seed(1)
    d, e, heads, n = 6, 8, 2, 5
    dec = MLDecoder(d, 9, num_groups=4, embed_dim=e, num_heads=heads, ff_dim=16, dropout=0.0).double().eval()
    tokens = torch.randn(2, n, d, dtype=torch.float64)
    att = dec.attention
    wq, wk, wv = att.in_proj_weight.chunk(3)
    bq, bk, bv = att.in_proj_bias.chunk(3)
    expected = torch.zeros(2, 9, dtype=torch.float64)
    for b in range(2):
        kv = torch.relu(tokens[b] @ dec.embed.weight.t() + dec.embed.bias)
        q = dec.queries
        heads_out = []
        for k in range(heads):
            sl = slice(k * e // heads, (k + 1) * e // heads)
            qq, kk, vv = (q @ wq.t() + bq)[:, sl], (kv @ wk.t() + bk)[:, sl], (kv @ wv.t() + bv)[:, sl]
            weights = torch.softmax(qq @ kk.t() / math.sqrt(e // heads), dim=1)
            heads_out.append(weights @ vv)
        attended = torch.cat(heads_out, 1) @ att.out_proj.weight.t() + att.out_proj.bias
        h = F.layer_norm(q + attended, (e,), dec.norm1.weight, dec.norm1.bias)
        ff = torch.relu(h @ dec.ffn[0].weight.t() + dec.ffn[0].bias) @ dec.ffn[3].weight.t() + dec.ffn[3].bias
        h = F.layer_norm(h + ff, (e,), dec.norm2.weight, dec.norm2.bias)
        expected[b] = naive_group_fc(h.unsqueeze(0), dec.group_weight, dec.bias, 9, False)[0]
    torch.testing.assert_close(dec(tokens), expected)


def test_pooled_heads():
    torch.manual_seed(2)
    f = torch.randn(4, 6, dtype=torch.float64)
    lin = PooledLinearHead(6, 3).double()
    torch.testing.assert_close(lin(f), f @ lin.fc.weight.t() + lin.fc.bias)
    cos = PooledCosineHead(6, 3).double()
    expected = torch.tensor([[float(f[i] @ w / (f[i].norm() * w.norm())) for w in cos.weight.detach()] for i in range(4)],
                            dtype=torch.float64)
    torch.testing.assert_close(cos(f), expected)


def naive_adjacency(y, tau, rho):
    n, c = y.shape
    a = np.zeros((c, c))
    for i in range(c):
        ni = sum(y[k, i] for k in range(n))
        neighbours = [j for j in range(c) if j != i and ni > 0 and sum(y[k, i] and y[k, j] for k in range(n)) / ni >= tau]
        for j in neighbours:
            a[i, j] = rho / len(neighbours)
        a[i, i] = 1.0
    deg = a.sum(1)
    return np.array([[a[i, j] / math.sqrt(deg[i] * deg[j]) for j in range(c)] for i in range(c)])


def test_cooccurrence_adjacency_equals_loops():
    rng = np.random.default_rng(0)
    y = rng.random((40, 6)) < 0.35
    y[:, 5] = False  # a class never seen
    y[:, 1] |= y[:, 0]  # P(1 | 0) = 1
    got = cooccurrence_adjacency(torch.from_numpy(y), tau=0.4, rho=0.25)
    np.testing.assert_allclose(got.numpy(), naive_adjacency(y, 0.4, 0.25), rtol=1e-6)
    assert got[0, 1] > 0 and got[5, 5] == pytest.approx(1.0)


def test_gcn_attention_scales_the_map_and_freezes(tmp_path):
    torch.manual_seed(3)
    y = torch.rand(30, 5) < 0.4
    emb = tmp_path / "emb.npy"
    np.save(emb, np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32))
    head = MLGCNHead(8, 5, cooccurrence_adjacency(y), load_label_embeddings(emb, 5), hidden=12).double()
    assert "label_embeddings" not in dict(head.named_parameters())
    fmap = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    a_hat, e = head.adjacency, head.label_embeddings
    h = F.leaky_relu(a_hat @ e @ head.gc1.weight.t(), 0.2)
    att = torch.sigmoid((a_hat @ h @ head.gc2.weight.t()).max(0).values)
    expected = (fmap * att.view(1, -1, 1, 1)).mean((2, 3)) @ head.weight.t() + head.bias
    torch.testing.assert_close(head(fmap), expected)
    head.freeze_attention()
    head.gc1.weight.data.zero_()  # a frozen head no longer reads the graph
    torch.testing.assert_close(head(fmap), expected)
    np.save(emb, np.zeros((4, 7), dtype=np.float32))
    with pytest.raises(ValueError, match=r"emb\.npy: expected a float array \[5, e\]"):
        load_label_embeddings(emb, 5)
