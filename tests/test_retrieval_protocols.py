"""Each retrieval protocol on a miniature written in that dataset's real file layout, scored by
evaluate() and by a naive scorer (PIL + Python loops, ground truth re-derived here from the file
names / the gnd file), which must agree."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from mhe_scale.eval.retrieval import ImageRef, copydays, evaluate, holidays, load_image, revisited, ukbench
from tests.test_retrieval_metrics import naive_ap_pk

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def embed(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> mean colour + mean of the top half (a little spatial layout) [B, 6]."""
    return torch.cat([x.mean(dim=(2, 3)), x[:, :, : x.shape[2] // 2].mean(dim=(2, 3))], dim=1)


def naive_vec(path, rotation=0, box=None):
    im = Image.open(path).convert("RGB")
    if rotation:
        im = im.rotate(-rotation, expand=True)
    a = np.asarray(im).astype(np.float64) / 255.0
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        a = a[y0:y1, x0:x1]
    a = (a - 0.5) / 0.25
    v = np.concatenate([a.mean(axis=(0, 1)), a[: a.shape[0] // 2].mean(axis=(0, 1))])
    return v / np.linalg.norm(v)


def naive_ap(qv, dbv, pos, junk):
    """(AP of the database sorted by inner product with qv, that order): the naive scorer of
    test_retrieval_metrics on a full sort."""
    order = sorted(range(len(dbv)), key=lambda i: -float(qv @ dbv[i]))
    return naive_ap_pk(order, pos, junk, [])[0], order


def write(path, colour, rng, size=(16, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    shift = rng.normal(0, 45, 3)  # per image: rankings are not trivially perfect
    pixels = np.clip(np.array(colour)[None, None] + shift + rng.normal(0, 60, (*size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)


def colour(g):
    return [(70 * g) % 256, (255 - 50 * g) % 256, (40 + 90 * g) % 256]


def test_holidays_and_its_rotated_variant(tmp_path):
    rng = np.random.default_rng(0)
    names = ["100000", "100001", "100002", "100100", "100101", "100200", "100201", "100202", "100203"]
    for n in names:
        write(tmp_path / "jpg" / f"{n}.jpg", colour(int(n[2:4])), rng)
    # MultiGrain's table format (a flow mapping, trailing comma included)
    (tmp_path / "rot.yaml").write_text('{\n"100001.jpg": 90,\n"100201.jpg": 270,\n}')
    for table in (None, tmp_path / "rot.yaml"):
        rset = holidays(tmp_path, table)
        assert [(r.path[-10:], r.rotation) for r in rset.database if r.rotation] == \
            ([] if table is None else [("100001.jpg", 90), ("100201.jpg", 270)])
        got = evaluate(rset, embed, mean=MEAN, std=STD)
        turn = {"100001.jpg": 90, "100201.jpg": 270} if table else {}
        vecs = {n: naive_vec(tmp_path / "jpg" / f"{n}.jpg", turn.get(f"{n}.jpg", 0)) for n in names}
        dbv = [vecs[n] for n in names]
        aps = []
        for q in [n for n in names if n.endswith("00")]:
            pos = {i for i, n in enumerate(names) if n[:4] == q[:4] and n != q}
            aps.append(naive_ap(vecs[q], dbv, pos, {names.index(q)})[0])
        assert got["mAP"] == pytest.approx(100 * sum(aps) / len(aps), abs=1e-6), table
        assert 0 < got["mAP"] < 100


def test_rotation_turns_clockwise(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:3, :3] = 255  # bright top-left corner
    Image.fromarray(a).save(tmp_path / "x.png")
    out = load_image(ImageRef(str(tmp_path / "x.png"), 90))
    assert out.shape == (20, 10, 3) and out[:3, -3:].min() == 255  # now top-right
    assert load_image(ImageRef(str(tmp_path / "x.png")), largest_side=40).shape == (20, 40, 3)


def test_ukbench_ns_score(tmp_path):
    rng = np.random.default_rng(1)
    files = [tmp_path / f"ukbench{i:05d}.jpg" for i in range(12)]
    for i, f in enumerate(files):
        write(f, colour(i // 4), rng)
    got = evaluate(ukbench(tmp_path), embed, mean=MEAN, std=STD)
    vecs = [naive_vec(f) for f in files]
    total = 0
    for i in range(12):
        _, order = naive_ap(vecs[i], vecs, {i}, set())
        total += sum(1 for j in order[:4] if j // 4 == i // 4)
    assert got["N-S"] == pytest.approx(total / 12)


def test_revisited_oxford_settings_from_a_json_gnd(tmp_path):
    rng = np.random.default_rng(2)
    imlist = [f"all_souls_{i:06d}" for i in range(10)]
    for i, n in enumerate(imlist):
        write(tmp_path / "jpg" / f"{n}.jpg", colour(i % 3), rng)
    qimlist = ["all_souls_q1", "radcliffe_q2"]
    for g, n in enumerate(qimlist):
        write(tmp_path / "jpg" / f"{n}.jpg", colour(g), rng, size=(20, 20))
    gnd = [{"bbx": [2.0, 3.0, 15.0, 18.0], "easy": [0, 3], "hard": [6], "junk": [9]},
           {"bbx": [0.0, 0.0, 12.0, 10.0], "easy": [1], "hard": [4, 7], "junk": [2]}]
    (tmp_path / "gnd_roxford5k.json").write_text(json.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    got = evaluate(revisited(tmp_path, tmp_path / "gnd_roxford5k.json"), embed, mean=MEAN, std=STD)
    dbv = [naive_vec(tmp_path / "jpg" / f"{n}.jpg") for n in imlist]
    for setting in ("easy", "medium", "hard"):
        aps = []
        for n, g in zip(qimlist, gnd):
            pos = {"easy": g["easy"], "medium": g["easy"] + g["hard"], "hard": g["hard"]}[setting]
            junk = {"easy": g["junk"] + g["hard"], "medium": g["junk"], "hard": g["junk"] + g["easy"]}[setting]
            aps.append(naive_ap(naive_vec(tmp_path / "jpg" / f"{n}.jpg", box=g["bbx"]), dbv, set(pos), set(junk))[0])
        assert got[f"{setting}/mAP"] == pytest.approx(100 * sum(aps) / 2, abs=1e-6), setting


def test_pickled_ground_truth_is_refused(tmp_path):
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="pickles are never loaded"):
        revisited(tmp_path, tmp_path / "gnd_roxford5k.pkl")


def test_copydays_with_distractors(tmp_path):
    rng = np.random.default_rng(3)
    for g in range(3):
        gid = 2000 + g
        write(tmp_path / "cd" / f"{gid}00.jpg", colour(g), rng)
        write(tmp_path / "cd" / "crops" / "50" / f"{gid}00.jpg", colour(g), rng, size=(10, 14))
        write(tmp_path / "cd" / "jpegqual" / "30" / f"{gid}00.jpg", colour(g), rng)
        write(tmp_path / "cd" / "strong" / f"{gid}01.jpg", colour(g + 1), rng)
    for i in range(4):
        write(tmp_path / "distract" / "a" / f"{i}.jpg", colour(i + 5), rng)
    rset = copydays(tmp_path / "cd", tmp_path / "distract", max_distractors=3)
    assert len(rset.database) == 6 and len(rset.queries) == 9
    got = evaluate(rset, embed, mean=MEAN, std=STD)
    db_files = sorted((tmp_path / "cd").glob("*.jpg")) + sorted((tmp_path / "distract" / "a").glob("*.jpg"))[:3]
    dbv = [naive_vec(f) for f in db_files]
    aps = []
    for f in sorted(p for p in (tmp_path / "cd").rglob("*.jpg") if p.parent != tmp_path / "cd"):
        original = db_files.index(tmp_path / "cd" / f"{f.stem[:4]}00.jpg")
        aps.append(naive_ap(naive_vec(f), dbv, {original}, set())[0])
    assert got["mAP"] == pytest.approx(100 * sum(aps) / len(aps), abs=1e-6)
    strong = evaluate(copydays(tmp_path / "cd", transforms=["strong"]), embed, mean=MEAN, std=STD)
    assert len(copydays(tmp_path / "cd", transforms=["strong"]).queries) == 3 and not math.isnan(strong["mAP"])


def test_make_copydays_like_writes_what_copydays_reads(tmp_path):
    import importlib.util
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_task_classify import write_archive

    archive = write_archive(tmp_path / "a.tar.gz", per_class=2)
    spec = importlib.util.spec_from_file_location("mcl", Path(__file__).parents[1] / "tools" / "make_copydays_like.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(archive), str(tmp_path / "out"), "--originals", "3", "--distractors", "4"]) == 0
    rset = copydays(tmp_path / "out" / "copydays", tmp_path / "out" / "distractors")
    assert len(rset.database) == 3 + 4 and len(rset.queries) == 3 * 7
    assert len(copydays(tmp_path / "out" / "copydays", transforms=["strong"]).queries) == 3 * 2
    got = evaluate(rset, embed, mean=MEAN, std=STD)
    assert 0 < got["mAP"] <= 100
