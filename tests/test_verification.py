"""Pair verification: K-fold accuracy and TAR@FAR against naive loops, the restricted unpickler,
.bin round trips and the embed-with-flip protocol."""

import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mhe_scale.data.face_bin import FaceBinError, encode_images, read_face_bin, write_face_bin
from mhe_scale.eval.verification import (ACC_THRESHOLDS, FAR_THRESHOLDS, data_thresholds, embed_images, evaluate_bin,
                                         fold_ids, pair_distances, verification_metrics)

torch.set_num_threads(1)


def naive_thresholds(train_dist):
    """The data-driven candidates written out: below all, midpoints of distinct neighbours, above all."""
    u = sorted(set(float(v) for v in train_dist))
    return [u[0]] + [(a + b) / 2 for a, b in zip(u, u[1:])] + [np.nextafter(u[-1], np.inf)]


def naive_metrics(dist, same, folds, thresholds, far_thresholds, far_target):
    """Loops over folds and thresholds, as the protocol is written (numpy per threshold);
    thresholds / far_thresholds None: the training folds' naive_thresholds."""
    dist, same = np.asarray(dist, dtype=np.float64), np.asarray(same, dtype=bool)
    n = len(dist)
    bounds = np.cumsum([0] + [n // folds + (1 if k < n % folds else 0) for k in range(folds)])
    accs, thrs, tars, fars, far_thrs = [], [], [], [], []
    for k in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[k]:bounds[k + 1]] = True
        train = ~test
        best_t, best_acc = None, -1.0
        for t in (naive_thresholds(dist[train]) if thresholds is None else thresholds):
            acc = np.mean((dist[train] < t) == same[train])
            if acc > best_acc:
                best_t, best_acc = t, acc
        thrs.append(best_t)
        accs.append(np.mean((dist[test] < best_t) == same[test]))
        chosen = -np.inf
        for t in (naive_thresholds(dist[train]) if far_thresholds is None else far_thresholds):
            far_train = np.sum((dist[train] < t) & ~same[train]) / np.sum(~same[train])
            if far_train <= far_target:
                chosen = t
        far_thrs.append(chosen)
        if chosen == -np.inf:
            tars.append(0.0)
            fars.append(0.0)
        else:
            tars.append(np.sum((dist[test] < chosen) & same[test]) / np.sum(same[test]))
            fars.append(np.sum((dist[test] < chosen) & ~same[test]) / np.sum(~same[test]))
    return np.array(accs), np.array(thrs), np.array(tars), np.array(fars), np.array(far_thrs)


def synthetic_pairs(n, seed, overlap=0.35):
    g = torch.Generator().manual_seed(seed)
    same = torch.rand(n, generator=g) < 0.5
    dist = torch.where(same, 0.9, 1.5) + overlap * torch.randn(n, generator=g, dtype=torch.float64)
    dist = dist.clamp(0, 4)
    dist[::3] = torch.round(dist[::3] * 100) / 100  # exactly on grid points: tests the strict '<'
    return dist, same


def test_fold_ids_unshuffled_kfold():
    ids = fold_ids(603, 10)
    assert torch.bincount(ids).tolist() == [61, 61, 61] + [60] * 7
    assert bool((ids[1:] >= ids[:-1]).all())
    with pytest.raises(ValueError, match="folds=10 for 5 pairs"):
        fold_ids(5, 10)


def test_data_thresholds_split_every_gap():
    d = torch.tensor([0.5, 0.1, 0.5, 0.3, 1e-9], dtype=torch.float64)
    assert data_thresholds(d).tolist() == [1e-9, (1e-9 + 0.1) / 2, 0.2, 0.4, np.nextafter(0.5, 1)]
    tiny = torch.tensor([1.0, np.nextafter(1.0, 2)], dtype=torch.float64)  # the midpoint rounds down
    assert bool(((tiny < data_thresholds(tiny)[1]) == torch.tensor([True, False])).all())


@pytest.mark.parametrize("grid", [True, False])
@pytest.mark.parametrize("n, folds, seed, exact_far", [(603, 10, 0, False), (240, 10, 1, True), (97, 4, 2, True)])
def test_kfold_metrics_match_naive_loops(n, folds, seed, exact_far, grid):
    dist, same = synthetic_pairs(n, seed)
    far_grid = torch.arange(0, 400, dtype=torch.float64) / 100
    # exact_far: a target that fold 0's training negatives hit exactly (tests '<=' against '<')
    far_target = 3 / int((~same[len(fold_ids(n, folds)[fold_ids(n, folds) == 0]):]).sum()) if exact_far else 0.05
    res = verification_metrics(dist, same, folds, far_target=far_target, thresholds=ACC_THRESHOLDS if grid else None,
                               far_thresholds=far_grid if grid else None)
    accs, thrs, tars, fars, far_thrs = naive_metrics(dist.numpy(), same.numpy(), folds,
                                                     ACC_THRESHOLDS.numpy() if grid else None,
                                                     far_grid.numpy() if grid else None, far_target)
    np.testing.assert_allclose(res.fold_accuracy.numpy(), accs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.fold_threshold.numpy(), thrs, rtol=0, atol=0)
    np.testing.assert_allclose(res.fold_tar_threshold.numpy(), far_thrs, rtol=0, atol=0)
    assert res.accuracy == pytest.approx(accs.mean(), abs=1e-12)
    assert res.accuracy_std == pytest.approx(accs.std(), abs=1e-12)
    assert res.tar == pytest.approx(tars.mean(), abs=1e-12)
    assert res.tar_std == pytest.approx(tars.std(), abs=1e-12)
    assert res.far == pytest.approx(fars.mean(), abs=1e-12)
    assert 0.6 < res.accuracy < 0.95  # overlapping classes: the naive check is not trivial


def test_perfect_separation():
    g = torch.Generator().manual_seed(3)
    same = torch.arange(600) % 2 == 0
    dist = torch.where(same, 0.6 * torch.rand(600, generator=g), 1.5 + torch.rand(600, generator=g))
    res = verification_metrics(dist, same)
    assert res.accuracy == 1.0 and res.accuracy_std == 0.0
    assert torch.equal(res.fold_accuracy, torch.ones(10, dtype=torch.float64))
    assert 0.6 <= res.threshold <= 1.5
    assert res.tar == 1.0 and res.far == 0.0
    assert "accuracy 100.00 +- 0.00 %" in res.summary()


def test_collapsed_model_thresholds_come_from_the_data(recwarn):
    """Every distance below 1e-7 (a collapsed model) but separable: the data-driven thresholds find the
    split; insightface's 0.01 grid cannot (50 %), and says so instead of reporting 50.00 +- 0 silently."""
    same = torch.arange(600) % 2 == 0
    dist = torch.where(same, 1e-9, 5e-8) * (1 + torch.rand(600, generator=torch.Generator().manual_seed(0)))
    res = verification_metrics(dist.double(), same)
    assert res.accuracy == 1.0 and res.tar == 1.0 and len(recwarn) == 0
    with pytest.warns(UserWarning, match="between two points of the thresholds grid"):
        grid = verification_metrics(dist.double(), same, thresholds=ACC_THRESHOLDS, far_thresholds=FAR_THRESHOLDS)
    assert grid.accuracy == 0.5
    with pytest.warns(UserWarning, match="all 600 distances are equal"):
        verification_metrics(torch.zeros(600, dtype=torch.float64), same)


def test_no_impostor_pairs_gives_nan_tar_and_a_warning():
    g = torch.Generator().manual_seed(1)
    dist = torch.rand(300, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no impostor .* TAR@FAR is undefined"):
        res = verification_metrics(dist, torch.ones(300, dtype=torch.bool), name="all_genuine.bin")
    assert np.isnan(res.tar) and res.impostors == 0 and res.genuine == 300 and not res.far_resolved
    assert "n/a (0 impostor pairs)" in res.summary()


def test_metric_input_errors():
    with pytest.raises(ValueError, match="nan/inf"):
        verification_metrics(torch.tensor([0.1, float("nan")] * 10), torch.tensor([True, False] * 10))
    with pytest.raises(ValueError, match="ascending"):
        verification_metrics(torch.rand(20), torch.rand(20) > 0.5, thresholds=torch.tensor([1.0, 0.5]))


# ---------- .bin files ----------

def smooth_images(n, size, seed):
    """Low-frequency random images (JPEG-friendly): uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False) * 255).to(torch.uint8)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([evil, b"x"], [True])))
    with pytest.raises(FaceBinError, match=rf"{re.escape(str(path))}: refusing to load global (posix|os|nt)\.system"):
        read_face_bin(path)
    assert not marker.exists()


def test_reader_errors_name_the_file(tmp_path):
    blobs = encode_images(smooth_images(2, 16, 0))
    path = tmp_path / "cut.bin"
    path.write_bytes(pickle.dumps((blobs, [True]))[:-20])
    with pytest.raises(FaceBinError, match=rf"{re.escape(str(path))}: not a readable pickle"):
        read_face_bin(path)
    path.write_bytes(pickle.dumps((blobs + blobs, [True])))
    with pytest.raises(FaceBinError, match="4 images for 1 pairs"):
        read_face_bin(path)
    path.write_bytes(pickle.dumps((blobs, np.array([True], dtype=object))))
    with pytest.raises(FaceBinError, match="booleans, got dtype object"):
        read_face_bin(path)
    with pytest.raises(FaceBinError, match="numpy.*ndarray|_reconstruct"):
        read_face_bin(path, allow_numpy=False)
    path.write_bytes(pickle.dumps(([b"not an image", blobs[0]], [False])))
    with pytest.raises(FaceBinError, match=rf"{re.escape(str(path))}: image 0 \(12 bytes\) does not decode"):
        read_face_bin(path).decode()
    with pytest.raises(FaceBinError, match="cannot read"):
        read_face_bin(tmp_path / "missing.bin")


def test_bin_round_trip(tmp_path):
    images = smooth_images(6, 112, 1)
    path = tmp_path / "pairs.bin"
    write_face_bin(path, images, torch.tensor([True, False, True]))
    pairs = read_face_bin(path)
    assert pairs.num_pairs == 3 and pairs.issame.tolist() == [True, False, True]
    assert pairs.images == encode_images(images)  # JPEG encoding is deterministic
    decoded = pairs.decode()
    for i, blob in enumerate(pairs.images):
        assert torch.equal(decoded[i], torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB")))
                           .permute(2, 0, 1))
    assert (decoded.float() - images.float()).abs().mean() < 3  # JPEG error only
    assert torch.equal(pairs.decode(2, 4), decoded[2:4])
    assert os.listdir(tmp_path) == ["pairs.bin"]  # no temporary left behind


def test_numpy_issame_and_resize(tmp_path):
    png = encode_images(smooth_images(2, 100, 2), fmt="PNG")
    path = tmp_path / "np.bin"
    path.write_bytes(pickle.dumps((png, np.array([True]))))
    pairs = read_face_bin(path)
    assert pairs.issame.tolist() == [True]
    assert pairs.decode(size=112).shape == (2, 3, 112, 112)


@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("numpy_issame", [False, True])
def test_python3_pickles_of_every_protocol(tmp_path, protocol, numpy_issame):
    """Protocols 0-2 store bytes as _codecs.encode(text, 'latin1'); protocol 5 rebuilds numpy arrays
    with numpy._core.numeric._frombuffer: both are pure and allowed."""
    blobs = encode_images(smooth_images(4, 16, 4))
    issame = np.array([True, False]) if numpy_issame else [True, False]
    path = tmp_path / f"p{protocol}.bin"
    path.write_bytes(pickle.dumps((blobs, issame), protocol=protocol))
    pairs = read_face_bin(path)
    assert pairs.images == blobs and pairs.issame.tolist() == [True, False]


def test_codecs_encode_only_as_latin1(tmp_path):
    """The stand-in for _codecs.encode answers (str, 'latin1') and nothing else."""
    path = tmp_path / "codec.bin"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")  # _codecs.encode("abc", "rot13")
    with pytest.raises(FaceBinError, match="only allowed as \\(str, 'latin1'\\)"):
        read_face_bin(path)


def test_python2_pickle_layout(tmp_path):
    """Python 2 wrote image bytes as str (BINSTRING): the default decoding fails, 'bytes' works."""
    blobs = encode_images(smooth_images(2, 16, 3))
    body = b"".join(b"T" + struct.pack("<i", len(b)) + b for b in blobs)
    data = b"\x80\x02]q\x00(" + body + b"e]q\x01\x88a\x86q\x02."
    path = tmp_path / "py2.bin"
    path.write_bytes(data)
    pairs = read_face_bin(path)
    assert pairs.images == blobs and pairs.issame.tolist() == [True]


# ---------- embeddings and the end-to-end protocol ----------

class TinyNet(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.fc = nn.Linear(3 * size * size, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def test_embed_images_sums_flips():
    torch.manual_seed(0)
    model = TinyNet(16)
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    emb = embed_images(model, images, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        expected = F.normalize(model(x) + model(x.flip(3)), dim=1)
        no_flip = F.normalize(model(x), dim=1)
    torch.testing.assert_close(emb, expected)
    torch.testing.assert_close(embed_images(model, images, flip=False), no_flip)
    with pytest.raises(ValueError, match="uint8 images"):
        embed_images(model, images.float())
    d = pair_distances(emb[:4])
    torch.testing.assert_close(d, torch.stack([(emb[0] - emb[1]).square().sum(), (emb[2] - emb[3]).square().sum()]))


def test_evaluate_bin_end_to_end(tmp_path):
    torch.manual_seed(0)
    n_pairs, size = 40, 32
    images = smooth_images(2 * n_pairs, size, 4)
    issame = torch.arange(n_pairs) % 2 == 0
    images[0::2][issame] = images[1::2][issame]  # same-identity pairs: identical images
    path = tmp_path / "lfw_like.bin"
    write_face_bin(path, images, issame)
    res = evaluate_bin(TinyNet(size), path, batch_size=16, size=size)
    assert res.accuracy == 1.0 and res.tar == 1.0


def test_evaluate_bin_all_genuine_pairs(tmp_path):
    """A .bin with no impostor pairs: TAR nan with a warning naming the file, not a silent 'TAR 0.00'."""
    torch.manual_seed(0)
    images = smooth_images(40, 16, 5)
    path = tmp_path / "all_genuine.bin"
    write_face_bin(path, images, torch.ones(20, dtype=torch.bool))
    with pytest.warns(UserWarning, match=rf"{re.escape(str(path))}: no impostor"):
        res = evaluate_bin(TinyNet(16), path, batch_size=16, size=16)
    assert np.isnan(res.tar) and res.impostors == 0


def test_embed_images_never_runs_more_than_a_batch_and_shows_progress(capsys):
    """The flips go through their own forward: no forward sees more than batch_size images (one [2b] batch of
    images and flips before: the verification pass's activations were twice the eval batch's), same embeddings;
    progress="..." draws a bar labelled with it on stderr (none by default)."""
    torch.manual_seed(0)
    model = TinyNet(16).eval()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    images = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8)
    emb = embed_images(model, images, batch_size=3)
    assert max(seen) == 3 and sum(seen) == 2 * 7
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        torch.testing.assert_close(emb, F.normalize(model(x) + model(x.flip(3)), dim=1))
    assert capsys.readouterr().err == ""
    embed_images(model, images, batch_size=3, progress="verify lfw.bin")
    err = capsys.readouterr().err
    assert "verify lfw.bin" in err and "0/7 [" in err
