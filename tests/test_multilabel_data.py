"""Multi-label JSON format, the COCO / VOC importers (real COCO-MINI photos), and the dataset."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tool
from mhe_scale.data.image_dataset import transform_preset
from mhe_scale.data.multilabel_json import MultilabelImageDataset, read_multilabel_json, write_multilabel_json


def test_coco_import_matches_the_instances_json(coco_mini, tmp_path):
    tool = load_tool("import_coco")
    out = tmp_path / "json" / "val.json"
    assert tool.main([str(coco_mini / "annotations" / "instances_val2017.json"), "--images",
                      str(coco_mini / "val2017"), "--out", str(out)]) == 0
    ann = read_multilabel_json(out, check_exists=True)
    raw = json.loads((coco_mini / "annotations" / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    assert ann.classes == sorted(names.values()) and len(ann.classes) == 80
    expected = np.zeros((len(raw["images"]), 80), dtype=bool)  # naive reference: loop over annotations
    row = {im["id"]: i for i, im in enumerate(raw["images"])}
    for a in raw["annotations"]:
        expected[row[a["image_id"]], ann.classes.index(names[a["category_id"]])] = True
    np.testing.assert_array_equal(ann.targets, expected)
    assert [Path(p).name for p in ann.paths] == [im["file_name"] for im in raw["images"]]
    assert abs(ann.targets.sum(1).mean() - 3.59) < 0.01  # SOURCE.md: 3.59 labels per val image
    data = MultilabelImageDataset(ann, transform_preset("imagenet", False, size=64), seed=0)
    image, target = data[3]
    assert image.shape == (3, 64, 64) and target.dtype == torch.float32
    torch.testing.assert_close(target, torch.from_numpy(expected[3].astype(np.float32)))


def test_sorted_order_repeats_empty_images_and_unknown_labels(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    path = write_multilabel_json(tmp_path / "s.json", ["zebra", "ant", "cow"],
                                 [("a.jpg", ["cow", "zebra", "cow"]), ("a.jpg", [])])
    ann = read_multilabel_json(path)
    assert ann.classes == ["ant", "cow", "zebra"]
    np.testing.assert_array_equal(ann.targets, [[False, True, True], [False, False, False]])
    path.write_text(json.dumps({"classes": ["ant"], "images": [["a.jpg", ["ant"]], ["a.jpg", ["bee", "ant", "bee"]]]}))
    with pytest.raises(ValueError, match=r"s\.json: images\[1\] \(a\.jpg\): label 'bee' is not in classes"):
        read_multilabel_json(path)
    ann = read_multilabel_json(path, drop_unknown=True)
    assert ann.dropped_labels == 2 and ann.targets.tolist() == [[True], [True]]
    path.write_text(json.dumps({"classes": ["ant"], "images": [["a.jpg", "ant"]]}))
    with pytest.raises(ValueError, match=r"images\[0\]: expected \[relative_path"):
        read_multilabel_json(path)


def test_voc_import(tmp_path):
    tool = load_tool("import_voc")
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "JPEGImages").mkdir()
    objects = {"000001": [("dog", 0), ("person", 1), ("dog", 0)], "000002": [("car", 1)]}
    for image_id, objs in objects.items():
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objs)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{body}</annotation>")
        Image.new("RGB", (8, 8)).save(root / "JPEGImages" / f"{image_id}.jpg")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000001\n000002\n")
    out = tmp_path / "out" / "trainval.json"
    assert tool.main([str(root), "--split", "trainval", "--out", str(out), "--skip-difficult"]) == 0
    ann = read_multilabel_json(out, check_exists=True)
    assert len(ann.classes) == 20
    assert [[ann.classes[j] for j in np.flatnonzero(t)] for t in ann.targets] == [["dog"], []]
    assert tool.main([str(root), "--out", str(out)]) == 0
    ann = read_multilabel_json(out)
    assert [[ann.classes[j] for j in np.flatnonzero(t)] for t in ann.targets] == [["dog", "person"], ["car"]]


def test_image_root_holds_every_path_and_escapes_are_refused(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    (tmp_path / "secret.jpg").write_bytes(b"outside")
    folder = tmp_path / "json"
    path = write_multilabel_json(folder / "s.json", ["ant"], [("a.jpg", ["ant"])], image_root="../photos")
    ann = read_multilabel_json(path, check_exists=True)
    assert ann.paths == [str(images / "a.jpg")] and ann.image_root == str(images)
    for escape in ("../secret.jpg", "sub/../../secret.jpg", str(tmp_path / "secret.jpg")):
        path.write_text(json.dumps({"classes": ["ant"], "image_root": "../photos", "images": [["a.jpg", ["ant"]],
                                                                                           [escape, ["ant"]]]}))
        with pytest.raises(ValueError, match=r"s\.json: images\[1\]: path .* (resolves outside its root|is absolute)"):
            read_multilabel_json(path)
    # no image_root: the JSON's folder is the root, so ../photos/a.jpg leaves it (it was read before)
    path.write_text(json.dumps({"classes": ["ant"], "images": [["../photos/a.jpg", ["ant"]]]}))
    with pytest.raises(ValueError, match=r"images\[0\]: path '../photos/a.jpg' resolves outside its root .*json"):
        read_multilabel_json(path)
    path.write_text(json.dumps({"classes": ["ant"], "image_root": "nowhere", "images": [["a.jpg", ["ant"]]]}))
    ann = read_multilabel_json(path, image_root=images)  # data.image_root overrides the file's root
    assert ann.paths == [str(images / "a.jpg")]
    path.write_text(json.dumps({"classes": ["ant"], "image_root": "nowhere", "images": []}))
    with pytest.raises(ValueError, match=r"s\.json: image_root 'nowhere': .*nowhere is not a folder"):
        read_multilabel_json(path)


def test_binary_json_and_missing_images_are_one_line(tmp_path):
    path = tmp_path / "s.json"
    path.write_bytes(b'{"classes": ["\xff\xfe"]}')
    with pytest.raises(ValueError, match=r"s\.json: byte 14: not UTF-8 text"):
        read_multilabel_json(path)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    names = ["a.jpg", "gone1.jpg", "empty.jpg", "gone2.jpg", "gone3.jpg"]
    write_multilabel_json(path, ["ant"], [(n, ["ant"]) for n in names])
    assert len(read_multilabel_json(path)) == 5  # not checked unless asked
    with pytest.raises(FileNotFoundError) as err:
        read_multilabel_json(path, check_exists=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: images[1]: image {tmp_path / 'gone1.jpg'} does not exist")
    assert "4 of 5 images are missing or empty" in message and "empty.jpg (listed at" in message
    assert "is empty (0 bytes)" in message and "gone2.jpg" in message and "gone3.jpg" not in message


def test_task_data_section_image_root_and_check_images(tmp_path):
    from mhe_scale.tasks.multilabel import MultilabelDataConfig, load_multilabel_data

    images = tmp_path / "photos"
    images.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(images / name)
    for split in ("train", "test"):  # written without image_root: paths relative to data.image_root
        write_multilabel_json(tmp_path / "json" / f"{split}.json", ["ant", "bee"], [("a.jpg", ["ant"]), ("b.jpg", ["bee"])])
    cfg = MultilabelDataConfig(train_path=str(tmp_path / "json" / "train.json"),
                               test_path=str(tmp_path / "json" / "test.json"))
    with pytest.raises(FileNotFoundError, match=r"train\.json: images\[0\]: image .*json/a\.jpg does not exist.*"
                                                r"2 of 2 images are missing"):
        load_multilabel_data(cfg)  # checked at start-up, before any training
    cfg.image_root = str(images)
    data = load_multilabel_data(cfg)
    assert data.test.annotations.paths == [str(images / "a.jpg"), str(images / "b.jpg")]
