"""COCO instances JSON -> the multi-label annotation format (mhe_scale/data/multilabel_json.py).

    python tools/import_coco.py annotations/instances_val2017.json --images val2017 --out coco/test.json
    python tools/import_coco.py annotations/instances_train2017.json --images train2017 \
        --out coco/train.json --val-fraction 0.05 --seed 0     # + coco/train_val.json, held out

Label set of an image = the names of the categories of its instance annotations (crowd ones too;
--skip-crowd leaves them out). Every image the JSON lists is kept, with no labels if it has no
annotation. classes = every category of the JSON.

Reads the instances JSON and checks that every listed image exists under --images.
Writes --out (its folder is created if missing): "image_root" = the --images folder (relative to
--out's folder when possible) and each image's file_name relative to it. With --val-fraction F
(0 < F < 1) a seeded draw (--seed) of round(F x N) images goes to OUT's sibling `<stem>_val.json`
(the held-out split the thresholds are tuned on: data.val_path) and the rest to --out; the two are
disjoint by image. Refuses with one line on stderr and exit 2: a missing, truncated or malformed JSON
(the line named), an annotation naming an image or category the JSON does not list, a file_name that
is absolute or resolves outside --images, missing images (how many, the first named; --skip-missing
drops them and says how many) and an import with 0 images (nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhe_scale.data.multilabel_import import Record, check_images, write_splits  # noqa: E402
from mhe_scale.data.safe_paths import resolve_under  # noqa: E402


def read_instances(path: str | os.PathLike) -> dict:
    """The parsed instances JSON; errors name the file (and the line of a syntax error)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist; pass a COCO instances_*.json") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg}); truncated?") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); pass a COCO instances JSON") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level is not an object; pass a COCO instances JSON")
    return raw


def coco_to_multilabel(instances: dict, images_dir: str | os.PathLike, skip_crowd: bool = False,
                       source: str = "<coco>") -> tuple[list[str], list[Record], list[str]]:
    """(classes, [(file_name under images_dir, sorted label names)], where each image came from) of a
    parsed COCO instances JSON; a file_name leaving images_dir is refused (PathEscapeError)."""
    try:
        names = {int(c["id"]): str(c["name"]) for c in instances["categories"]}
        files = [(int(im["id"]), str(im["file_name"])) for im in instances["images"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a COCO instances JSON (categories / images: {err!r})") from None
    wheres = [f"{source}: images[{n}] (id {i})" for n, (i, _) in enumerate(files)]
    for (_, name), where in zip(files, wheres):
        resolve_under(images_dir, name, where)
    labels: dict[int, set[str]] = {i: set() for i, _ in files}
    for n, ann in enumerate(instances.get("annotations", [])):
        try:
            crowd, image, category = ann.get("iscrowd", 0), int(ann["image_id"]), int(ann["category_id"])
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source}: annotations[{n}]: expected an object with image_id and category_id "
                             f"({err!r})") from None
        if skip_crowd and crowd:
            continue
        if image not in labels or category not in names:
            raise ValueError(f"{source}: annotations[{n}] (id {ann.get('id')}) refers to image {image} / "
                             f"category {category} that the JSON does not list")
        labels[image].add(names[category])
    return sorted(set(names.values())), [(Path(f).as_posix(), sorted(labels[i])) for i, f in files], wheres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("instances", help="COCO instances_*.json")
    parser.add_argument("--images", required=True, help="folder holding the JSON's file_name images (image_root)")
    parser.add_argument("--out", required=True, help="output JSON")
    parser.add_argument("--skip-crowd", action="store_true", help="ignore iscrowd=1 annotations")
    parser.add_argument("--skip-missing", action="store_true", help="drop images that do not exist (and count them)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="hold out this fraction of the images in OUT's sibling <stem>_val.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction draw")
    args = parser.parse_args(argv)
    try:
        instances = read_instances(args.instances)
        classes, images, wheres = coco_to_multilabel(instances, args.images, args.skip_crowd, args.instances)
        images, missing = check_images(args.images, images, wheres, args.skip_missing)
        if missing:
            print(f"warning: {missing} of {len(images) + missing} images of {args.instances} do not exist under "
                  f"{args.images}; dropped (--skip-missing)", file=sys.stderr)
        written = write_splits(args.out, classes, args.images, images, args.val_fraction, args.seed)
    except (ValueError, FileNotFoundError) as err:  # PathEscapeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, count in written.values():
        print(f"{path}: {count} images, {len(classes)} classes")
    print(f"{sum(len(x) for _, x in images) / len(images):.2f} labels per image over the {len(images)} imported")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
