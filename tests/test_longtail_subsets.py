"""Long-tailed subsets: CIFAR-10-LT counts (Cao et al.'s published totals), Kang et al.'s LT0 ... LT
table from the ImageNet-LT stand-in reference, nested seeded sampling, the balanced validation split,
the OOD class halves, and tools/make_longtail.py on a tiny archive and folder."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mhe_scale.data.image_folder import list_file_records
from mhe_scale.data.longtail import (KANG_TABLE, balanced_holdout, exponential_counts, imagenet_lt_reference, kang_counts,
                                     nested_subsets, ood_class_split, power_counts, shot_groups)
from tests.conftest import load_tool


def test_cifar10_lt_counts_are_cao_et_al():
    # CIFAR-10-LT: 12,406 training images at ratio 100 and 20,431 at ratio 10 (as published)
    r100 = exponential_counts(5000, 100, 10)
    assert r100.tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert r100.sum() == 12_406 and exponential_counts(5000, 10, 10).sum() == 20_431
    assert exponential_counts(500, 100, 100).sum() == 10_847  # CIFAR-100-LT ratio 100


def test_imagenet_lt_reference_has_the_published_shape():
    ref = imagenet_lt_reference()
    assert (ref.max(), ref.min(), ref.sum(), len(ref)) == (1280, 5, 115_846, 1000)
    assert np.bincount(shot_groups(ref)).tolist() == [385, 479, 136]


@pytest.mark.parametrize("name", list(KANG_TABLE))
def test_kang_table_rows(name):
    a, top, bottom, total = KANG_TABLE[name]
    counts = kang_counts(imagenet_lt_reference(), name)
    if name in ("LT0", "LT"):  # LT0: 115 per class (floor of the mean 115.846); LT: the reference itself
        assert (counts.max(), counts.min(), counts.sum()) == (top, bottom, total)
    # the stand-in reference is not ImageNet-LT's exact list: max / min within 4 %, totals within 0.1 %
    assert abs(counts.max() - top) <= 0.04 * top and abs(counts.min() - bottom) <= max(1, 0.06 * bottom)
    assert abs(counts.sum() - total) <= 0.001 * total


def test_power_counts_preserve_the_mean_and_follow_the_power():
    ref = np.array([1000, 100, 10, 1])
    half = power_counts(ref, 5)
    assert abs(half.mean() - ref.mean()) < 1 and half[0] / half[2] == pytest.approx(10.0, rel=0.05)


def test_subsets_are_nested_seeded_and_have_the_counts():
    labels = np.repeat(np.arange(4), 50)
    np.random.default_rng(0).shuffle(labels)
    counts = {"flat": np.array([20, 20, 20, 20]), "skew": np.array([40, 20, 8, 2]), "skewer": np.array([50, 12, 3, 1])}
    subsets = nested_subsets(labels, counts, seed=3)
    for name, idx in subsets.items():
        assert np.bincount(labels[idx], minlength=4).tolist() == counts[name].tolist()
    for c in range(4):  # class by class the smaller subset lies inside the larger
        sets = sorted((set(idx[labels[idx] == c].tolist()) for idx in subsets.values()), key=len)
        assert sets[0] <= sets[1] <= sets[2]
    again = nested_subsets(labels, counts, seed=3)
    other = nested_subsets(labels, counts, seed=4)
    assert all((again[k] == subsets[k]).all() for k in counts)
    assert not (other["flat"] == subsets["flat"]).all()
    with pytest.raises(ValueError, match="class 0 needs 60 images but has 50"):
        nested_subsets(labels, {"big": np.array([60, 1, 1, 1])}, seed=0)


def test_balanced_holdout_and_ood_halves():
    labels = np.repeat(np.arange(5), 30)
    held, rest = balanced_holdout(labels, 4, seed=0)
    assert np.bincount(labels[held]).tolist() == [4] * 5 and not set(held) & set(rest)
    assert len(held) + len(rest) == len(labels)
    seen, unseen = ood_class_split(10, seed=0)
    assert len(seen) == len(unseen) == 5 and sorted([*seen, *unseen]) == list(range(10))


def _archive(path, per_class=12, test=3, classes="abcd", member="{split}/{c}/{i:04d}.jpg"):
    """A CIFAR-like .tar.gz of random 8x8 JPEGs, `member` naming each (split, class c, index i)."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", per_class), ("test", test)):
            for c in classes:
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(member.format(split=split, c=c, i=i))
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_make_longtail_cifar_writes_loadable_lists(tmp_path):
    tool = load_tool("make_longtail")
    out = tmp_path / "lt"
    assert tool.main(["cifar10", "--archive", str(_archive(tmp_path / "a.tar.gz")), "--out", str(out),
                      "--ratios", "4", "--val-per-class", "2"]) == 0
    records = list_file_records(out / "r4.txt", out / "images")
    assert np.bincount(records.labels).tolist() == exponential_counts(10, 4, 4).tolist()  # 12 - 2 held out
    val = list_file_records(out / "val.txt", out / "images")
    assert np.bincount(val.labels).tolist() == [2] * 4 and not {val.path(i) for i in range(8)} & \
        {records.path(i) for i in range(len(records))}
    summary = json.loads((out / "summary.json").read_text())
    pre = list_file_records(out / "ood_r4_pretrain.txt", out / "images")
    probe = list_file_records(out / "ood_probe_test.txt", out / "images")
    assert set(pre.labels.tolist()) == {0, 1} and np.bincount(probe.labels).tolist() == [3, 3]
    assert not set(summary["ood"]["pretrain_classes"]) & set(summary["ood"]["probe_classes"])


