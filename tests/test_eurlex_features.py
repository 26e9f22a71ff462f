"""Text features for the xmc task (data.name text_tfidf / text_embed), the sparse-input MLP layer,
and the benchmark baselines, each against an independent reference: scikit-learn fitted by hand,
the MiniLM run one document at a time, dense Linear layers, plain loops and numpy's solver."""

import json

import numpy as np
import pytest
import torch

from eurlex_corpus import TEST_ONLY, joined_text, make_docs, write_jsonl
from mhe_scale.data import text_features
from mhe_scale.data.text_features import load_text_features
from mhe_scale.data.xmc_dataset import XcDataConfig, XMCDataset
from mhe_scale.eval import xmc_baselines as xb
from mhe_scale.models.mlp import MLPEncoder, SparseLinear


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs({"train": 60, "dev": 12, "test": 16}, seed=1)
    return docs, write_jsonl(tmp_path_factory.mktemp("eurlex"), docs)


class Recomputed(Exception):
    pass


def refuse(*args, **kwargs):
    raise Recomputed("features computed again despite the cache")


def dense(ds: XMCDataset) -> torch.Tensor:
    return ds.rows(torch.arange(len(ds)))


def test_tfidf_is_sklearn_fitted_on_train_only_and_cached(corpus, tmp_path, monkeypatch):
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs, folder = corpus
    cfg = XcDataConfig(name="text_tfidf", path=str(folder), text_format="eurlex", eval_split="test",
                       max_features=30, min_df=1, cache_dir=str(tmp_path))
    got = load_text_features(cfg, folder)
    vec = TfidfVectorizer(sublinear_tf=True, max_features=30, min_df=1, strip_accents="unicode")
    want_train = vec.fit_transform([joined_text(d) for d in docs["train"]]).toarray()
    want_test = vec.transform([joined_text(d) for d in docs["test"]]).toarray()
    assert torch.allclose(dense(got.train), torch.tensor(want_train, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(dense(got.eval), torch.tensor(want_test, dtype=torch.float32), atol=1e-6)
    used = sorted({c for rows in docs.values() for d in rows for c in d["concepts"]}, key=int)
    assert got.eval.labels[0][got.eval.labels[0] >= 0].tolist() == [used.index(c) for c in docs["test"][0]["concepts"]]
    monkeypatch.setattr(text_features, "tfidf_features", refuse)
    again = load_text_features(cfg, folder)
    assert torch.equal(dense(again.eval), dense(got.eval))
    with pytest.raises(Recomputed):  # another vocabulary size is another cache key
        load_text_features(XcDataConfig(**{**vars(cfg), "max_features": 20}), folder)


def test_embeddings_are_minilm_one_document_at_a_time_and_cached(corpus, tmp_path, monkeypatch):
    from mhe_scale.models.text import HFTextEncoder, load_tokenizer

    docs, folder = corpus
    cfg = XcDataConfig(name="text_embed", path=str(folder), text_format="eurlex", eval_split="dev", max_length=32,
                       embed_batch_size=3, max_train_points=5, max_test_points=4, cache_dir=str(tmp_path))
    got = load_text_features(cfg, folder)
    tok, enc = load_tokenizer("minilm"), HFTextEncoder("minilm", pooling="mean", dropout=0.0).eval()
    with torch.no_grad():
        for ds, rows in ((got.train, docs["train"][:5]), (got.eval, docs["dev"][:4])):
            want = torch.cat([enc(tok([joined_text(d)], truncation=True, max_length=32, return_tensors="pt",
                                      return_token_type_ids=False)) for d in rows])
            assert torch.allclose(dense(ds), torch.nn.functional.normalize(want, dim=1), atol=1e-5)
    monkeypatch.setattr(text_features, "embed_texts", refuse)
    assert torch.equal(dense(load_text_features(cfg, folder).eval), dense(got.eval))


def test_sparse_linear_equals_linear_on_dense_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 40, generator=gen) * (torch.rand(6, 40, generator=gen) < 0.2)
    x[3] = 0.0  # an empty row
    ds = XMCDataset(x.to_sparse_csr(), torch.zeros(6, 1, dtype=torch.long)).as_sparse_inputs()
    batch = torch.utils.data.default_collate(ds.__getitems__(list(range(6))))[0]
    one = torch.utils.data.default_collate([ds[i] for i in range(6)])[0]  # single points pad to the widest row
    sparse = SparseLinear(40, 5)
    lin = torch.nn.Linear(40, 5)
    with torch.no_grad():
        lin.weight.copy_(sparse.weight.T)
        lin.bias.copy_(sparse.bias)
    assert torch.allclose(sparse(batch), lin(x), atol=1e-6) and torch.allclose(sparse(one), lin(x), atol=1e-6)
    sparse(batch).square().sum().backward()
    lin(x).square().sum().backward()
    assert torch.allclose(sparse.weight.grad, lin.weight.grad.T, atol=1e-5)
    enc = MLPEncoder(40, 8, 4, depth=1, sparse_input=True)
    assert isinstance(enc.body[0], SparseLinear) and enc(batch).shape == (6, 4)


def test_knn_votes_against_a_loop():
    gen = torch.Generator().manual_seed(3)
    train = torch.nn.functional.normalize(torch.rand(30, 12, generator=gen), dim=1)
    query = torch.nn.functional.normalize(torch.rand(7, 12, generator=gen), dim=1)
    labels = torch.randint(-1, 9, (30, 3), generator=gen)
    sp = lambda t: xb.to_scipy(*(lambda c: (c.crow_indices(), c.col_indices(), c.values()))(t.to_sparse_csr()), 12)
    got = xb.knn_predictions(sp(train), xb.multi_hot_csr(labels, 9), sp(query), [1, 4], top=3, chunk=3)
    for k in (1, 4):
        for i in range(7):
            sims = [float(query[i] @ train[j]) for j in range(30)]
            nearest = sorted(range(30), key=lambda j: -sims[j])[:k]
            votes = [sum(sims[j] for j in nearest if c in labels[j].tolist()) for c in range(9)]
            assert torch.allclose(got[k][0][i], torch.tensor(sorted(votes, reverse=True)[:3]), atol=1e-5)


def test_ridge_is_the_closed_form_and_popularity_the_counts():
    gen = np.random.default_rng(0)
    x = gen.random((40, 6)).astype(np.float32)
    y = (gen.random((40, 4)) < 0.3).astype(np.float32)
    import scipy.sparse

    coef = xb.ridge_ovr(scipy.sparse.csr_matrix(x), scipy.sparse.csr_matrix(y), alpha=0.5)
    want = np.linalg.solve(x.T.astype(np.float64) @ x + 0.5 * np.eye(6), x.T.astype(np.float64) @ y).T
    assert np.allclose(coef, want, atol=1e-4)
    scores, ids = xb.popularity_predictions(torch.tensor([3, 9, 9, 1]), 2, 3)
    assert ids.tolist() == [[1, 2, 0]] * 2 and scores[0].tolist() == [9.0, 9.0, 3.0]


def test_xmc_task_on_text_tfidf_dev_split(corpus, tmp_path, capsys):
    from mhe_scale.cli import main

    docs, folder = corpus
    out = tmp_path / "run"
    rc = main(["train", "configs/xmc/eurlex57k_tfidf.yaml", f"data.path={folder}", f"data.cache_dir={tmp_path / 'c'}",
               "data.min_df=1", "data.eval_split=test", "model.hidden=16", "model.num_features=8", "head.num_groups=4",
               "head.top_k_groups=2", "head.hidden=8", "train.epochs=1", "train.batch_size=16", "eval.baseline=null",
               f"train.output_dir={out}", "train.loss_log=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    unseen = {c for d in docs["test"] for c in d["concepts"]} & TEST_ONLY
    assert f"{len(unseen)} test labels" in printed
    names = json.loads((out / "label_map.json").read_text())["names"]
    assert names[0] == "name of 100 [100]"


def test_fused_adamw_steps_as_the_default_one():
    from mhe_scale.config import OptimConfig
    from mhe_scale.engine.model import make_optimizer

    params = {}
    for fused in (False, True):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(30, 7))
        opt = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused), [{"params": [w]}])
        assert bool(opt.defaults.get("fused")) is fused
        for step in range(3):
            (w.sin() * (step + 1)).sum().backward()
            opt.step()
            opt.zero_grad()
        params[fused] = w.detach()
    assert torch.allclose(params[True], params[False], atol=1e-6)


def test_label_centroids_projected_from_sparse_chunks_equal_the_dense_product():
    from mhe_scale.data.xmc_dataset import label_centroids

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(23, 40, generator=gen) * (torch.rand(23, 40, generator=gen) < 0.3)
    labels = torch.randint(-1, 6, (23, 2), generator=gen)
    ds = XMCDataset(x.to_sparse_csr(), labels)
    proj = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)) / 8 ** 0.5
    want = torch.zeros(6, 8)
    for i in range(23):
        for y in [v for v in labels[i].tolist() if v >= 0]:  # per occurrence, as index_add
            want[y] += x[i] @ proj
    assert torch.allclose(label_centroids(ds, 6, max_dim=8, chunk=5), want, atol=1e-5)
