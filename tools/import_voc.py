"""Pascal VOC folder layout -> the multi-label annotation format (mhe_scale/data/multilabel_json.py).

    python tools/import_voc.py VOCdevkit/VOC2007 --split trainval --out voc/trainval.json

Reads ROOT/ImageSets/Main/SPLIT.txt (one image id per line), ROOT/Annotations/ID.xml (each
<object><name>) and points at ROOT/JPEGImages/ID.jpg. classes = the 20 VOC classes (or --classes
a,b,...); label set = the object names of the image (difficult objects too unless --skip-difficult).
Image paths are written relative to --out's folder.
"""

from __future__ import annotations

import argparse
import os
import xml.etree.ElementTree as ET
from pathlib import Path

from mhe_scale.data.multilabel_json import write_multilabel_json

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def voc_to_multilabel(root: str | os.PathLike, split: str, out_dir: str | os.PathLike,
                      skip_difficult: bool = False) -> list[tuple[str, list[str]]]:
    """[(ROOT/JPEGImages/ID.jpg relative to out_dir, sorted object names)] of one VOC split."""
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"{ids_file} does not exist; is {root} a VOC year folder (Annotations/, "
                                "ImageSets/Main/, JPEGImages/)?")
    rel = os.path.relpath(root / "JPEGImages", Path(out_dir))
    images: list[tuple[str, list[str]]] = []
    for number, line in enumerate(ids_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        xml = root / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml)
        except (OSError, ET.ParseError) as err:
            raise ValueError(f"{ids_file}:{number}: cannot read {xml} ({err})") from None
        names = set()
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise ValueError(f"{xml}: an <object> has no <name>")
            if skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            names.add(name)
        images.append((os.path.join(rel, f"{image_id}.jpg"), sorted(names)))
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a VOC year folder, e.g. VOCdevkit/VOC2007")
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: the 20 VOC classes)")
    parser.add_argument("--skip-difficult", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    classes = args.classes.split(",") if args.classes else VOC_CLASSES
    images = voc_to_multilabel(args.root, args.split, out.parent, args.skip_difficult)
    unknown = sorted({n for _, names in images for n in names} - set(classes))
    if unknown:
        raise SystemExit(f"error: {args.root} split {args.split} has object names {unknown[:5]} not in the classes; "
                         "pass --classes with them")
    write_multilabel_json(out, classes, images)
    print(f"{out}: {len(images)} images, {len(classes)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
