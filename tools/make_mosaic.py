"""Deterministic multi-label benchmark data: 2x2 mosaics of real CIFAR-10 tiles, in the JSON format.

    python tools/make_mosaic.py ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz OUT \
        [--train 2000 --val 500 --test 1000 --tiles-per-class 400 --seed 0]

Each mosaic is a 64x64 PNG of 4 CIFAR-10 tiles (32x32); its label set is the set of its tiles'
classes (1-4 labels). Co-occurrence prior: the first tile's class is uniform; each other tile comes
from the same super-class (vehicles: airplane, automobile, ship, truck; animals: the other six)
with probability --same-group (0.7), else from any class. train and val mosaics use disjoint
pools of CIFAR-10 train tiles (val: held out, for thresholds), test mosaics CIFAR-10 test tiles.
Writes OUT/{train,val,test}.json and OUT/images/<split>/NNNNNN.png; same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from mhe_scale.data.multilabel_json import write_multilabel_json

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
VEHICLES = {"airplane", "automobile", "ship", "truck"}


def read_tiles(archive: str | Path, per_class: dict[str, int]) -> dict[str, dict[str, list[np.ndarray]]]:
    """{split: {class: [uint8 [32, 32, 3]] in file-name order}}, the first per_class[split] of each class."""
    tiles: dict[str, dict[str, list[tuple[str, np.ndarray]]]] = {s: {c: [] for c in CLASSES} for s in per_class}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] not in per_class or parts[1] not in tiles[parts[0]]:
                continue
            split, name = parts[0], parts[1]
            if len(tiles[split][name]) >= per_class[split] * 2:  # archive order may differ from name order
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            tiles[split][name].append((parts[2], np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    out = {s: {c: [a for _, a in sorted(v)[: per_class[s]]] for c, v in d.items()} for s, d in tiles.items()}
    for s, d in out.items():
        short = [c for c, v in d.items() if len(v) < per_class[s]]
        if short:
            raise ValueError(f"{archive}: split {s} has fewer than {per_class[s]} images of {short}")
    return out


def draw_classes(rng: np.random.Generator, same_group: float) -> list[int]:
    """The 4 tile classes of one mosaic under the co-occurrence prior (module docstring)."""
    first = int(rng.integers(len(CLASSES)))
    group = [i for i, c in enumerate(CLASSES) if (c in VEHICLES) == (CLASSES[first] in VEHICLES)]
    return [first] + [int(rng.choice(group)) if rng.random() < same_group else int(rng.integers(len(CLASSES)))
                      for _ in range(3)]


def make_split(pool: dict[str, list[np.ndarray]], count: int, rng: np.random.Generator, same_group: float,
               folder: Path, rel: str) -> list[tuple[str, list[str]]]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for n in range(count):
        classes = draw_classes(rng, same_group)
        tiles = [pool[CLASSES[c]][int(rng.integers(len(pool[CLASSES[c]])))] for c in classes]
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        name = f"{n:06d}.png"
        Image.fromarray(mosaic).save(folder / name, optimize=False)
        images.append((f"{rel}/{name}", sorted({CLASSES[c] for c in classes})))
    return images


def make_mosaics(archive: str | Path, out: str | Path, train: int = 2000, val: int = 500, test: int = 1000,
                 tiles_per_class: int = 400, same_group: float = 0.7, seed: int = 0) -> dict[str, Path]:
    """Write the three splits (module docstring); returns {split: json path}."""
    out = Path(out)
    tiles = read_tiles(archive, {"train": 2 * tiles_per_class, "test": tiles_per_class})
    pools = {"train": {c: v[:tiles_per_class] for c, v in tiles["train"].items()},
             "val": {c: v[tiles_per_class:] for c, v in tiles["train"].items()}, "test": tiles["test"]}
    paths = {}
    for i, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
        rng = np.random.default_rng([seed, i])
        images = make_split(pools[split], count, rng, same_group, out / "images" / split, f"images/{split}")
        paths[split] = write_multilabel_json(out / f"{split}.json", CLASSES, images)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", help="cifar10-jpeg.tar.gz (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg)")
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--tiles-per-class", type=int, default=400)
    parser.add_argument("--same-group", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_mosaics(args.archive, args.out, args.train, args.val, args.test, args.tiles_per_class,
                         args.same_group, args.seed)
    print(" ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
