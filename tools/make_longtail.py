"""Write long-tailed subsets as list files (`relative/path label`, data.format=list).

    # Kang et al. 2021 LT0 ... LT of an ImageNet train folder (+ a balanced 20-per-class val split)
    python tools/make_longtail.py imagenet --folder /data/imagenet/train --out lists/imagenet_lt \
        [--test-folder /data/imagenet/val] [--reference-counts ImageNet_LT_train.txt] [--val-per-class 20]
    # CIFAR-10-LT (Cao et al. 2019), imbalance ratios 10 and 100, from the real archive
    python tools/make_longtail.py cifar10 --archive ../shared/data/cifar10-jpeg/cifar10-jpeg.tar.gz \
        --out lists/cifar10_lt [--ratios 10 100] [--val-per-class 0]

imagenet: lists LT0.txt, LT2.txt, ..., LT8.txt, LT.txt, val.txt (paths relative to --folder; use
data.root=--folder), and test.txt, ood_probe_test.txt from --test-folder (paths relative to it; use
data.test_root=--test-folder: a reader refuses paths that leave their root). cifar10: the images the
subsets use are copied out of the archive into OUT/images/{train,test}/<class>/<file> (data.root =
OUT/images; a member name that would land outside it is refused), lists r10.txt, r100.txt, test.txt
(+ val.txt with --val-per-class). Both also write the
out-of-distribution split (Kang et al. Sec. 4.3): half the classes for pre-training
(ood_<subset>_pretrain.txt, labels renumbered 0..), the other half for the probe
(ood_probe_train.txt: that half's balanced training images, ood_probe_test.txt), and summary.json
(counts per class of every list, the classes of each half, the root of each list). Everything is a
function of --seed. --reference-counts reads only the labels of its list (its paths are not opened).
Refusals (a bad folder, list or archive) are one line on stderr, exit 2; the output folder is created.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhe_scale.data.longtail import (KANG_TABLE, balanced_holdout, counts_from_labels, exponential_counts,  # noqa: E402
                                     imagenet_lt_reference, kang_counts, nested_subsets, ood_class_split, power_counts,
                                     reference_labels)
from mhe_scale.data.safe_paths import resolve_under  # noqa: E402


def write_list(path: Path, names: list[str], labels: np.ndarray, indices: np.ndarray,
               relabel: dict[int, int] | None = None) -> dict:
    """One `relative/path label` line per index -> {"images": N, "per_class": [...]}."""
    lab = labels[indices] if relabel is None else np.array([relabel[int(y)] for y in labels[indices]], dtype=np.int64)
    with open(path, "w", encoding="utf-8") as f:
        for i, y in zip(indices, lab):
            f.write(f"{names[int(i)]} {int(y)}\n")
    return {"images": int(len(indices)), "per_class": counts_from_labels(lab).tolist()}


def assign_by_availability(counts: np.ndarray, available: np.ndarray, seed: int) -> np.ndarray:
    """Give the counts [C] to classes: largest count first, each to a random class (seeded) among those
    not yet given one that hold at least that many images. Raises when none can."""
    rng = np.random.default_rng([seed, 5])
    out = np.zeros(len(counts), dtype=np.int64)
    free = np.ones(len(counts), dtype=bool)
    for n in np.sort(counts)[::-1]:
        ok = np.flatnonzero(free & (available >= n))
        if len(ok) == 0:
            raise ValueError(f"no class left with {int(n)} images (most available: {int(available[free].max())}); "
                             "lower --val-per-class or give reference counts that fit the folder")
        c = ok[rng.integers(len(ok))]
        out[c], free[c] = n, False
    return out


def write_all(out: Path, names: list[str], labels: np.ndarray, subsets: dict[str, np.ndarray],
              val: np.ndarray | None, pool: np.ndarray, test_names: list[str] | None, test_labels: np.ndarray | None,
              seed: int, ood_subset: str) -> dict:
    """Write every list of the module docstring; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"seed": seed, "lists": {}}
    for name, idx in subsets.items():
        summary["lists"][f"{name}.txt"] = write_list(out / f"{name}.txt", names, labels, idx)
    if val is not None and len(val):
        summary["lists"]["val.txt"] = write_list(out / "val.txt", names, labels, val)
    if test_names is not None:
        summary["lists"]["test.txt"] = write_list(out / "test.txt", test_names, test_labels, np.arange(len(test_names)))
    num_classes = int(labels.max()) + 1
    seen, unseen = ood_class_split(num_classes, seed)
    summary["ood"] = {"pretrain_classes": seen.tolist(), "probe_classes": unseen.tolist()}
    to_seen = {int(c): i for i, c in enumerate(seen)}
    to_unseen = {int(c): i for i, c in enumerate(unseen)}
    lt = subsets[ood_subset]
    pre = lt[np.isin(labels[lt], seen)]
    summary["lists"][f"ood_{ood_subset}_pretrain.txt"] = write_list(out / f"ood_{ood_subset}_pretrain.txt", names,
                                                                    labels, pre, to_seen)
    # the probe's training images: the unseen half of the pool, balanced (the smallest class's count each)
    probe_pool = pool[np.isin(labels[pool], unseen)]
    per = int(counts_from_labels(labels[probe_pool], num_classes)[unseen].min())
    probe = nested_subsets(labels[probe_pool], {"probe": np.where(np.isin(np.arange(num_classes), unseen), per, 0)},
                           seed + 17)["probe"]
    summary["lists"]["ood_probe_train.txt"] = write_list(out / "ood_probe_train.txt", names, labels,
                                                         probe_pool[probe], to_unseen)
    if test_names is not None:
        t = np.flatnonzero(np.isin(test_labels, unseen))
        summary["lists"]["ood_probe_test.txt"] = write_list(out / "ood_probe_test.txt", test_names, test_labels, t,
                                                            to_unseen)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def folder_index(root: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """ROOT/<class>/<image> -> (relative paths, labels [N], class names); classes sorted."""
    from mhe_scale.data.image_folder import folder_records

    records = folder_records(root)
    names = [os.path.relpath(records.path(i), root) for i in range(len(records))]
    return names, records.labels, records.classes or []


def make_imagenet(args: argparse.Namespace) -> dict:
    names, labels, classes = folder_index(Path(args.folder))
    val_idx, pool = balanced_holdout(labels, args.val_per_class, args.seed) if args.val_per_class else \
        (np.zeros(0, np.int64), np.arange(len(labels)))
    if args.reference_counts:
        ref_labels = reference_labels(args.reference_counts)
        if len(ref_labels) and ref_labels.max() >= len(classes):
            record = int(np.flatnonzero(ref_labels >= len(classes))[0])
            raise ValueError(f"{args.reference_counts}: record {record + 1} (blank lines not counted) has label "
                             f"{int(ref_labels[record])}, outside the "
                             f"{len(classes)} class folders of {args.folder}; the reference must use the same classes")
        ref = counts_from_labels(ref_labels, len(classes))
        if (ref <= 0).any():
            raise ValueError(f"{args.reference_counts}: class {int(np.flatnonzero(ref <= 0)[0])} has no image; "
                             f"the reference needs a count for each of the {len(classes)} classes")
    else:
        ref = imagenet_lt_reference()[:len(classes)] if len(classes) >= 1000 else None
        if ref is None:
            raise ValueError(f"{args.folder} has {len(classes)} classes; the ImageNet-LT stand-in needs 1000 "
                             "(pass --reference-counts for other folders)")
    available = counts_from_labels(labels[pool], len(classes))
    # one class order for every subset: n^(a/10) keeps the reference's order, so assign the LT counts
    base = assign_by_availability(power_counts(ref, 10), available, args.seed)
    order = np.argsort(-base, kind="stable")
    counts = {}
    for name in KANG_TABLE:
        per = np.sort(kang_counts(ref, name))[::-1]
        counts[name] = np.empty(len(classes), dtype=np.int64)
        counts[name][order] = per
    picked = nested_subsets(labels[pool], counts, args.seed)
    subsets = {k: pool[v] for k, v in picked.items()}
    test_names = test_labels = None
    if args.test_folder:
        tn, test_labels, test_classes = folder_index(Path(args.test_folder))
        if test_classes != classes:
            raise ValueError(f"--test-folder {args.test_folder} has other class folders than --folder {args.folder}")
        test_names = tn  # relative to --test-folder (data.test_root), not ../ from --folder
    summary = write_all(Path(args.out), names, labels, subsets, val_idx, pool, test_names, test_labels, args.seed, "LT")
    summary["roots"] = {"data.root": os.path.abspath(args.folder)}
    if args.test_folder:
        summary["roots"]["data.test_root"] = os.path.abspath(args.test_folder)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def read_archive(path: Path, keep) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Members <split>/<class>/<file> of the archive -> per split [(class, member name)] in archive
    order, and the sorted class names; `keep(split, class, name, data)` is called for every image."""
    per_split: dict[str, list[tuple[str, str]]] = {}
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if not member.isfile() or len(parts) != 3:
                continue
            name = "/".join(parts)  # "./train/a/x.jpg" and "/train/a/x.jpg" both -> train/a/x.jpg
            if ".." in parts:
                raise ValueError(f"{path}: member {member.name!r} has a '..' component; expected "
                                 "<split>/<class>/<file> names")
            per_split.setdefault(parts[0], []).append((parts[1], name))
            keep(parts[0], parts[1], name, tar.extractfile(member).read())
    classes = sorted({c for items in per_split.values() for c, _ in items})
    return per_split, classes


def make_cifar(args: argparse.Namespace) -> dict:
    out, images = Path(args.out), Path(args.out) / "images"
    blobs: dict[str, bytes] = {}
    per_split, classes = read_archive(Path(args.archive), lambda s, c, n, data: blobs.__setitem__(n, data))
    if "train" not in per_split or "test" not in per_split:
        raise ValueError(f"{args.archive}: expected train/ and test/ splits, found {sorted(per_split)}")
    ids = {c: i for i, c in enumerate(classes)}
    names = [n for _, n in per_split["train"]]
    labels = np.array([ids[c] for c, _ in per_split["train"]], dtype=np.int64)
    val_idx, pool = balanced_holdout(labels, args.val_per_class, args.seed) if args.val_per_class else \
        (np.zeros(0, np.int64), np.arange(len(labels)))
    n_max = int(counts_from_labels(labels[pool], len(classes)).min())
    counts = {f"r{r:g}": exponential_counts(n_max, r, len(classes)) for r in args.ratios}
    subsets = {k: pool[v] for k, v in nested_subsets(labels[pool], counts, args.seed).items()}
    test_names = [n for _, n in per_split["test"]]
    test_labels = np.array([ids[c] for c, _ in per_split["test"]], dtype=np.int64)
    used = set(np.concatenate([*subsets.values(), val_idx]).tolist())
    for i in sorted(used):
        dest = resolve_under(images, names[i], f"{args.archive}: member {names[i]}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(blobs[names[i]])
    for n in test_names:
        dest = resolve_under(images, n, f"{args.archive}: member {n}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(blobs[n])
    probe_extra = np.flatnonzero(np.isin(labels, ood_class_split(len(classes), args.seed)[1]))
    for i in probe_extra:  # the probe's balanced training images of the unseen half
        dest = resolve_under(images, names[i], f"{args.archive}: member {names[i]}")
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(blobs[names[i]])
    summary = write_all(out, names, labels, subsets, val_idx, pool, test_names, test_labels, args.seed,
                        f"r{max(args.ratios):g}")
    summary["classes"] = classes
    summary["roots"] = {"data.root": os.path.abspath(images)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="preset", required=True)
    im = sub.add_parser("imagenet", help="Kang et al. LT0 ... LT subsets of an ImageNet train folder")
    im.add_argument("--folder", required=True)
    im.add_argument("--test-folder")
    im.add_argument("--reference-counts", help="a list file (e.g. ImageNet_LT_train.txt) whose per-class counts "
                                               "replace the stand-in reference")
    im.add_argument("--val-per-class", type=int, default=20)
    ci = sub.add_parser("cifar10", help="CIFAR-10-LT (Cao et al. 2019) from the cifar10-jpeg archive")
    ci.add_argument("--archive", required=True)
    ci.add_argument("--ratios", type=float, nargs="+", default=[10.0, 100.0])
    ci.add_argument("--val-per-class", type=int, default=0)
    for p in (im, ci):
        p.add_argument("--out", required=True)
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        summary = make_imagenet(args) if args.preset == "imagenet" else make_cifar(args)
    except (ValueError, OSError, tarfile.TarError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, info in summary["lists"].items():
        per = [n for n in info["per_class"] if n > 0]
        print(f"{name:28s} {info['images']:>8,} images  max {max(per):>5}  min {min(per):>5}")
    print(" ".join(f"{key}={root}" for key, root in summary["roots"].items()) + " (the lists' roots)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
