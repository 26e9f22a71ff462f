"""IJB-B/C evaluation: a miniature IJB-C in the real layout, library units against naive loops, the CLI end to end."""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mhe_scale.eval.align import (ARCFACE_TEMPLATE, AlignedFaces, apply_transform, similarity_transform, warp_pil,
                                  warp_tensor)
from mhe_scale.eval.ijb import (FARS, identification, read_1n_csv, read_faces, read_landmarks, read_pairs, roc,
                                score_pairs, tar_at_far, template_features)

from conftest import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "eval_ijb.py"
TINY_MODEL = ("import torch.nn as nn\n\n"
              "def build(pool: int = 8):\n    return nn.Sequential(nn.AvgPool2d(pool), nn.Flatten())\n")


def canonical_face(x: np.ndarray, y: np.ndarray, subject: int) -> np.ndarray:
    """A smooth 'face' c(x, y) in aligned 112x112 coordinates, different per subject -> [..., 3] in [0, 255]."""
    ph = 0.7 * subject
    return np.stack([128 + 60 * np.sin(x / 9 + ph) + 40 * np.cos(y / 13),
                     128 + 70 * np.cos(y / 7 - ph) + 20 * np.sin(x / 11),
                     110 + 0.6 * x + 0.5 * y + 20 * np.sin((x + y) / 17 + 2 * ph)], -1)


def similarity(scale: float, angle: float, shift: np.ndarray) -> np.ndarray:
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def make_mini_ijbc(root: Path, seed: int = 0) -> dict:
    """8 subjects, 2-3 templates each, 1-3 media per template (one media shared by two templates),
    1-2 faces per media; loose crops are the subject's canonical face seen through a random similarity."""
    rng = np.random.default_rng(seed)
    meta, crops = root / "IJBC" / "meta", root / "IJBC" / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir()
    faces, tmpl_subject, shared = [], {}, None
    tid, mid = 1000, 50
    for subject in range(8):
        for k in range(int(rng.integers(2, 4))):
            tid += int(rng.integers(1, 9))  # non-contiguous template ids
            tmpl_subject[tid] = subject
            for m in range(int(rng.integers(1, 4))):
                mid += 1
                media = shared if (k == 1 and m == 0 and shared is not None) else mid
                for _ in range(int(rng.integers(1, 3))):
                    faces.append((f"{len(faces) + 1}.jpg", tid, media, subject))
            shared = mid if k == 0 else shared  # the second template reuses the first one's last media
    lm_lines, face_scores = [], rng.uniform(0.5, 1.0, len(faces))
    for (name, _, _, subject), score in zip(faces, face_scores):
        h, w = (int(v) for v in rng.integers(80, 101, 2))
        s, a = rng.uniform(0.6, 0.85), rng.uniform(-0.3, 0.3)
        m = similarity(s, a, np.zeros(2))  # canonical -> crop
        m[:, 2] = np.array([w / 2, h / 2]) - m[:, :2] @ ARCFACE_TEMPLATE.numpy().mean(0) + rng.uniform(-4, 4, 2)
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        cx, cy = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
        img = canonical_face(cx, cy, subject) + rng.normal(0, 2, (h, w, 3))
        Image.fromarray(img.clip(0, 255).round().astype(np.uint8)).save(crops / name, quality=95)
        lm = ARCFACE_TEMPLATE.numpy() @ m[:, :2].T + m[:, 2]
        lm_lines.append(name + " " + " ".join(f"{c:.4f}" for c in lm.reshape(-1)) + f" {score:.4f}")
    (meta / "ijbc_face_tid_mid.txt").write_text("".join(f"{n} {t} {md}\n" for n, t, md, _ in faces))
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lm_lines) + "\n")
    tids = sorted(tmpl_subject)
    pairs = [(a, b, int(tmpl_subject[a] == tmpl_subject[b])) for i, a in enumerate(tids) for b in tids[i + 1:]]
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    (meta / "ijbc_template_pair_label.txt").write_text("".join(f"{a} {b} {l}\n" for a, b, l in pairs))
    first = {}
    for t in tids:
        first.setdefault(tmpl_subject[t], t)
    groups = {"G1": [first[s] for s in range(4)], "G2": [first[s] for s in range(4, 8)],
              "probe_mixed": [t for t in tids if t not in first.values()]}
    for key, members in groups.items():
        rows = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,SIGHTING_ID,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT"]
        rows += [f"{t},{tmpl_subject[t]},img/{n},{md},0,0,50,50" for n, t, md, _ in faces if t in members]
        name = f"ijbc_1N_{'gallery_' + key if key != 'probe_mixed' else key}.csv"
        (meta / name).write_text("\n".join(rows) + "\n")
    feats = rng.normal(0, 1, (8, 16))[[f[3] for f in faces]] + rng.normal(0, 0.9, (len(faces), 16))
    np.save(root / "feats.npy", feats.astype(np.float32))
    return {"faces": faces, "subject": tmpl_subject, "pairs": pairs, "groups": groups, "scores": face_scores}


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ijb")
    return root, make_mini_ijbc(root)


