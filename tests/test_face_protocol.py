"""make_face_protocol: identity-disjoint split, LFW-style .bin pairs and IJB-style templates on a generated
identity folder, read back by the project's own readers and by tools/eval_ijb.py's functions."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mhe_scale.data.face_bin import read_face_bin
from mhe_scale.data.face_dataset import RecordIOFaceDataset
from mhe_scale.data.face_protocol import (ProtocolError, _draw_impostors, gallery_probe, lfw_pairs, make_face_protocol, make_templates,
                                          template_pairs)
from mhe_scale.eval.align import AlignedFaces
from mhe_scale.eval.ijb import meta_paths, read_1n_csv, read_faces, read_landmarks, read_pairs

from conftest import load_tool

COUNTS = [2, 3, 5, 7, 9, 4, 6, 8, 3, 2, 10, 5, 4, 6, 7, 3, 9, 2, 5, 8, 4, 6, 3, 11, 2, 5, 7, 4, 1, 6]
"""Images per identity of the generated folder (30 identities, one with a single image)."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """images/id00 .. id29, COUNTS[i] distinct 24x24 PNGs each (distinct bytes: an image's file is found by its bytes)."""
    root = tmp_path_factory.mktemp("faces") / "images"
    rng = np.random.default_rng(7)
    for i, n in enumerate(COUNTS):
        (root / f"id{i:02d}").mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / f"id{i:02d}" / f"{j:03d}.png")
    (root / "notes.txt").write_text("not an identity")  # files at the root are ignored
    return root


