"""COCO instances JSON -> the multi-label annotation format (mhe_scale/data/multilabel_json.py).

    python tools/import_coco.py annotations/instances_val2017.json --images val2017 --out coco/val.json

Label set of an image = the names of the categories of its instance annotations (crowd ones too;
--skip-crowd leaves them out). Every image the JSON lists is kept, with no labels if it has no
annotation. classes = every category of the JSON. Image paths are written relative to --out's folder.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from mhe_scale.data.multilabel_json import write_multilabel_json


def coco_to_multilabel(instances: dict, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                       skip_crowd: bool = False, source: str = "<coco>") -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(classes, [(path relative to out_dir, sorted label names)]) of a parsed COCO instances JSON."""
    try:
        names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        files = [(int(im["id"]), str(im["file_name"])) for im in instances["images"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a COCO instances JSON (categories / images: {err!r})") from None
    labels: dict[int, set[str]] = {i: set() for i, _ in files}
    for n, ann in enumerate(instances.get("annotations", [])):
        if skip_crowd and ann.get("iscrowd", 0):
            continue
        image, category = int(ann["image_id"]), int(ann["category_id"])
        if image not in labels or category not in names:
            raise ValueError(f"{source}: annotations[{n}] (id {ann.get('id')}) refers to image {image} / "
                             f"category {category} that the JSON does not list")
        labels[image].add(names[category])
    rel = os.path.relpath(Path(images_dir), Path(out_dir))
    return sorted(set(names.values())), [(os.path.join(rel, f), sorted(labels[i])) for i, f in files]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("instances", help="COCO instances_*.json")
    parser.add_argument("--images", required=True, help="folder holding the JSON's file_name images")
    parser.add_argument("--out", required=True, help="output JSON (image paths relative to its folder)")
    parser.add_argument("--skip-crowd", action="store_true", help="ignore iscrowd=1 annotations")
    args = parser.parse_args(argv)
    with open(args.instances, encoding="utf-8") as f:
        instances = json.load(f)
    out = Path(args.out)
    classes, images = coco_to_multilabel(instances, args.images, out.parent, args.skip_crowd, args.instances)
    write_multilabel_json(out, classes, images)
    print(f"{out}: {len(images)} images, {len(classes)} classes, "
          f"{sum(len(x) for _, x in images) / max(len(images), 1):.2f} labels per image")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