# ---------------------------------------------------------------- naive references (loops on purpose)

def naive_templates(feats, templates, medias, scores=None, keep_norm=False) -> dict[int, np.ndarray]:
    media: dict[tuple[int, int], list[np.ndarray]] = {}
    for f, t, m, s in zip(feats, templates, medias, scores if scores is not None else [1.0] * len(feats)):
        f = np.asarray(f, np.float64)
        f = f if keep_norm else f / np.linalg.norm(f)
        media.setdefault((int(t), int(m)), []).append(f * float(s))
    out: dict[int, np.ndarray] = {}
    for (t, _), fs in media.items():
        out[t] = out.get(t, 0) + np.mean(fs, 0)
    return {t: v / np.linalg.norm(v) for t, v in out.items()}


def naive_tar(scores, labels, far_target, rule) -> float:
    """Threshold loop: every distinct score (and +inf) as a threshold, accept score >= t.

    at_most: the best TAR with FAR <= target; nearest (the published IJB rule): among the
    thresholds whose FAR is closest to the target, the best TAR."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    best, best_gap = 0.0, math.inf
    for t in [math.inf] + sorted(set(scores.tolist()), reverse=True):
        far = np.sum(scores[~labels] >= t) / np.sum(~labels)
        tar = np.sum(scores[labels] >= t) / np.sum(labels)
        if rule == "at_most" and far <= far_target:
            best = max(best, tar)
        if rule == "nearest" and abs(far - far_target) < best_gap:
            best, best_gap = tar, abs(far - far_target)
        elif rule == "nearest" and abs(far - far_target) == best_gap:
            best = max(best, tar)
    return best


def naive_identification(sim, probe_subj, gal_subj, ranks, fpirs) -> dict[str, float]:
    ranks_of, mated_score, nonmated_top = [], [], []
    for p in range(sim.shape[0]):
        best: dict[int, float] = {}
        for g in range(sim.shape[1]):
            best[int(gal_subj[g])] = max(best.get(int(gal_subj[g]), -math.inf), float(sim[p, g]))
        s = int(probe_subj[p])
        if s in best:
            r = sum(1 for v in best.values() if v >= best[s])
            ranks_of.append(r)
            mated_score.append(best[s] if r == 1 else -math.inf)
        else:
            nonmated_top.append(max(best.values()))
    out = {f"rank{k}": float(np.mean([r <= k for r in ranks_of])) for k in ranks}
    for f in fpirs:
        out[f"TPIR@FPIR={f:g}"] = max(
            float(np.mean([m >= t for m in mated_score]))
            for t in [math.inf] + sorted(set(mated_score + nonmated_top))
            if np.mean([n >= t for n in nonmated_top]) <= f)
    return out


# ---------------------------------------------------------------- alignment

def test_similarity_recovers_exact_transform_and_matches_linear_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    angle, scale = torch.rand(16, generator=g) * 6 - 3, torch.rand(16, generator=g) * 3 + 0.2
    shift = torch.randn(16, 2, generator=g, dtype=torch.float64) * 40
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -2)
    fwd = torch.cat([scale[:, None, None] * rot.double(), shift.unsqueeze(-1)], -1)  # template -> image
    lm = apply_transform(fwd, ARCFACE_TEMPLATE.expand(16, 5, 2))
    m = similarity_transform(lm)
    assert (apply_transform(m, lm) - ARCFACE_TEMPLATE).abs().max() < 1e-9
    noisy = lm + torch.randn(lm.shape, generator=g, dtype=torch.float64) * 3
    noisy[8:, :, 0] *= -1  # mirrored faces: the best similarity must still not reflect
    m = similarity_transform(noisy)
    for k in range(16):  # x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty)
        x, y = noisy[k, :, 0].numpy(), noisy[k, :, 1].numpy()
        one, zero = np.ones(5), np.zeros(5)
        a_mat = np.vstack([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(a_mat, ARCFACE_TEMPLATE.numpy().T.reshape(-1), rcond=None)
        np.testing.assert_allclose(m[k].numpy(), [[a, -b, tx], [b, a, ty]], atol=1e-9)
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(torch.ones(5, 2))


def test_pillow_and_grid_sample_warps_agree_inside_the_image() -> None:
    h, w = 90, 80
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    img = canonical_face(u, v, 3).clip(0, 255).round()
    m = torch.from_numpy(similarity(1.4, 0.25, np.array([-10.0, 3.0])))
    a = np.asarray(warp_pil(Image.fromarray(img.astype(np.uint8)), m), np.float64)
    b = warp_tensor(torch.from_numpy(img).permute(2, 0, 1)[None], m[None])[0].permute(1, 2, 0).numpy()
    inv = np.linalg.inv(np.vstack([m.numpy(), [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0:112, 0:112]
    sx, sy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    inside = (sx >= 1) & (sx <= w - 2) & (sy >= 1) & (sy <= h - 2)
    assert inside.mean() > 0.5
    assert np.abs(a - b)[inside].max() <= 1.01  # Pillow rounds to uint8
    assert (a[~inside & ((sx < -1) | (sy < -1) | (sx > w) | (sy > h))] == 0).all()


def test_aligned_crops_recover_the_canonical_face(mini) -> None:
    root, info = mini
    names, lm, _ = read_landmarks(root / "IJBC/meta/ijbc_name_5pts_score.txt")
    m = similarity_transform(lm)
    assert (apply_transform(m, lm.double()) - ARCFACE_TEMPLATE).abs().max() < 1e-3  # 4-decimal landmarks
    faces = AlignedFaces(root / "IJBC/loose_crop", names, lm)
    bgr_faces = AlignedFaces(root / "IJBC/loose_crop", names, lm, channels="bgr")
    with pytest.raises(ValueError, match="channels='gbr'"):
        AlignedFaces(root / "IJBC/loose_crop", names, lm, channels="gbr")
    ys, xs = np.mgrid[0:112, 0:112].astype(np.float64)
    for i in range(0, len(names), 7):
        want = canonical_face(xs, ys, info["faces"][i][3]).clip(0, 255) / 127.5 - 1
        got = faces[i].permute(1, 2, 0).numpy()
        with Image.open(root / "IJBC/loose_crop" / names[i]) as im:
            w, h = im.size
        inv = torch.linalg.inv(torch.cat([m[i], torch.tensor([[0.0, 0, 1]], dtype=torch.float64)]))[:2].numpy()
        sx, sy = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2], inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
        inside = (sx >= 1) & (sx <= w - 2) & (sy >= 1) & (sy <= h - 2)
        err = np.abs(got - want)[inside]
        assert err.mean() < 0.03 and inside.mean() > 0.6, (i, err.mean())
        bgr = bgr_faces[i].permute(1, 2, 0).numpy()  # channel 0 is blue: the third function of the face
        assert np.abs(bgr - want[..., ::-1])[inside].mean() < 0.03 and np.abs(bgr - want)[inside].mean() > 0.1


# ---------------------------------------------------------------- readers

def test_readers_parse_the_layout(mini) -> None:
    root, info = mini
    meta = root / "IJBC/meta"
    names, t, m = read_faces(meta / "ijbc_face_tid_mid.txt")
    assert names == [f[0] for f in info["faces"]] and t.tolist() == [f[1] for f in info["faces"]]
    assert m.tolist() == [f[2] for f in info["faces"]]
    pairs, labels = read_pairs(meta / "ijbc_template_pair_label.txt")
    assert pairs.tolist() == [[a, b] for a, b, _ in info["pairs"]]
    assert labels.tolist() == [bool(p[2]) for p in info["pairs"]]
    tids, subj = read_1n_csv(meta / "ijbc_1N_gallery_G1.csv")
    assert tids.tolist() == sorted(info["groups"]["G1"])
    assert subj.tolist() == [info["subject"][x] for x in tids.tolist()]


@pytest.mark.parametrize("name, text, reader, line", [
    ("ijbc_face_tid_mid.txt", "1.jpg 1 2\n2.jpg 1\n", read_faces, 2),
    ("ijbc_face_tid_mid.txt", "1.jpg 1 2\n\n2.jpg 1 x\n", read_faces, 3),
    ("ijbc_face_tid_mid.txt", "1.jpg 1 2\n2.jpg 1 2.5\n", read_faces, 2),
    ("ijbc_template_pair_label.txt", "1 2 1\n1 3 0\n2 3\n", read_pairs, 3),
    ("ijbc_template_pair_label.txt", "1 2 1\n1 y 0\n", read_pairs, 2),
    ("ijbc_template_pair_label.txt", "1 2 1\n1 3 2\n", read_pairs, 2),
    ("ijbc_name_5pts_score.txt", "1.jpg" + " 1" * 11 + "\n2.jpg" + " 1" * 10 + "\n", read_landmarks, 2),
    ("ijbc_name_5pts_score.txt", "1.jpg" + " 1" * 11 + "\n2.jpg" + " 1" * 10 + " z\n", read_landmarks, 2),
    ("ijbc_1N_gallery_G1.csv", "TEMPLATE_ID,SUBJECT_ID,FILENAME\n1,5,a.jpg\n2,q,b.jpg\n", read_1n_csv, 3),
])
def test_malformed_metadata_names_file_and_line(tmp_path, name, text, reader, line) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name}:{line}:"):
        reader(path)


def test_1n_csv_rejects_missing_columns_and_two_subjects(tmp_path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("TEMPLATE,SUBJECT_ID\n1,2\n")
    with pytest.raises(ValueError, match=r"g.csv:1: header"):
        read_1n_csv(path)
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n1,2\n1,3\n")
    with pytest.raises(ValueError, match="template 1 has rows with two SUBJECT_IDs"):
        read_1n_csv(path)


# ---------------------------------------------------------------- pooling, scoring, metrics

@pytest.mark.parametrize("weighted, keep_norm", [(False, False), (True, False), (True, True)])
def test_template_pooling_matches_loop(weighted, keep_norm) -> None:
    g = torch.Generator().manual_seed(1)
    n = 200
    norms = torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.5
    feats = torch.randn(n, 8, generator=g, dtype=torch.float64) * norms
    templates = torch.randint(0, 30, (n,), generator=g) * 7 + 3
    medias = torch.randint(0, 25, (n,), generator=g)  # media ids shared across templates
    scores = torch.rand(n, generator=g, dtype=torch.float64) if weighted else None
    tids, pooled = template_features(feats, templates, medias, scores, keep_norm)
    want = naive_templates(feats.numpy(), templates.numpy(), medias.numpy(),
                           None if scores is None else scores.numpy(), keep_norm)
    assert tids.tolist() == sorted(want)
    np.testing.assert_allclose(pooled.numpy(), np.stack([want[t] for t in sorted(want)]), atol=1e-12)


@pytest.mark.parametrize("presort", [True, False])
def test_score_pairs_matches_direct_dot_products(presort) -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(50, 12, generator=g)
    i, j = torch.randint(0, 50, (1003,), generator=g), torch.randint(0, 50, (1003,), generator=g)
    got = score_pairs(feats, i, j, batch_size=64, presort=presort)
    torch.testing.assert_close(got, (feats[i] * feats[j]).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["at_most", "nearest"])
@pytest.mark.parametrize("ties", [True, False])
def test_tar_at_far_matches_threshold_loop(rule, ties) -> None:
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(3000) >= 2000  # 2000 negatives: most targets below are exact ROC points
    scores = torch.randn(3000, generator=g, dtype=torch.float64) + 1.5 * labels
    scores = (scores * 8).round() / 8 if ties else scores
    far, tar, thr = roc(scores, labels)
    assert far[0] == 0 and tar[-1] == 1 and far[-1] == 1 and bool((thr[1:] < thr[:-1]).all())
    targets = (1e-4, 1e-3, 0.005, 0.01, 0.1, 0.3, 0.5)
    got = tar_at_far(far, tar, targets, rule)
    want = [naive_tar(scores.numpy(), labels.numpy(), f, rule) for f in targets]
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)


@pytest.mark.parametrize("rule", ["at_most", "nearest"])
def test_roc_matches_sklearn(rule) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(4)
    labels = torch.rand(5000, generator=g) < 0.2
    scores = (torch.randn(5000, generator=g) + 2 * labels).mul(16).round() / 16
    far, tar, thr = roc(scores, labels)
    fpr, tpr, _ = metrics.roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    np.testing.assert_allclose(far.numpy(), fpr)
    np.testing.assert_allclose(tar.numpy(), tpr)
    fpr, tpr, _ = metrics.roc_curve(labels.numpy(), scores.numpy())  # default: intermediate points dropped
    # the published read-outs: at_most = best TPR with FPR <= target; nearest = insightface's IJB
    # script (flip the ROC, then the first point of minimal |FPR - target|: the largest TPR at that FPR)
    flipped_fpr, flipped_tpr = np.flipud(fpr), np.flipud(tpr)
    want = [tpr[fpr <= f].max() if rule == "at_most" else flipped_tpr[np.argmin(np.abs(flipped_fpr - f))]
            for f in FARS]
    np.testing.assert_allclose(tar_at_far(far, tar, FARS, rule).numpy(), want)


def test_nearest_rule_takes_the_highest_tar_at_the_nearest_far() -> None:
    """Known answer: 10 negatives, 4 positives above them all -> at FAR 0 the ROC holds TAR 0, .25, .5,
    .75, 1; the published rule reads TAR 1 at FAR 1e-4 (the lowest-TAR tie-break read 0)."""
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0] + [0.1 * i for i in range(10)], dtype=torch.float64)
    labels = torch.arange(14) < 4
    far, tar, _ = roc(scores, labels)
    assert tar_at_far(far, tar, (1e-4, 0.1, 0.14), "nearest").tolist() == [1.0, 1.0, 1.0]


def test_identification_matches_loop() -> None:
    g = torch.Generator().manual_seed(5)
    gal_subj = torch.tensor([3, 7, 7, 10, 12, 15, 20, 22])  # subject 7 has two gallery templates
    probe_subj = torch.randint(0, 25, (300,), generator=g)
    sim = torch.randn(300, 8, generator=g, dtype=torch.float64)
    sim += 1.5 * (probe_subj.unsqueeze(1) == gal_subj)
    sim = (sim * 4).round() / 4  # ties
    got = identification(sim, probe_subj, gal_subj, (1, 2, 5), (0.01, 0.1, 0.3))
    want = naive_identification(sim.numpy(), probe_subj.numpy(), gal_subj.numpy(), (1, 2, 5), (0.01, 0.1, 0.3))
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert got["mated"] + got["nonmated"] == 300


# ---------------------------------------------------------------- the CLI end to end

def run_tool(*args: str, subprocess_run: bool = False) -> tuple[int, str]:
    """Run tools/eval_ijb.py -> (exit code, stderr); in this process unless subprocess_run (imports cost seconds)."""
    if subprocess_run:
        r = subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=300)
        return r.returncode, r.stderr
    tool = load_tool("eval_ijb")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = tool.main(list(args))
    return code, err.getvalue()


@pytest.mark.parametrize("published", [True, False])
def test_cli_with_precomputed_features(mini, tmp_path, published) -> None:
    """Default = the published protocol (face norms kept, detector-score weights, nearest-FAR read-out);
    the other behaviour is --no-face-score --no-keep-norm --far-rule at_most."""
    root, info = mini
    out = tmp_path / "out"
    other = ["--no-face-score", "--no-keep-norm", "--far-rule", "at_most"]
    code, stderr = run_tool("--root", str(root), "--features", str(root / "feats.npy"), "--out", str(out),
                            *([] if published else other), subprocess_run=published)
    assert code == 0, stderr
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"] == {"face_score": published, "keep_norm": published, "flip": True,
                               "far_rule": "nearest" if published else "at_most"}
    assert (out / "roc.png").stat().st_size > 1000 and (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    faces = info["faces"]
    tmpl = naive_templates(np.load(root / "feats.npy"), [f[1] for f in faces], [f[2] for f in faces],
                           info["scores"].round(4) if published else None, keep_norm=published)
    pair_scores = np.array([tmpl[a] @ tmpl[b] for a, b, _ in info["pairs"]])
    np.testing.assert_allclose(np.load(out / "scores.npy"), pair_scores, atol=1e-5)
    labels = np.array([p[2] for p in info["pairs"]], bool)
    rule = "nearest" if published else "at_most"
    for f in FARS:  # the tool's scores, so float32 rounding cannot flip a tie
        assert res["verification"][f"TAR@FAR={f:g}"] == naive_tar(np.load(out / "scores.npy"), labels, f, rule)
    probe = info["groups"]["probe_mixed"]
    for gallery in ("G1", "G2"):
        gal = sorted(info["groups"][gallery])
        sim = np.array([[tmpl[p] @ tmpl[q] for q in gal] for p in sorted(probe)])
        want = naive_identification(sim, [info["subject"][p] for p in sorted(probe)],
                                    [info["subject"][q] for q in gal], (1, 5, 10), (0.01, 0.1))
        for k, v in want.items():
            assert res["identification"][gallery][k] == pytest.approx(v, abs=1e-9), (gallery, k)


def test_cli_with_tiny_model_and_saved_features(mini, tmp_path) -> None:
    root, _ = mini
    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    out, feats = tmp_path / "model_out", tmp_path / "extracted.npy"
    code, stderr = run_tool("--root", str(root), "--model-module", f"{tmp_path / 'tiny.py'}:build", "--model-kwargs",
                            '{"pool": 16}', "--out", str(out), "--save-features", str(feats), "--batch-size", "5")
    assert code == 0, stderr
    names, lm, _ = read_landmarks(root / "IJBC/meta/ijbc_name_5pts_score.txt")
    x = torch.stack([AlignedFaces(root / "IJBC/loose_crop", names, lm)[i] for i in range(len(names))])
    pool = torch.nn.AvgPool2d(16)
    want = (pool(x) + pool(x.flip(3))).flatten(1)  # feature = downsampled pixels of face + mirror
    np.testing.assert_allclose(np.load(feats), want.numpy(), atol=1e-5)
    res = json.loads((out / "results.json").read_text())
    assert res["verification"]["AUC"] > 0.9  # subjects differ by their canonical faces
    assert res["identification"]["G1"]["rank1"] >= 0.5 and (out / "roc.png").exists()


def test_cli_reports_bad_metadata_with_file_and_line(mini, tmp_path) -> None:
    root, _ = mini
    bad = tmp_path / "bad"
    (bad / "IJBC").mkdir(parents=True)
    (bad / "IJBC" / "meta").symlink_to(root / "IJBC" / "meta", target_is_directory=True)
    feats = tmp_path / "short.npy"
    np.save(feats, np.zeros((3, 4), np.float32))
    code, stderr = run_tool("--root", str(bad), "--features", str(feats), "--out", str(tmp_path / "o"))
    assert code == 2 and "short.npy: features must be" in stderr
    np.save(feats, np.array([{"a": 1}] * 3, dtype=object), allow_pickle=True)  # a pickled array: refused, named
    code, stderr = run_tool("--root", str(root), "--features", str(feats), "--out", str(tmp_path / "o"))
    assert code == 2 and "--features" in stderr and "short.npy: not a numeric .npy array" in stderr
    feats.write_text("not numpy")
    code, stderr = run_tool("--root", str(root), "--features", str(feats), "--out", str(tmp_path / "o"))
    assert code == 2 and "short.npy: not a numeric .npy array" in stderr
    code, stderr = run_tool("--root", str(root), "--model-module", "x.py:build", "--model-kwargs", "{pool: 16}",
                            "--out", str(tmp_path / "o"))
    assert code == 2 and "--model-kwargs '{pool: 16}': not JSON" in stderr
    copy = tmp_path / "copy" / "IJBC" / "meta"
    copy.mkdir(parents=True)
    for p in (root / "IJBC" / "meta").iterdir():
        copy.joinpath(p.name).write_text(p.read_text())
    lines = copy.joinpath("ijbc_template_pair_label.txt").read_text().splitlines()
    lines[4] = "99999 " + lines[4].split()[1] + " 1"
    copy.joinpath("ijbc_template_pair_label.txt").write_text("\n".join(lines) + "\n")
    code, stderr = run_tool("--root", str(tmp_path / "copy"), "--features", str(root / "feats.npy"),
                            "--out", str(tmp_path / "o"), "--tasks", "verify")
    assert code == 2 and "ijbc_template_pair_label.txt:5: template [99999" in stderr


def test_cli_prints_n_a_for_rates_its_negatives_cannot_reach(mini, tmp_path) -> None:
    """A FAR (FPIR) below 1 / impostor pairs (non-mated probes) prints 'n/a', as eval_verification.py
    does, not the ROC's TAR at FAR 0 ('0.00' before); reachable ones print results.json's value."""
    root, info = mini
    out = tmp_path / "out"
    tool = load_tool("eval_ijb")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert tool.main(["--root", str(root), "--features", str(root / "feats.npy"), "--out", str(out)]) == 0
    lines = {line.split(": ")[0]: line for line in printed.getvalue().splitlines()}
    res = json.loads((out / "results.json").read_text())
    impostors = sum(1 for _, _, same in info["pairs"] if not same)
    assert res["verification"]["impostors"] == impostors
    cells = dict(c.split(" ", 1) for c in lines["verification 1:1"].split(": ", 1)[1].split(", "))
    unreachable = 0
    for f in FARS:
        cell = cells[f"TAR@FAR={f:g}"]
        if impostors >= round(1 / f):
            assert cell == f"{100 * res['verification'][f'TAR@FAR={f:g}']:.2f}", f
        else:
            unreachable += 1
            assert cell == f"n/a (needs >= {round(1 / f)} impostor pairs; has {impostors})", f
    assert 0 < unreachable < len(FARS)  # the miniature exercises both cases
    g1 = res["identification"]["G1"]
    cells = dict(c.split(" ", 1) for c in lines["identification G1"].split(": ", 1)[1].split(", "))
    for f in (0.01, 0.1):
        want = f"{100 * g1[f'TPIR@FPIR={f:g}']:.2f}" if g1["nonmated"] >= round(1 / f) else "n/a"
        assert cells[f"TPIR@FPIR={f:g}"].startswith(want), f
