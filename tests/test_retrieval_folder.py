"""The labelled-folder protocol (root/<class>/<image>: each image a query, the other images of its
class positive, the query itself left out) against a naive per-query loop written here, and the
resizing rule that never enlarges an image past the cap (the training resolution) unless asked."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mhe_scale.eval.retrieval as R
from mhe_scale.eval.retrieval import (ImageRef, RetrievalSet, SameLabel, evaluate, labelled_folder, load_image,
                                      score)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def embed(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> mean colour + mean of the left half [B, 6]."""
    return torch.cat([x.mean(dim=(2, 3)), x[..., : x.shape[3] // 2].mean(dim=(2, 3))], dim=1)


def naive_vec(path) -> np.ndarray:
    a = (np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255.0 - 0.5) / 0.25
    v = np.concatenate([a.mean(axis=(0, 1)), a[:, : a.shape[1] // 2].mean(axis=(0, 1))])
    return v / np.linalg.norm(v)


def naive_folder_metrics(vecs, labels, ks):
    """Per query: the other images sorted by inner product; AP = mean over positives of (positives so
    far) / rank; recall@k = a positive among the first k. Means over queries that have a positive."""
    aps, recalls, without = [], {k: [] for k in ks}, 0
    for q in range(len(vecs)):
        others = sorted((j for j in range(len(vecs)) if j != q), key=lambda j: -float(vecs[q] @ vecs[j]))
        hits = [labels[j] == labels[q] for j in others]
        if not any(hits):
            without += 1
            continue
        found, precisions = 0, []
        for rank, hit in enumerate(hits, start=1):
            if hit:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
        for k in ks:
            recalls[k].append(any(hits[:k]))
    return 100 * sum(aps) / len(aps), {k: 100 * sum(r) / len(r) for k, r in recalls.items()}, without


def write_folder(root, sizes_by_class, seed=0):
    rng = np.random.default_rng(seed)
    for c, sizes in enumerate(sizes_by_class):
        for i, (h, w) in enumerate(sizes):
            base = np.array([(70 * c) % 256, (255 - 60 * c) % 256, (40 + 90 * c) % 256], np.float64)
            pixels = base + rng.normal(0, 50, 3) + rng.normal(0, 70, (h, w, 3))
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"class{c}" / f"{i:03d}.png")


def test_labelled_folder_matches_a_naive_loop(tmp_path):
    # 4 classes (one of a single image: a query without positives), mixed sizes, no image resized
    sizes = [[(16, 20)] * 4, [(16, 20), (20, 16), (16, 20)], [(12, 12)] * 5, [(16, 20)]]
    write_folder(tmp_path, sizes)
    rset = labelled_folder(tmp_path)
    assert len(rset.queries) == len(rset.database) == 13
    ks = (1, 2, 5)
    got = evaluate(rset, embed, mean=MEAN, std=STD, ks=ks, batch_size=2)  # 2-image batches, 8-image chunks
    files = [p for c in range(4) for p in sorted((tmp_path / f"class{c}").glob("*.png"))]
    labels = [c for c in range(4) for _ in sizes[c]]
    m_ap, recall, without = naive_folder_metrics([naive_vec(f) for f in files], labels, ks)
    assert got["mAP"] == pytest.approx(m_ap, abs=1e-9)
    for k in ks:
        assert got[f"recall@{k}"] == pytest.approx(recall[k], abs=1e-9), k
    assert got["queries"] == 13 and got["queries_without_positives"] == without == 1
    assert 0 < got["mAP"] < 100  # not a trivially perfect ranking


def test_plain_ap_agrees_with_sklearn_and_blocks_do_not_change_it(monkeypatch):
    from sklearn.metrics import average_precision_score

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(40, 5, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 6, (40,), generator=g)
    rset = RetrievalSet("toy", [ImageRef(f"{i}") for i in range(40)], [ImageRef(f"{i}") for i in range(40)],
                        {"folder": SameLabel(labels, labels, torch.arange(40))})
    whole = score(rset, emb, emb, ks=(1, 3))
    monkeypatch.setattr(R, "RANK_BLOCK_ENTRIES", 7 * 40)  # blocks of 7 queries
    assert score(rset, emb, emb, ks=(1, 3)) == whole
    aps = []
    for q in range(40):
        others = [j for j in range(40) if j != q]
        truth = (labels[others] == labels[q]).numpy()
        if truth.any():
            aps.append(average_precision_score(truth, (emb[others] @ emb[q]).numpy()))
    assert whole["mAP"] == pytest.approx(100 * np.mean(aps), abs=1e-9)


def test_ranking_in_query_blocks_changes_no_protocol_metric(monkeypatch):
    """Lists of positives / junk (Holidays-like, with N-S) and a SameLabel rule in one set, scored whole
    and in blocks of 3 queries: every metric equal."""
    g = torch.Generator().manual_seed(2)
    db = torch.nn.functional.normalize(torch.randn(24, 4, generator=g, dtype=torch.float64), dim=1)
    qs = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=torch.float64), dim=1)
    positives = [torch.randperm(24, generator=g)[:4].tolist() for _ in range(10)]
    junk = [torch.randperm(24, generator=g)[:2].tolist() for _ in range(10)]
    labels = torch.randint(0, 3, (24,), generator=g)
    rule = SameLabel(labels, labels[:10], torch.arange(10))
    refs = [ImageRef(f"{i}") for i in range(24)]
    rset = RetrievalSet("toy", refs, refs[:10], {"lists": (positives, junk), "labels": rule}, ns_score=True)
    whole = score(rset, qs, db, ks=(1, 4), use_faiss=False)
    assert {"lists/mAP", "lists/mP@4", "lists/N-S", "labels/mAP", "labels/recall@4"} <= set(whole)
    monkeypatch.setattr(R, "RANK_BLOCK_ENTRIES", 3 * 24)
    assert score(rset, qs, db, ks=(1, 4), use_faiss=False) == whole


def test_folder_without_any_pair_is_refused(tmp_path):
    write_folder(tmp_path, [[(8, 8)], [(8, 8)]])
    with pytest.raises(ValueError, match="every class folder holds one image"):
        labelled_folder(tmp_path)


def test_images_are_enlarged_only_up_to_the_cap(tmp_path):
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((100, 200, 3), np.uint8)).save(tmp_path / "large.png")
    small, large = ImageRef(str(tmp_path / "small.png")), ImageRef(str(tmp_path / "large.png"))
    assert load_image(small, 100).shape == (50, 100, 3)  # no cap: enlarged 5x to s*
    assert load_image(small, 100, upsample_limit=32).shape == (16, 32, 3)  # enlarged to the cap only
    assert load_image(small, 100, upsample_limit=16).shape == (10, 20, 3)  # already past the cap: as it is
    assert load_image(small, 12, upsample_limit=32).shape == (6, 12, 3)  # larger than s*: shrunk
    assert load_image(large, 100, upsample_limit=32).shape == (50, 100, 3)  # the cap never stops shrinking


def test_evaluate_feeds_the_capped_sizes_to_the_model(tmp_path):
    sizes = [[(32, 32)] * 2, [(32, 32)] * 2]
    write_folder(tmp_path, sizes)
    seen = []

    def spy(x):
        seen.append(tuple(x.shape[2:]))
        return embed(x)

    rset = labelled_folder(tmp_path)
    capped = evaluate(rset, spy, 500, MEAN, STD, upsample_limit=32)
    assert set(seen) == {(32, 32)}
    seen.clear()
    asked = evaluate(rset, spy, 64, MEAN, STD)  # no cap: what a user asks for
    assert set(seen) == {(64, 64)} and not math.isnan(asked["mAP"]) and not math.isnan(capped["mAP"])