def test_make_longtail_imagenet_folder_with_reference_counts(tmp_path, capsys):
    tool = load_tool("make_longtail")
    root = tmp_path / "train"
    for c in range(4):
        (root / f"n{c}").mkdir(parents=True)
        for i in range(30):
            (root / f"n{c}" / f"{i}.jpg").write_bytes(b"x")
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(f"n{c}/{i}.jpg {c}\n" for c, n in enumerate([25, 9, 4, 1]) for i in range(n)))
    out = tmp_path / "lists"
    assert tool.main(["imagenet", "--folder", str(root), "--out", str(out), "--reference-counts", str(ref),
                      "--val-per-class", "5"]) == 0
    full = list_file_records(out / "LT.txt", root)
    assert sorted(np.bincount(full.labels, minlength=4).tolist()) == [1, 4, 9, 25]
    bad = tmp_path / "bad_ref.txt"
    bad.write_text("n0/0.jpg 0\n\nn1/0.jpg 7\n")  # label 7: only 4 class folders
    assert tool.main(["imagenet", "--folder", str(root), "--out", str(tmp_path / "bad"), "--reference-counts", str(bad)]) == 2
    assert "bad_ref.txt: record 2 (blank lines not counted) has label 7, outside the 4 class folders" in capsys.readouterr().err
    flat = list_file_records(out / "LT0.txt", root)
    assert np.bincount(flat.labels).tolist() == [9] * 4  # LT0: the mean 39/4 floored (as the paper's 115.846 -> 115)
    lt0, lt = ({flat.path(i) for i in range(len(flat))}, {full.path(i) for i in range(len(full))})
    head = int(np.bincount(full.labels).argmax())
    assert {p for p in lt0 if f"/n{head}/" in p} <= {p for p in lt if f"/n{head}/" in p}


def test_make_longtail_imagenet_test_list_is_relative_to_the_test_folder(tmp_path):
    tool = load_tool("make_longtail")
    root, val = tmp_path / "train", tmp_path / "val"
    for c in range(4):
        (root / f"n{c}").mkdir(parents=True)
        (val / f"n{c}").mkdir(parents=True)
        for i in range(30):
            (root / f"n{c}" / f"{i}.jpg").write_bytes(b"x")
        for i in range(2):
            (val / f"n{c}" / f"v{i}.jpg").write_bytes(b"v")
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(f"../../n{c}/{i}.jpg {c}\n" for c, n in enumerate([25, 9, 4, 1]) for i in range(n)))
    out = tmp_path / "lists"  # the reference's paths are only counted, never opened: ../ is fine there
    assert tool.main(["imagenet", "--folder", str(root), "--test-folder", str(val), "--out", str(out),
                      "--reference-counts", str(ref), "--val-per-class", "5"]) == 0
    test = list_file_records(out / "test.txt", val)
    assert test.path(0) == str(val / "n0" / "v0.jpg") and np.bincount(test.labels).tolist() == [2] * 4
    assert all(not line.startswith("..") for line in (out / "test.txt").read_text().splitlines())
    probe = list_file_records(out / "ood_probe_test.txt", val)
    assert len(probe) == 4
    roots = json.loads((out / "summary.json").read_text())["roots"]
    assert roots == {"data.root": str(root), "data.test_root": str(val)}


def test_make_longtail_binary_reference_counts_is_one_line(tmp_path, capsys):
    tool = load_tool("make_longtail")
    root = tmp_path / "train"
    for c in range(2):
        (root / f"n{c}").mkdir(parents=True)
        (root / f"n{c}" / "0.jpg").write_bytes(b"x")
    ref = tmp_path / "ref.bin"
    ref.write_bytes(b"n0/0.jpg 0\n\x1f\x8b\x08\x00\xff\n")  # e.g. a gzipped list given as it is
    assert tool.main(["imagenet", "--folder", str(root), "--out", str(tmp_path / "o"), "--reference-counts",
                      str(ref), "--val-per-class", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{ref}:2: not UTF-8 text (byte 0x8b at column 2)" in err


def test_make_longtail_cifar_keeps_absolute_member_names_under_images(tmp_path, monkeypatch):
    tool = load_tool("make_longtail")
    write_bytes, mkdir = Path.write_bytes, Path.mkdir

    def inside(path: Path) -> None:  # the old code wrote /train/a/0.jpg: fail instead of writing outside tmp_path
        assert str(path.resolve()).startswith(str(tmp_path.resolve())), f"write outside the output: {path}"

    monkeypatch.setattr(Path, "write_bytes", lambda self, data: (inside(self), write_bytes(self, data))[1])
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (inside(self), mkdir(self, *a, **k))[1])
    archive = _archive(tmp_path / "abs.tar.gz", 6, 1, "ab", "/{split}/{c}/{i}.jpg")
    with tarfile.open(archive) as tar:
        assert tar.getnames()[0] == "/train/a/0.jpg"  # the archive really holds absolute names
    out = tmp_path / "lt"
    assert tool.main(["cifar10", "--archive", str(archive), "--out", str(out), "--ratios", "2"]) == 0
    records = list_file_records(out / "r2.txt", out / "images")
    assert len(records) == 6 + 3 and all(records.path(i).startswith(str(out / "images")) for i in range(len(records)))
    assert not (tmp_path / "train").exists() and "/train/a/0.jpg" not in (out / "r2.txt").read_text()
