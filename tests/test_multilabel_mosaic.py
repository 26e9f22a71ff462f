"""tools/make_mosaic.py: deterministic, labels = the classes of the four tiles, JSON format."""

import io
import tarfile

import numpy as np
from PIL import Image

from conftest import load_tool
from mhe_scale.data.multilabel_json import read_multilabel_json

COLOURS = np.array([[(37 * c) % 256, (91 * c + 40) % 256, (153 * c + 80) % 256] for c in range(10)], dtype=np.float64)


def write_archive(path, per_class=6):
    tool = load_tool("make_mosaic")
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, name in enumerate(tool.CLASSES):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), COLOURS[c], dtype=np.uint8)).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.png")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


def test_mosaics_are_deterministic_and_labelled_by_their_tiles(tmp_path):
    tool = load_tool("make_mosaic")
    archive = write_archive(tmp_path / "cifar.tar.gz")
    a = tool.make_mosaics(archive, tmp_path / "a", train=30, val=10, test=12, tiles_per_class=3, seed=1)
    b = tool.make_mosaics(archive, tmp_path / "b", train=30, val=10, test=12, tiles_per_class=3, seed=1)
    for split in ("train", "val", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        ann = read_multilabel_json(a[split], check_exists=True)
        assert ann.classes == sorted(tool.CLASSES)
        for path, target in zip(ann.paths, ann.targets):
            image = np.asarray(Image.open(path), dtype=np.float64)
            assert image.shape == (64, 64, 3)
            quadrants = [image[r:r + 32, c:c + 32].mean((0, 1)) for r in (0, 32) for c in (0, 32)]
            found = {tool.CLASSES[int(np.abs(COLOURS - q).sum(1).argmin())] for q in quadrants}
            assert found == {ann.classes[j] for j in np.flatnonzero(target)}
        assert (tmp_path / "a" / "images" / split / "000000.png").read_bytes() == \
            (tmp_path / "b" / "images" / split / "000000.png").read_bytes()
    ann = read_multilabel_json(a["train"])
    vehicles = [ann.classes.index(c) for c in tool.VEHICLES]
    both = ann.targets[:, vehicles].any(1) & np.delete(ann.targets, vehicles, 1).any(1)
    assert both.mean() < 0.9  # the co-occurrence prior keeps many mosaics within one super-class
