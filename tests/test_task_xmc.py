"""XMC task on XC-format data: the dataset class against the reader and naive scaling loops, a run
on a tiny generated file (no shared data needed), and Medical end to end through mhe_scale.train."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mhe_scale.config import load_config
from mhe_scale.data.xc_format import read_xc_format, write_xc_format
from mhe_scale.data.xmc_dataset import (XMCDataset, balanced_bisection_order, cluster_label_order, idf_weights,
                                        label_centroids, relabel, scale_features)
from mhe_scale.tasks.xmc import POPULARITY, load_xmc, popularity_metrics, resolve_data_path

REPO = Path(__file__).resolve().parents[1]


def tiny_xc(folder: Path, seed: int = 0, n_train: int = 240, n_test: int = 80, num_labels: int = 12) -> None:
    """Learnable toy data: each label owns two features, plus noise features; 1-2 labels per point."""
    gen = torch.Generator().manual_seed(seed)
    num_features = 2 * num_labels + 10
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", n_train), ("test.txt", n_test)):
        first = torch.randint(0, num_labels, (n,), generator=gen)
        second = torch.randint(0, num_labels, (n,), generator=gen)
        second = torch.where((torch.rand(n, generator=gen) < 0.5) & (second != first), second, -1)
        labels = torch.stack([first, second], 1)
        x = (torch.rand(n, num_features, generator=gen) < 0.1).float() * torch.rand(n, num_features, generator=gen)
        rows = torch.arange(n)
        for col in (0, 1):
            has = labels[:, col] >= 0
            lab = labels[has, col]
            x[rows[has], 2 * lab] = 1.0
            x[rows[has], 2 * lab + 1] = 2.0
        x[3] = 0.0  # a point without features
        write_xc_format(folder / name, x, labels, num_features=num_features, num_labels=num_labels)


def naive_scaled(dense: np.ndarray, mode: str, idf: np.ndarray | None) -> np.ndarray:
    out = dense.astype(np.float64).copy()
    for i in range(out.shape[0]):
        if mode == "tfidf":
            for j in range(out.shape[1]):
                out[i, j] *= idf[j]
        if mode in ("l2", "tfidf"):
            norm = math.sqrt(sum(v * v for v in out[i]))
            if norm > 0:
                out[i] /= norm
    return out


def naive_idf(dense: np.ndarray) -> np.ndarray:
    n = dense.shape[0]
    return np.array([math.log((1 + n) / (1 + sum(1 for i in range(n) if dense[i, j] != 0))) + 1
                     for j in range(dense.shape[1])])


@pytest.mark.parametrize("mode", ["none", "l2", "tfidf"])
def test_dataset_rows_match_reader_and_naive_scaling(tmp_path, mode):
    tiny_xc(tmp_path)
    train = read_xc_format(tmp_path / "train.txt")
    dense = train.features.to_dense().numpy()
    idf = idf_weights(train.features)
    np.testing.assert_allclose(idf.numpy(), naive_idf(dense), rtol=1e-6)
    ds = XMCDataset.from_xc(train, mode, idf if mode == "tfidf" else None)
    want = naive_scaled(dense, mode, idf.double().numpy())
    order = torch.tensor([5, 3, 0, 5, len(ds) - 1, -1])  # repeats, an empty row, negative index
    np.testing.assert_allclose(ds.rows(order).numpy(), want[order.numpy()], rtol=1e-5, atol=1e-7)
    x, y = ds[7]
    np.testing.assert_allclose(x.numpy(), want[7], rtol=1e-5, atol=1e-7)
    assert torch.equal(y, train.labels[7])
    # through torch's DataLoader (it hands __getitems__ whole batches), in a shuffled order
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    batches = list(DataLoader(ds, batch_size=32, sampler=perm.tolist()))
    assert all(xb.dtype == torch.float32 and xb.shape[1] == ds.num_features for xb, _ in batches)
    np.testing.assert_allclose(torch.cat([xb for xb, _ in batches]).numpy(), want[perm.numpy()], rtol=1e-5, atol=1e-7)
    assert torch.equal(torch.cat([yb for _, yb in batches]), train.labels[perm])
    batch = ds.__getitems__([2, 9, 4])
    assert torch.equal(torch.stack([b[1] for b in batch]), train.labels[[2, 9, 4]])
    np.testing.assert_allclose(torch.stack([b[0] for b in batch]).numpy(), want[[2, 9, 4]], rtol=1e-5, atol=1e-7)


def test_dataset_and_scaling_errors(tmp_path):
    tiny_xc(tmp_path)
    train = read_xc_format(tmp_path / "train.txt")
    with pytest.raises(ValueError, match="data.normalize='bm25'"):
        scale_features(train.features, "bm25")
    with pytest.raises(ValueError, match="idf"):
        scale_features(train.features, "tfidf")
    with pytest.raises(ValueError, match="sparse CSR"):
        XMCDataset(train.features.to_dense(), train.labels)
    with pytest.raises(IndexError):
        XMCDataset.from_xc(train).rows(torch.tensor([len(train.labels)]))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        resolve_data_path("no_such_folder")


def test_balanced_bisection_recovers_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    num_clusters, size, dim = 16, 10, 32
    centers = torch.randn(num_clusters, dim, generator=gen) * 3
    assign = torch.randperm(num_clusters * size, generator=gen) % num_clusters
    emb = centers[assign] + 0.3 * torch.randn(len(assign), dim, generator=gen)
    order = balanced_bisection_order(emb)
    assert sorted(order.tolist()) == list(range(len(assign)))
    blocks = assign[order].view(num_clusters, size)  # contiguous blocks of new ids
    assert all(len(set(b.tolist())) == 1 for b in blocks)
    for c in (0, 1, 2, 7):  # degenerate sizes: empty, one, odd
        assert sorted(balanced_bisection_order(torch.randn(c, 4, generator=gen)).tolist()) == list(range(c))


def test_label_centroids_and_relabel_against_loops(tmp_path):
    tiny_xc(tmp_path)
    ds = XMCDataset.from_xc(read_xc_format(tmp_path / "train.txt"), "l2")
    dense = ds.rows(torch.arange(len(ds)))
    want = torch.zeros(12, ds.num_features)
    for i, row in enumerate(ds.labels.tolist()):
        for y in row:
            if y >= 0:
                want[y] += dense[i]
    assert torch.allclose(label_centroids(ds, 12, chunk=7), want, atol=1e-5)
    new_id = cluster_label_order(ds, 12)
    assert sorted(new_id.tolist()) == list(range(12))
    moved = relabel(ds.labels, new_id)
    for old_row, new_row in zip(ds.labels.tolist(), moved.tolist()):
        assert new_row == [new_id[y].item() if y >= 0 else -1 for y in old_row]


def test_cluster_label_order_leaves_metrics_unchanged(tmp_path):
    tiny_xc(tmp_path)
    given = load_xmc(load_config(overrides=["data.name=xc", f"data.path={tmp_path}"]).data)
    clustered = load_xmc(load_config(overrides=["data.name=xc", f"data.path={tmp_path}", "data.label_order=cluster"]).data)
    assert given.label_map is None and clustered.label_map is not None
    assert torch.equal(clustered.test.labels, relabel(given.test.labels, clustered.label_map))
    assert torch.allclose(clustered.inv_propensity[clustered.label_map], given.inv_propensity)
    assert popularity_metrics(given, [1, 3, 5]) == pytest.approx(popularity_metrics(clustered, [1, 3, 5]))
    with pytest.raises(ValueError, match="data.label_order='random'"):
        load_xmc(load_config(overrides=["data.name=xc", f"data.path={tmp_path}", "data.label_order=random"]).data)


def test_medical_rows_match_reader(shared_data):
    folder = shared_data / "mulan-medical" / "xc_format"
    test = read_xc_format(folder / "test.txt")
    ds = XMCDataset.from_xc(test, "none")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:100]
    assert torch.equal(ds.rows(idx), test.features.to_dense()[idx])
    assert torch.equal(ds.labels[idx], test.labels[idx])
    data = load_xmc(load_config(REPO / "configs" / "xmc" / "medical.yaml").data)
    assert (len(data.train), len(data.test), data.num_features, data.num_classes) == (333, 645, 1449, 45)
    norms = data.train.rows(torch.arange(len(data.train))).norm(dim=1)
    assert torch.allclose(norms[norms > 0], torch.ones(()), atol=1e-5)  # tfidf rows are unit length


def popularity_p1(train_labels: torch.Tensor, test_labels: torch.Tensor, num_labels: int) -> float:
    """Naive P@1 of always predicting the most frequent training label."""
    counts = [0] * num_labels
    for row in train_labels.tolist():
        for y in set(row):
            if y >= 0:
                counts[y] += 1
    top = max(range(num_labels), key=lambda y: (counts[y], -y))
    return sum(top in row for row in test_labels.tolist()) / len(test_labels)


def test_tiny_generated_run_without_shared_data(tmp_path):
    from accelerate import Accelerator

    from mhe_scale.tasks.xmc import run_xmc

    tiny_xc(tmp_path / "data")
    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "xmc" / "medical.yaml",
                      [f"data.path={tmp_path / 'data'}", "model.hidden=32", "model.num_features=16", "model.dropout=0",
                       "train.epochs=8", "train.batch_size=32", "optim.lr=0.01", f"train.output_dir={out}",
                       "head.num_groups=4", "head.top_k_groups=2", "head.hidden=16", "train.eval_every=5"])
    results = run_xmc(cfg, Accelerator(cpu=True))
    for folder in ("mhc", "fc-baseline"):  # train.eval_every works in the XMC tasks, per head
        rows = [json.loads(line) for line in (out / folder / "eval_log.jsonl").read_text().splitlines()]
        assert rows and all(r["step"] % 5 == 0 and 0 <= r["P@1"] <= 1 for r in rows), folder
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == set(results) == {"mhc", "fc", POPULARITY}
    assert "path: " + str(tmp_path / "data") in (out / "config.yaml").read_text()
    assert "| fc |" in (out / "results.md").read_text()
    train, test = read_xc_format(tmp_path / "data" / "train.txt"), read_xc_format(tmp_path / "data" / "test.txt")
    floor = popularity_p1(train.labels, test.labels, 12)
    assert saved[POPULARITY]["metrics"]["P@1"] == pytest.approx(floor)
    for name, run in saved.items():
        if name != POPULARITY:
            assert run["metrics"]["P@1"] > floor + 0.3, (name, run["metrics"]["P@1"], floor)
            assert run["costs"]["head params (K)"] > 0


def test_medical_end_to_end_beats_most_frequent_labels(tmp_path, shared_data):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mhe_scale.train", "configs/xmc/medical.yaml", "train.epochs=6",
           "train.batch_size=64", "optim.lr=5e-3", "data.label_order=cluster", "eval.prediction_k=5",
           f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((out / "results.json").read_text())
    folder = shared_data / "mulan-medical" / "xc_format"
    train = read_xc_format(folder / "train.txt", features=False)
    test = read_xc_format(folder / "test.txt", features=False)
    floor = popularity_p1(train.labels, test.labels, 45)
    assert saved[POPULARITY]["metrics"]["P@1"] == pytest.approx(floor)
    trained = [name for name in saved if name != POPULARITY]
    assert sorted(trained) == ["fc", "mhc"]
    for name in trained:
        metrics = saved[name]["metrics"]
        assert metrics["P@1"] > floor + 0.25, (name, metrics["P@1"], floor)
        assert {"P@5", "nDCG@3", "PSP@1", "PSP@5"} <= set(metrics)
    assert "| fc |" in proc.stdout and "most frequent" in proc.stdout
    # the saved predictions, in the files' label ids (the run renumbered labels by cluster), score the
    # same through tools/eval_xmc.py as the run measured
    files = [out / "mhc" / "predictions.txt", out / "fc-baseline" / "predictions.txt"]
    tool = subprocess.run([sys.executable, "tools/eval_xmc.py", "--pred", *map(str, files), "--names", "mhc", "fc",
                           "--labels", str(folder / "test.txt"), "--train-labels", str(folder / "train.txt"), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert tool.returncode == 0, tool.stderr[-3000:]
    scored = json.loads(tool.stdout)
    for name in ("mhc", "fc"):
        assert scored[name] == pytest.approx(saved[name]["metrics"], abs=1e-12), name
