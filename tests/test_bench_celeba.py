"""tools/bench_celeba.py: its scoring equals the project's .bin path and eval_ijb on naively computed features,
PCA is fitted on the training identities only, one tiny trained row runs end to end, the table's arithmetic."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mhe_scale.data.face_protocol import make_face_protocol
from mhe_scale.eval.ijb import meta_paths, read_faces
from mhe_scale.eval.verification import bin_distances, verification_metrics

from conftest import load_tool

bench = load_tool("bench_celeba")
SIZE = 16


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Path:
    """30 generated identities (5-8 images, 24x24, a per-identity mean colour so that pixels carry identity)."""
    root = tmp_path_factory.mktemp("faces") / "images"
    rng = np.random.default_rng(5)
    for i in range(30):
        (root / f"p{i:02d}").mkdir(parents=True)
        base = rng.integers(40, 200, 3)
        for j in range(5 + i % 4):
            img = np.clip(base + rng.normal(0, 30, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"p{i:02d}" / f"{j}.png")
    out = tmp_path_factory.mktemp("protocol") / "p"
    make_face_protocol(root, out, num_train=8, seed=1, pairs_per_fold=20, template_size=2)
    return out


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(3 * (SIZE // 4) ** 2, 6))


def test_score_equals_the_bin_path_and_eval_ijb_on_per_face_features(protocol, tmp_path):
    model = tiny_model().eval()
    row = bench.score(model, protocol, SIZE, tmp_path / "s")
    d, same = bin_distances(model, protocol / "verification.bin", size=SIZE)  # the project's own .bin path
    ref = {far: verification_metrics(d, same, 10, far) for far in bench.FARS}
    assert row["acc"] == pytest.approx(ref[1e-2].accuracy, abs=1e-12)
    assert row["acc std"] == pytest.approx(ref[1e-2].accuracy_std, abs=1e-12)
    assert row["TAR@FAR=0.01"] == pytest.approx(ref[1e-2].tar, abs=1e-12)
    assert row["TAR@FAR=0.001"] is None  # 9 folds x 20 impostors < 1,000: not resolvable
    paths = meta_paths(protocol, "IJBC")
    names, _, _ = read_faces(paths["faces"])
    feats = []
    with torch.no_grad():
        for n in names:  # one face at a time, in the faces file's order
            x = bench.as_input(bench.decode([(paths["images"] / n).read_bytes()], SIZE))
            feats.append((model(x) + model(x.flip(3)))[0])
    np.save(tmp_path / "naive.npy", torch.stack(feats).numpy())
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("eval_ijb").main(["--root", str(protocol), "--features", str(tmp_path / "naive.npy"),
                                           "--far-rule", "at_most", "--out", str(tmp_path / "ijb")]) == 0
    ijb = json.loads((tmp_path / "ijb" / "results.json").read_text())
    assert row["IJB TAR@FAR=0.01"] == pytest.approx(ijb["verification"]["TAR@FAR=0.01"], abs=1e-6)
    assert row["IJB rank1"] == pytest.approx(ijb["identification"]["mean"]["rank1"], abs=1e-6)


def test_pca_is_fitted_on_the_training_identities_only(protocol):
    images = Path(json.loads((protocol / "protocol.json").read_text())["source"])
    train = json.loads((protocol / "protocol.json").read_text())["train_identities"]
    files = sorted(p for t in train for p in (images / t).glob("*.png"))
    x = bench.as_input(bench.decode([p.read_bytes() for p in files], SIZE)).flatten(1).double().numpy()
    model = bench.pca_model(protocol, SIZE, 5)
    assert np.allclose(model.mean.double().numpy(), x.mean(0), atol=1e-5)
    cov = np.cov(x, rowvar=False)
    w, v = np.linalg.eigh(cov)
    top = v[:, np.argsort(w)[::-1][:5]]  # naive: eigenvectors of the covariance
    got = model.v.double().numpy()
    assert np.allclose(got @ got.T, top @ top.T, atol=1e-4)  # the same 5-dimensional subspace
    out = model(torch.from_numpy(x[:3]).float().reshape(3, 3, SIZE, SIZE))
    assert torch.allclose(out.double(), torch.from_numpy((x[:3] - x.mean(0)) @ got), atol=1e-4)


def test_a_trained_row_runs_end_to_end_and_reports_its_costs(protocol, tmp_path):
    args = argparse.Namespace(protocol=protocol, out=tmp_path / "bench", pca_components=4, set=[
        "model.width_mult=0.25", "model.num_features=16", f"data.image_size={SIZE}", "data.num_classes=8",
        "train.epochs=1", "train.warmup_epochs=0", "train.batch_size=16"])
    ballast = np.ones(150_000_000)  # 1.2 GB in this process: a child's ru_maxrss would count it (fork), VmHWM does not
    parent = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmRSS:")) * 1024 / 1e9
    record = bench.run_row("fc", 0, args, SIZE)
    del ballast
    assert record["train s"] > 0 and 0.05 < record["peak RSS GB"] < parent - 1.0
    assert 0 <= record["acc"] <= 1 and 0 <= record["IJB rank1"] <= 1
    assert (tmp_path / "bench" / record["folder"] / "config.yaml").is_file()
    again = bench.run_row("fc", 0, args, SIZE)  # the finished training is not rerun: same record, same scores
    assert again["train s"] == record["train s"] and again["acc"] == record["acc"]


def test_table_averages_seeds_and_shows_the_folds_std_for_one_seed():
    rows = [{"row": "fc", "seed": s, "acc": a, "acc std": 0.01, "TAR@FAR=0.01": t, "TAR@FAR=0.001": None,
             "IJB TAR@FAR=0.01": 0.5, "IJB TAR@FAR=0.001": 0.25, "IJB rank1": 0.75, "train s": 10.0 * (s + 1),
             "peak RSS GB": 1.0} for s, a, t in ((0, 0.80, 0.4), (1, 0.90, 0.6))]
    rows[0].pop("peak RSS GB")  # unmeasured in one seed: the others' value is shown
    rows.append({"row": "pixels", "seed": 0, "acc": 0.6, "acc std": 0.02, "TAR@FAR=0.01": 0.1, "TAR@FAR=0.001": 0.0,
                 "IJB TAR@FAR=0.01": 0.1, "IJB TAR@FAR=0.001": 0.0, "IJB rank1": 0.3})
    lines = bench.table(rows).splitlines()
    assert lines[2] == ("| fc | 2 | 85.0 ± 5.0 (seeds) | 50.0 ± 10.0 | n/a | 50.0 ± 0.0 | 25.0 ± 0.0 | 75.0 ± 0.0 | "
                        "15.0 ± 5.0 | 1.0 |")
    assert lines[3] == "| pixels | 1 | 60.00 ± 2.00 (folds) | 10.0 | 0.0 | 10.0 | 0.0 | 30.0 | - | - |"


def test_a_two_process_row_launches_two_gloo_processes_at_half_the_batch(tmp_path):
    one, _ = bench.train_command("mhs_dense", 2, Path("/p"), tmp_path, ["train.epochs=1"], 64)
    two, env = bench.train_command("mhs_dense_x2", 2, Path("/p"), tmp_path, ["train.epochs=1"], 64)
    assert one[1:4] == ["-m", "mhe_scale.cli", "train"] and "configs/face/celeba249/celeba249_mfn_mhs.yaml" in one
    assert two[two.index("--num_processes") + 1] == "2" and env["ACCELERATE_USE_CPU"] == "1"
    assert two[two.index("mhe_scale.train") + 1:] == [*one[4:], "train.batch_size=32"]
    assert "optim.head_update=dense" in one and "train.seed=2" in one
