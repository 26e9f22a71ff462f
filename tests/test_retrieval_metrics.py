"""Retrieval metrics and search against naive loops transcribed from the benchmarks' scripts
(holidays_map / revisitop compute_ap and mP@k), exact search against a full sort, and embedding
images of mixed sizes batched by size."""

import math

import pytest
import torch

from mhe_scale.eval.retrieval import embed_by_size, ns_score, ranking_metrics, search


def naive_ap_pk(ranked, pos, junk, ks):
    ranks, r = [], 0
    for i in ranked:
        if i in junk and i not in pos:
            continue
        if i in pos:
            ranks.append(r)
        r += 1
    if not pos:
        return math.nan, [math.nan] * len(ks)
    ap = 0.0
    for j, rank in enumerate(ranks):
        p0 = 1.0 if rank == 0 else j / rank
        ap += (p0 + (j + 1) / (rank + 1)) / 2 / len(pos)
    one_based = [x + 1 for x in ranks]
    pks = []
    for k in ks:
        kq = min(max(one_based), k)
        pks.append(sum(1 for x in one_based if x <= kq) / kq)
    return ap, pks


def test_known_answer():
    ranking = torch.tensor([[0, 1, 2, 3]])
    pos = torch.tensor([[True, False, True, False]])
    out = ranking_metrics(ranking, pos, torch.zeros_like(pos), ks=(1, 2))
    assert out["mAP"] == pytest.approx(100 * ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    assert out["mP@1"] == pytest.approx(100.0) and out["mP@2"] == pytest.approx(50.0)
    junk = torch.tensor([[False, True, False, False]])  # removing the miss: both positives on top
    assert ranking_metrics(ranking, pos, junk)["mAP"] == pytest.approx(100.0)


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_naive_loops(seed):
    g = torch.Generator().manual_seed(seed)
    q, n, ks = 7, 30, (1, 5, 10)
    scores = torch.randn(q, n, generator=g)
    ranking = scores.argsort(dim=1, descending=True)
    pos = torch.rand(q, n, generator=g) < 0.2
    junk = (torch.rand(q, n, generator=g) < 0.15) & ~pos
    pos[3] = False  # a query without positives is left out of the means
    out = ranking_metrics(ranking, pos, junk, ks)
    aps, pks = [], []
    for i in range(q):
        ap, pk = naive_ap_pk(ranking[i].tolist(), set(pos[i].nonzero().view(-1).tolist()),
                             set(junk[i].nonzero().view(-1).tolist()), ks)
        aps.append(ap)
        pks.append(pk)
    valid = [i for i in range(q) if not math.isnan(aps[i])]
    assert math.isnan(out["ap"][3]) and len(valid) == q - 1
    assert out["mAP"] == pytest.approx(100 * sum(aps[i] for i in valid) / len(valid))
    for c, k in enumerate(ks):
        assert out[f"mP@{k}"] == pytest.approx(100 * sum(pks[i][c] for i in valid) / len(valid))


def test_ns_score_counts_group_members_in_the_top_four():
    ranking = torch.tensor([[0, 1, 5, 2, 3], [4, 3, 2, 1, 0]])
    pos = torch.zeros(2, 6, dtype=torch.bool)
    pos[0, :4] = True
    pos[1, :4] = True
    assert ns_score(ranking, pos) == pytest.approx((3 + 3) / 2)


@pytest.mark.parametrize("block", [1, 3, 100])
def test_blocked_search_equals_full_sort(block):
    g = torch.Generator().manual_seed(0)
    qs, db = torch.randn(8, 5, generator=g), torch.randn(20, 5, generator=g)
    scores, ids = search(qs, db, k=6, block=block, use_faiss=False)
    full = qs @ db.t()
    expected = full.argsort(dim=1, descending=True)[:, :6]
    assert torch.equal(ids, expected)
    torch.testing.assert_close(scores, full.gather(1, expected))
    assert search(qs, db, use_faiss=False)[1].shape == (8, 20)


def test_embedding_by_size_keeps_input_order_and_batches_sizes():
    calls = []

    def embed(x):
        calls.append(tuple(x.shape))
        return torch.cat([x.mean(dim=(2, 3)), torch.full((x.shape[0], 1), float(x.shape[2]))], dim=1)

    images = [torch.rand(3, h, w) for h, w in [(4, 6), (5, 5), (4, 6), (7, 3), (5, 5), (4, 6)]]
    out = embed_by_size(embed, images, batch_size=2)
    expected = torch.nn.functional.normalize(torch.stack([embed(im[None])[0] for im in images]), dim=1)
    torch.testing.assert_close(out, expected)
    assert sorted(calls[:4]) == sorted([(2, 3, 4, 6), (1, 3, 4, 6), (2, 3, 5, 5), (1, 3, 7, 3)])
    one = embed_by_size(embed, images, batch_size=1)
    torch.testing.assert_close(one, expected)


def test_faiss_search_equals_torch_search_and_gives_the_same_map():
    """The optional faiss path (IndexFlatIP, used whenever faiss imports) ranks as the torch matmul path."""
    pytest.importorskip("faiss")
    from mhe_scale.eval.retrieval import RetrievalSet, ImageRef, score

    g = torch.Generator().manual_seed(1)
    db = torch.nn.functional.normalize(torch.randn(5, 40, generator=g), dim=0).t()  # [40, 5], not contiguous
    qs = torch.nn.functional.normalize(torch.randn(12, 5, generator=g), dim=1)
    s_torch, i_torch = search(qs, db, k=7, use_faiss=False)
    s_faiss, i_faiss = search(qs, db, k=7, use_faiss=True)
    assert torch.equal(i_faiss, i_torch)
    torch.testing.assert_close(s_faiss, s_torch, rtol=1e-5, atol=1e-5)
    assert torch.equal(search(qs, db, use_faiss=None)[1], search(qs, db, use_faiss=False)[1])  # automatic choice
    refs = [ImageRef(f"{i}.jpg") for i in range(40)]
    positives = [[int(v) for v in torch.randperm(40, generator=g)[:3]] for _ in range(12)]
    rset = RetrievalSet("toy", refs, refs[:12], {"toy": (positives, [[q] for q in range(12)])})
    assert score(rset, qs, db, use_faiss=True) == score(rset, qs, db, use_faiss=False)
