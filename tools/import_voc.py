"""Pascal VOC folder layout -> the multi-label annotation format (mhe_scale/data/multilabel_json.py).

    python tools/import_voc.py VOCdevkit/VOC2007 --split trainval --out voc/trainval.json [--val-fraction 0.1]

Reads ROOT/ImageSets/Main/SPLIT.txt (one image id per line), ROOT/Annotations/ID.xml (each
<object><name>) and checks that ROOT/JPEGImages/ID.jpg exists. classes = the 20 VOC classes (or
--classes a,b,...); label set = the object names of the image (difficult objects too unless
--skip-difficult).

Writes --out (its folder is created if missing): "image_root" = ROOT/JPEGImages (relative to --out's
folder when possible) and "ID.jpg" entries under it; with --val-fraction F (0 < F < 1) a seeded draw
(--seed) of round(F x N) images goes to OUT's sibling `<stem>_val.json` and the rest to --out
(disjoint by image). Refuses with one line on stderr and exit 2: a missing split file, a per-class split
(`dog_trainval`: ids with -1 / 0 / 1, negatives included; import a main split), an unreadable
or malformed XML (file, line and column named), an <object> without <name>, an id that resolves
outside ROOT, object names outside the classes, missing images (how many, the first named;
--skip-missing drops them and says how many) and an import with 0 images (nothing written).
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhe_scale.data.multilabel_import import Record, check_images, write_splits  # noqa: E402
from mhe_scale.data.safe_paths import resolve_under  # noqa: E402

VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def voc_to_multilabel(root: str | os.PathLike, split: str,
                      skip_difficult: bool = False) -> tuple[list[Record], list[str]]:
    """([("ID.jpg" under ROOT/JPEGImages, sorted object names)], where each came from) of one VOC split."""
    root = Path(root)
    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise FileNotFoundError(f"{ids_file} does not exist; is {root} a VOC year folder (Annotations/, "
                                "ImageSets/Main/, JPEGImages/)?")
    try:
        lines = ids_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{ids_file}: not UTF-8 text ({err.reason} at byte {err.start}); one image id per line") from None
    images: list[Record] = []
    wheres: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        image_id = fields[0]
        where = f"{ids_file}:{number}"
        if len(fields) == 2 and fields[1] in ("-1", "0", "1"):
            raise ValueError(f"{where}: {line.strip()!r} is a per-class line (image id and -1 / 0 / 1): {ids_file.name} "
                             "lists the negatives of one class too; import a main split (train, val, trainval, "
                             "test): the labels come from the annotations")
        xml = resolve_under(root / "Annotations", f"{image_id}.xml", where)
        try:
            tree = ET.parse(xml)
        except ET.ParseError as err:  # its text names the line and column
            raise ValueError(f"{xml}: malformed XML ({err}); listed at {where}") from None
        except OSError as err:
            raise ValueError(f"{where}: cannot read {xml} ({err.strerror or err})") from None
        names = set()
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise ValueError(f"{xml}: an <object> has no <name>")
            if skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
                continue
            names.add(name)
        images.append((f"{image_id}.jpg", sorted(names)))
        wheres.append(where)
    return images, wheres


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a VOC year folder, e.g. VOCdevkit/VOC2007")
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--out", required=True)
    parser.add_argument("--classes", default=None, help="comma-separated class names (default: the 20 VOC classes)")
    parser.add_argument("--skip-difficult", action="store_true")
    parser.add_argument("--skip-missing", action="store_true", help="drop images that do not exist (and count them)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="hold out this fraction of the images in OUT's sibling <stem>_val.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --val-fraction draw")
    args = parser.parse_args(argv)
    classes = args.classes.split(",") if args.classes else VOC_CLASSES
    jpegs = Path(args.root) / "JPEGImages"
    try:
        images, wheres = voc_to_multilabel(args.root, args.split, args.skip_difficult)
        unknown = sorted({n for _, names in images for n in names} - set(classes))
        if unknown:  # name the first annotation holding one, as the other refusals do
            (rel, names), where = next((r, w) for r, w in zip(images, wheres) if set(r[1]) - set(classes))
            xml = Path(args.root) / "Annotations" / f"{Path(rel).stem}.xml"
            raise ValueError(f"{xml}: object names {sorted(set(names) - set(classes))} not in the classes (listed "
                             f"at {where}; split {args.split} has {len(unknown)} such: {unknown[:5]}); pass "
                             "--classes with them")
        images, missing = check_images(jpegs, images, wheres, args.skip_missing)
        if missing:
            print(f"warning: {missing} of {len(images) + missing} images of split {args.split} do not exist in "
                  f"{jpegs}; dropped (--skip-missing)", file=sys.stderr)
        written = write_splits(args.out, classes, jpegs, images, args.val_fraction, args.seed)
    except (ValueError, FileNotFoundError) as err:  # PathEscapeError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, count in written.values():
        print(f"{path}: {count} images, {len(classes)} classes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