@pytest.fixture(scope="module")
def protocol(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("protocol") / "p"
    make_face_protocol(folder, out, num_train=8, seed=3, folds=10, pairs_per_fold=50, template_size=2)
    return out


def by_bytes(folder: Path) -> dict[bytes, str]:
    return {p.read_bytes(): p.relative_to(folder).as_posix() for p in folder.glob("*/*.png")}


def test_split_is_identity_disjoint_and_training_recordio_holds_exactly_the_training_identities(folder, protocol):
    rec = json.loads((protocol / "protocol.json").read_text())
    train, verify = rec["train_identities"], rec["verification_identities"]
    assert len(train) == 8 and len(verify) == 22 and not set(train) & set(verify)
    assert sorted(train + verify) == [f"id{i:02d}" for i in range(30)]
    data = RecordIOFaceDataset(protocol / "train.rec", protocol / "train.idx")
    expected = [COUNTS[int(name[2:])] for name in train]  # label = position in the sorted training names
    assert np.bincount(data.labels, minlength=8).tolist() == expected
    assert rec["train"]["images"] == len(data) == sum(expected)
    image, label = data[len(data) - 1]
    assert label == 7 and tuple(image.shape) == (3, 24, 24)
    assert rec["verification"]["images"] == sum(COUNTS) - sum(expected)


def test_verification_bin_folds_are_balanced_identity_disjoint_and_as_large_as_the_identities_allow(folder, protocol):
    pairs = read_face_bin(protocol / "verification.bin")
    names = by_bytes(folder)
    files = [names[b] for b in pairs.images]  # every image of the .bin is a file of the folder, byte for byte
    ident = [f.split("/")[0] for f in files]
    verify = set(json.loads((protocol / "protocol.json").read_text())["verification_identities"])
    assert set(ident) <= verify
    same = pairs.issame.numpy()
    k = pairs.num_pairs // 20
    assert pairs.num_pairs == 20 * k and k >= 1
    fold_ids = []
    for f in range(10):
        rows = range(2 * k * f, 2 * k * (f + 1))
        assert same[list(rows)].tolist() == [True] * k + [False] * k  # k genuine then k impostor
        fold_pairs = [(files[2 * p], files[2 * p + 1]) for p in rows]
        assert len({tuple(sorted(p)) for p in fold_pairs}) == 2 * k  # no pair twice
        for (a, b), s in zip(fold_pairs, same[list(rows)]):
            assert a != b and (a.split("/")[0] == b.split("/")[0]) == s
        fold_ids.append({x.split("/")[0] for p in fold_pairs for x in p})
    for a, b in itertools.combinations(fold_ids, 2):
        assert not a & b  # no identity in two folds
    # pairs.tsv names the two files of every pair of the .bin, fold by fold
    tsv = [line.split("\t") for line in (protocol / "pairs.tsv").read_text().splitlines()[1:]]
    assert [(int(f), int(s), a, b.strip()) for f, s, a, b in tsv] == [
        (p // (2 * k), int(s), files[2 * p], files[2 * p + 1]) for p, s in enumerate(same)]


def test_pairs_per_fold_is_the_minimum_over_folds_of_what_each_fold_allows():
    owner = np.repeat(np.arange(4), [3, 2, 4, 2])  # 2 folds: the tool deals identities round-robin after a permutation
    for cap in (1, 2, 50):
        p = lfw_pairs(owner, folds=2, pairs_per_fold=cap, seed=0)
        folds = [sorted(set(owner[np.r_[p.first[p.fold == f], p.second[p.fold == f]]].tolist())) for f in range(2)]
        bound = []
        for ids in folds:
            n = [int((owner == i).sum()) for i in ids]
            genuine = sum(m * (m - 1) // 2 for m in n)
            impostor = sum(n[a] * n[b] for a, b in itertools.combinations(range(len(n)), 2))
            bound += [genuine, impostor]
        assert p.per_fold == min(cap, *bound)
        assert len(p.issame) == 4 * p.per_fold and p.issame.sum() == 2 * p.per_fold


def test_impostor_pairs_are_drawn_uniformly():
    owner = np.array([0, 0, 0, 1, 2, 2])  # 3 * 1 + 3 * 2 + 1 * 2 = 11 impostor pairs
    rng = np.random.default_rng(0)
    seen = Counter(tuple(_draw_impostors(owner, np.arange(3), 1, rng)[0].tolist()) for _ in range(22_000))
    expected = {(i, j) for i, j in itertools.combinations(range(6), 2) if owner[i] != owner[j]}
    assert set(seen) == expected
    # 2,000 draws each expected (binomial std 43): 6 % catches a draw weighted by the partners' counts (7 / 8 / 9)
    assert max(abs(v - 2000) for v in seen.values()) < 120


def test_templates_hold_several_images_and_pairs_galleries_probes_follow_the_rules():
    owner = np.repeat(np.arange(5), [9, 3, 1, 4, 8])
    t = make_templates(owner, template_size=4, seed=1)
    sizes = Counter(t.template.tolist())
    assert [sizes[i + 1] for i in range(len(t.subject))] == [5, 4, 3, 1, 4, 4, 4]  # 9 images -> 5 + 4
    assert t.subject.tolist() == [0, 0, 1, 2, 3, 4, 4]
    assert all(owner[t.template == i + 1].tolist() == [s] * sizes[i + 1] for i, s in enumerate(t.subject))
    pairs, label = template_pairs(t.subject, 10**6)
    assert len(label) == 21 and label.tolist() == [int(t.subject[a - 1] == t.subject[b - 1]) for a, b in pairs]
    capped, lab = template_pairs(t.subject, 5, seed=2)
    assert lab.sum() == 2 and len(lab) == 7 and {tuple(x) for x in capped} <= {tuple(x) for x in pairs}
    g1, g2, probes = gallery_probe(t.subject, seed=0)
    assert sorted(np.r_[g1, g2].tolist()) == [1, 3, 4, 5, 6] and probes.tolist() == [2, 7]
    gsub = [set(t.subject[g - 1].tolist()) for g in (g1, g2)]
    assert not gsub[0] & gsub[1] and len(gsub[0]) == 2 and len(gsub[1]) == 3


def test_ijb_layout_reads_with_eval_ijbs_readers_and_runs_through_the_tool(folder, protocol, tmp_path):
    paths = meta_paths(protocol, "IJBC")
    names, templates, medias = read_faces(paths["faces"])
    rec = json.loads((protocol / "protocol.json").read_text())
    verify = set(rec["verification_identities"])
    assert {n.split("/")[0] for n in names} == verify and len(set(medias.tolist())) == len(names)
    lm_names, landmarks, scores = read_landmarks(paths["landmarks"])
    assert lm_names == names and bool((scores == 1).all())
    faces = AlignedFaces(paths["images"], names, landmarks)  # the crops load and keep their pixels (identity warp)
    src = torch.from_numpy(np.array(Image.open(folder / names[0]).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
    assert (faces[0][:, :24, :24] - src).abs().max() < 0.02
    pairs, label = read_pairs(paths["pairs"])
    subj = {}
    for n, t in zip(names, templates.tolist()):
        subj.setdefault(t, n.split("/")[0])
    assert len(label) == len(subj) * (len(subj) - 1) // 2 == rec["ijb"]["template_pairs"]
    assert label.tolist() == [subj[a] == subj[b] for a, b in pairs.tolist()]
    (g1, s1), (g2, s2), (pr, sp) = (read_1n_csv(paths[k]) for k in ("G1", "G2", "probes"))
    assert not set(s1.tolist()) & set(s2.tolist()) and set(sp.tolist()) <= set(s1.tolist()) | set(s2.tolist())
    assert sorted(np.r_[g1, g2, pr].tolist()) == sorted(subj)
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((len(names), 4)).astype(np.float32))
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("eval_ijb").main(["--root", str(protocol), "--features", str(feats), "--out",
                                           str(tmp_path / "ijb")]) == 0
    out = json.loads((tmp_path / "ijb" / "results.json").read_text())
    assert out["templates"] == rec["ijb"]["templates"] and "mean" in out["identification"]


def test_same_seed_same_files_other_seed_other_split(folder, protocol, tmp_path):
    make_face_protocol(folder, tmp_path / "again", num_train=8, seed=3, folds=10, pairs_per_fold=50, template_size=2)
    for name in ("protocol.json", "pairs.tsv", "train.lst", "IJBC/meta/ijbc_template_pair_label.txt"):
        assert (tmp_path / "again" / name).read_text().replace(str(tmp_path / "again"), "") == \
               (protocol / name).read_text().replace(str(protocol), "")
    other = make_face_protocol(folder, tmp_path / "other", train_fraction=0.25, seed=4, folds=10)
    assert other["train"]["identities"] == 8
    assert other["train_identities"] != json.loads((protocol / "protocol.json").read_text())["train_identities"]


@pytest.mark.parametrize("args, message", [
    (["{missing}", "{out}", "--train-identities", "3"], "does not exist"),
    (["{folder}", "{folder}", "--train-identities", "3"], "exists; choose a new output folder"),
    (["{folder}", "{out}", "--train-identities", "30"], "need 1 <= num_train < 30"),
    (["{folder}", "{out}", "--train-identities", "15"], "15 verification identities cannot fill 10"),
    (["{folder}", "{out}", "--train-fraction", "1.5"], "strictly between 0 and 1"),
])
def test_cli_errors_are_one_line_naming_the_folder_and_write_nothing(folder, tmp_path, capsys, args, message):
    fill = {"missing": str(tmp_path / "nope"), "out": str(tmp_path / "out"), "folder": str(folder)}
    assert load_tool("make_face_protocol").main([a.format(**fill) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_face_protocol: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_white_space_in_a_name_is_refused_naming_the_file(tmp_path):
    for ident in ("a b", "c", "d"):
        (tmp_path / "img" / ident).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / ident / "0.png")
    with pytest.raises(ProtocolError, match=r"img/a b/0.png: white space"):
        make_face_protocol(tmp_path / "img", tmp_path / "out", num_train=1, folds=1)


def test_celeba249_protocol_counts(shared_data, tmp_path):
    images = shared_data / "celeba-249" / "images"
    if not images.is_dir():
        pytest.skip(f"{images} not present")
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("make_face_protocol").main([str(images), str(tmp_path / "p"), "--train-identities", "200"]) == 0
    rec = json.loads((tmp_path / "p" / "protocol.json").read_text())
    total = len((shared_data / "celeba-249" / "identities.tsv").read_text().splitlines()) - 1
    assert rec["train"]["identities"] == 200 and rec["verification"]["identities"] == 49
    assert rec["train"]["images"] + rec["verification"]["images"] == total
    assert rec["verification"]["pairs"] == 20 * rec["verification"]["genuine_per_fold"]
