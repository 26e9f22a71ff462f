"""Instance-classification lists from the CIFAR-10 archive: every training image is its own class.

    python tools/make_instance_lists.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz OUT --per-class 50

Takes the first --per-class images (by file name) of every class of the archive's train split, writes
them under OUT/images/train/<class>/<file> and OUT/train<N>.txt in the `list` format of the image tasks
('relative/path label', label = line number, lines in path order): N = 10 x per-class classes. The
same list serves as the test list (scored on the un-augmented images). The closest real case here of a
face-like softmax over many classes: docs/benchmarks.md, "Row-sparse vs dense head updates" (accuracy).
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive")
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args(argv)
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    with tarfile.open(args.archive) as tar:
        members = {}
        for member in tar:
            parts = member.name.strip("./").split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "train":
                members.setdefault(parts[1], []).append(member)
        chosen = [m for cls in sorted(members) for m in sorted(members[cls], key=lambda m: m.name)[:args.per_class]]
        for member in chosen:
            dst = args.out / "images" / member.name.strip("./")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(member).read())
    paths = sorted(m.name.strip("./") for m in chosen)
    list_file = args.out / f"train{len(paths)}.txt"
    list_file.write_text("".join(f"{p} {i}\n" for i, p in enumerate(paths)))
    print(f"{list_file}: {len(paths):,} images = {len(paths):,} classes; images under {args.out / 'images'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
