"""Issue 22 items 3, 5, 7 (importer side): tools/import_coco.py and tools/import_voc.py write
"image_root" (the --images folder) with paths under it, refuse paths that leave it, check that every
image exists (--skip-missing drops them with a count), refuse an empty import, name the file and line
of truncated JSON / malformed XML, and hold out a seeded, disjoint validation split (--val-fraction)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_tool
from mhe_scale.data.multilabel_import import split_validation, val_sibling


def resolved(out: Path) -> list[tuple[Path, list[str]]]:
    """(image file, labels) of a written JSON, paths joined to its image_root by hand (reader-independent)."""
    raw = json.loads(out.read_text())
    root = out.parent / raw["image_root"]
    return [(Path(os.path.normpath(root / rel)), labels) for rel, labels in raw["images"]]


def coco(tmp_path: Path, files: list[str], make: int | None = None) -> tuple[Path, Path]:
    """instances.json listing `files` (image i labelled "cat" if i even, and "dog" if i % 3 == 0), and an
    images folder holding the first `make` of them (all by default)."""
    images = tmp_path / "raw" / "images"
    images.mkdir(parents=True)
    for name in files[:make]:
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(images / name)
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1} for i in range(0, len(files), 2)]
    anns += [{"id": 100 + i, "image_id": i, "category_id": 2} for i in range(0, len(files), 3)]
    body = {"categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "images": [{"id": i, "file_name": f} for i, f in enumerate(files)], "annotations": anns}
    path = tmp_path / "raw" / "instances.json"
    path.write_text(json.dumps(body, indent=1))
    return path, images


def coco_labels(i: int) -> list[str]:
    """The labels coco() gives image i (a naive reference)."""
    return [name for name, keep in (("cat", i % 2 == 0), ("dog", i % 3 == 0)) if keep]


def run(tool, args, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = tool.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_coco_writes_image_root_and_names_under_it(tmp_path, capsys):
    files = [f"{i:03d}.jpg" for i in range(6)] + ["sub/006.jpg"]
    instances, images = coco(tmp_path, files)
    out = tmp_path / "new" / "folder" / "train.json"  # a folder that does not exist yet: created
    code, stdout, _ = run(load_tool("import_coco"), [instances, "--images", images, "--out", out], capsys)
    assert code == 0 and f"{out}: 7 images, 2 classes" in stdout
    raw = json.loads(out.read_text())
    assert raw["image_root"] == "../../raw/images" and [r for r, _ in raw["images"]] == files
    assert [p for p, _ in resolved(out)] == [images / f for f in files]
    assert [labels for _, labels in resolved(out)] == [coco_labels(i) for i in range(7)]


@pytest.mark.parametrize("name", ["../outside.jpg", "a/../../outside.jpg", "/etc/hostname"])
def test_coco_file_names_outside_images_are_refused(tmp_path, capsys, name):
    instances, images = coco(tmp_path, ["000.jpg", name], make=1)
    (images.parent / "outside.jpg").write_bytes(b"x")  # it exists: still refused
    out = tmp_path / "out.json"
    code, _, err = run(load_tool("import_coco"), [instances, "--images", images, "--out", out], capsys)
    assert code == 2 and "\n" not in err and "images[1] (id 1)" in err and str(instances) in err
    assert ("absolute" if name.startswith("/") else "outside its root") in err
    assert not out.exists()


def test_coco_missing_images_are_refused_or_dropped_with_a_count(tmp_path, capsys):
    instances, images = coco(tmp_path, [f"{i}.jpg" for i in range(5)], make=3)
    out = tmp_path / "out.json"
    tool = load_tool("import_coco")
    code, _, err = run(tool, [instances, "--images", images, "--out", out], capsys)
    assert code == 2 and "2 of 5 images do not exist" in err and "images[3] (id 3)" in err and "\n" not in err
    assert not out.exists()
    code, _, err = run(tool, [instances, "--images", images, "--out", out, "--skip-missing"], capsys)
    assert code == 0 and "warning: 2 of 5 images" in err
    assert [p.name for p, _ in resolved(out)] == ["0.jpg", "1.jpg", "2.jpg"]


def test_coco_empty_import_exits_non_zero(tmp_path, capsys):
    tool = load_tool("import_coco")
    instances, images = coco(tmp_path, [])
    out = tmp_path / "out.json"
    code, _, err = run(tool, [instances, "--images", images, "--out", out], capsys)
    assert code != 0 and "0 images" in err and not out.exists()
    instances, images = coco(tmp_path / "b", ["0.jpg", "1.jpg"], make=0)  # every image missing, --skip-missing
    code, _, err = run(tool, [instances, "--images", images, "--out", out, "--skip-missing"], capsys)
    assert code != 0 and "0 images" in err.splitlines()[-1] and not out.exists()


def test_coco_truncated_or_malformed_json_is_one_line(tmp_path, capsys):
    instances, images = coco(tmp_path, ["0.jpg", "1.jpg"])
    text = instances.read_text()
    tool = load_tool("import_coco")
    instances.write_text(text[: len(text) // 2])
    code, _, err = run(tool, [instances, "--images", images, "--out", tmp_path / "o.json"], capsys)
    line = text[: len(text) // 2].count("\n") + 1
    assert code == 2 and err.startswith(f"error: {instances}: line {line}: not valid JSON") and "\n" not in err
    body = json.loads(text)
    body["annotations"].append({"id": 7, "category_id": 1})  # no image_id
    instances.write_text(json.dumps(body))
    code, _, err = run(tool, [instances, "--images", images, "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and f"annotations[{len(body['annotations']) - 1}]" in err and "\n" not in err
    code, _, err = run(tool, [tmp_path / "nope.json", "--images", images, "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and "nope.json does not exist" in err


def test_validation_split_is_seeded_and_disjoint(tmp_path, capsys):
    files = [f"{i:02d}.jpg" for i in range(20)]
    instances, images = coco(tmp_path, files)
    tool = load_tool("import_coco")
    out = tmp_path / "coco" / "train.json"
    code, stdout, _ = run(tool, [instances, "--images", images, "--out", out, "--val-fraction", "0.25",
                                 "--seed", "3"], capsys)
    val = tmp_path / "coco" / "train_val.json"
    assert code == 0 and val_sibling(out) == val and f"{val}: 5 images" in stdout and f"{out}: 15 images" in stdout
    rest, held = resolved(out), resolved(val)
    assert len(held) == 5 and not {p for p, _ in rest} & {p for p, _ in held}
    everything = dict(resolved_all := rest + held)
    assert sorted(everything) == [images / f for f in files] and len(resolved_all) == 20
    labels = {images / f: coco_labels(i) for i, f in enumerate(files)}
    assert all(labels[p] == lab for p, lab in resolved_all)  # labels travel with their image
    first = out.read_bytes(), val.read_bytes()
    assert run(tool, [instances, "--images", images, "--out", out, "--val-fraction", "0.25", "--seed", "3"],
               capsys)[0] == 0
    assert (out.read_bytes(), val.read_bytes()) == first  # same seed, same split, same bytes
    run(tool, [instances, "--images", images, "--out", out, "--val-fraction", "0.25", "--seed", "4"], capsys)
    assert {p for p, _ in resolved(val)} != {p for p, _ in held}
    for bad in ("0", "1", "0.01"):  # 0.01 of 20 rounds to 0 held-out images
        code, _, err = run(tool, [instances, "--images", images, "--out", tmp_path / "x.json", "--val-fraction", bad],
                           capsys)
        assert code == 2 and "--val-fraction" in err and "\n" not in err


def test_split_validation_matches_a_naive_draw():
    records = [(f"{i}.jpg", [str(i)]) for i in range(11)]
    rest, held = split_validation(records, 0.3, seed=5)
    chosen = set(np.random.default_rng(5).permutation(11)[:3].tolist())  # round(0.3 * 11) = 3
    assert held == [r for i, r in enumerate(records) if i in chosen]
    assert rest == [r for i, r in enumerate(records) if i not in chosen]


def voc(tmp_path: Path, ids: list[str], xml: dict[str, str] | None = None, make: int | None = None) -> Path:
    root = tmp_path / "VOC2007"
    for sub in ("ImageSets/Main", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, image_id in enumerate(ids):
        body = (xml or {}).get(image_id, f"<annotation><object><name>dog</name></object></annotation>")
        (root / "Annotations" / f"{image_id}.xml").write_text(body)
        if make is None or n < make:
            Image.new("RGB", (4, 4)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def test_voc_writes_image_root_and_checks_images(tmp_path, capsys):
    tool = load_tool("import_voc")
    root = voc(tmp_path, ["000001", "000002", "000003"], make=2)
    out = tmp_path / "out" / "trainval.json"
    code, _, err = run(tool, [root, "--out", out], capsys)
    assert code == 2 and "1 of 3 images do not exist" in err and "trainval.txt:3" in err and not out.exists()
    code, _, err = run(tool, [root, "--out", out, "--skip-missing"], capsys)
    assert code == 0 and "warning: 1 of 3" in err
    raw = json.loads(out.read_text())
    assert raw["image_root"] == "../VOC2007/JPEGImages" and [r for r, _ in raw["images"]] == ["000001.jpg", "000002.jpg"]
    assert all(p.is_file() and lab == ["dog"] for p, lab in resolved(out))


def test_voc_malformed_xml_and_escaping_ids_are_one_line(tmp_path, capsys):
    tool = load_tool("import_voc")
    root = voc(tmp_path, ["000001", "000002"], xml={"000002": "<annotation>\n<object><name>dog</name>\n</annotation>"})
    code, _, err = run(tool, [root, "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and "000002.xml: malformed XML" in err and "line 3" in err and "trainval.txt:2" in err
    assert "\n" not in err
    root = voc(tmp_path / "b", ["000001"])
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n../../../secret\n")
    (tmp_path / "secret.xml").write_text("<annotation/>")
    code, _, err = run(tool, [root, "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and "trainval.txt:2" in err and "outside its root" in err and "\n" not in err
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n")
    code, _, err = run(tool, [root, "--out", tmp_path / "o.json", "--classes", "cat"], capsys)
    assert code == 2 and "not in the classes" in err


def test_voc_validation_split(tmp_path, capsys):
    root = voc(tmp_path, [f"{i:06d}" for i in range(10)])
    out = tmp_path / "voc" / "trainval.json"
    code, _, _ = run(load_tool("import_voc"), [root, "--out", out, "--val-fraction", "0.2", "--seed", "1"], capsys)
    rest, held = resolved(out), resolved(tmp_path / "voc" / "trainval_val.json")
    assert code == 0 and len(rest) == 8 and len(held) == 2 and not {p for p, _ in rest} & {p for p, _ in held}


def test_voc_unknown_object_names_name_the_annotation(tmp_path, capsys):
    """It said only 'VOC2007 split trainval has object names [...]': which of 5,011 XMLs held one?"""
    root = voc(tmp_path, ["000001", "000002", "000003"],
               xml={"000002": "<annotation><object><name>unicorn</name></object><object><name>dog</name></object>"
                              "</annotation>", "000003": "<annotation><object><name>yeti</name></object></annotation>"})
    code, _, err = run(load_tool("import_voc"), [root, "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and "\n" not in err and not (tmp_path / "o.json").exists()
    assert err.startswith(f"error: {root / 'Annotations' / '000002.xml'}: object names ['unicorn'] not in the classes")
    assert "trainval.txt:2" in err and "2 such: ['unicorn', 'yeti']" in err



def test_voc_per_class_split_files_are_refused(tmp_path, capsys):
    root = voc(tmp_path, ["000001", "000002"])
    (root / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000001  1\n000002 -1\n")
    code, _, err = run(load_tool("import_voc"), [root, "--split", "dog_trainval", "--out", tmp_path / "o.json"], capsys)
    assert code == 2 and "dog_trainval.txt:1" in err and "per-class line" in err and "\n" not in err.strip()
    assert not (tmp_path / "o.json").exists()
