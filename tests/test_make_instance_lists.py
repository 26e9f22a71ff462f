"""tools/make_instance_lists.py on a tiny archive in CIFAR-10's layout (train/<class>/NNNN.jpg): the first
--per-class files by name of every class, label = line number in path order, images written under OUT."""

from __future__ import annotations

import importlib.util
import io
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("make_instance_lists", REPO / "tools" / "make_instance_lists.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_files_by_name_each_its_own_class(tmp_path):
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split, cls, name in [("train", "cat", "0002.jpg"), ("train", "cat", "0000.jpg"), ("train", "cat", "0001.jpg"),
                                 ("train", "ant", "0001.jpg"), ("train", "ant", "0000.jpg"), ("test", "cat", "0000.jpg")]:
            data = f"{split}/{cls}/{name}".encode()
            info = tarfile.TarInfo(f"{split}/{cls}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert _tool().main([str(archive), str(tmp_path / "out"), "--per-class", "2"]) == 0
    lines = (tmp_path / "out" / "train4.txt").read_text().splitlines()
    assert lines == ["train/ant/0000.jpg 0", "train/ant/0001.jpg 1", "train/cat/0000.jpg 2", "train/cat/0001.jpg 3"]
    assert (tmp_path / "out" / "images" / "train" / "cat" / "0001.jpg").read_bytes() == b"train/cat/0001.jpg"
    assert not (tmp_path / "out" / "images" / "train" / "cat" / "0002.jpg").exists()
