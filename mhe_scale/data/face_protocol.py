"""Identity-disjoint face protocols from an identity-folder set (IMAGES/<identity>/<image>).

make_face_protocol(images, out, ...) writes, from one seeded split of the identities:
- train.rec / .idx / .lst: the training identities in insightface's RecordIO layout (what the face
  task reads as data.path; labels = position of the identity in the sorted training names);
- verification.bin: LFW-style pairs of the other identities in insightface's .bin layout
  (mhe_scale/data/face_bin.py; tools/eval_verification.py and eval.verification read it), and
  pairs.tsv naming the two images of each pair;
- IJBC/: IJB-style templates of the same verification identities in the layout tools/eval_ijb.py
  reads (mhe_scale/eval/ijb.py: meta/ + loose_crop/): faces, landmarks, 1:1 template pairs, two
  1:N galleries and the mixed probes;
- protocol.json: the arguments, both identity lists and the counts.

Rules (all draws from numpy's default_rng seeded with [seed, stage]):
- split: the sorted identity names are permuted; the first num_train are the training identities.
- pairs (LFW View 2's shape): the verification identities are dealt into `folds` identity-disjoint
  folds (permuted, then round-robin). Fold f holds k genuine pairs (two images of one identity, drawn
  without replacement from all such pairs of the fold) then k impostor pairs (images of two
  identities of the fold, drawn uniformly without replacement), with the same k in every fold:
  k = min(pairs_per_fold, the fewest genuine pairs of any fold, the fewest impostor pairs of any
  fold); the file holds 2 * k * folds pairs, fold by fold, as verification.py's contiguous folds expect.
- templates: an identity's images are permuted and split into max(1, n // template_size) templates
  of as equal size as possible (template_size to 2 * template_size - 1 images; one template when n <
  2 * template_size). Every image is its own media; landmarks are the ArcFace template points (the
  crops are aligned), detector score 1.
- 1:1: every pair of templates (label 1 when they share the identity); when there are more impostor
  pairs than max_impostor_pairs, that many are drawn uniformly without replacement.
- 1:N: the verification identities are split in two halves (G1, G2); an identity's first template is
  its gallery template, its other templates are probes (ijbc_1N_probe_mixed.csv), so every probe is
  mated in one gallery and non-mated in the other (open-set, as IJB-C's G1 / G2).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhe_scale.data.face_bin import write_face_bin
from mhe_scale.data.face_dataset import list_image_folder, pack_image_folder
from mhe_scale.eval.align import ARCFACE_TEMPLATE
from mhe_scale.eval.ijb import meta_paths


class ProtocolError(ValueError):
    """A folder or argument a protocol cannot be made from; the message names it and the fix."""


@dataclass(frozen=True)
class PairSet:
    """LFW-style pairs: image indices first, second [P], issame bool [P], fold [P]; P = 2 * k * folds."""

    first: np.ndarray
    second: np.ndarray
    issame: np.ndarray
    fold: np.ndarray
    per_fold: int
    """k: genuine (and impostor) pairs per fold."""


@dataclass(frozen=True)
class Templates:
    """IJB-style templates: template id [M] of each image (1-based), subject [T] of template t + 1."""

    template: np.ndarray
    subject: np.ndarray


def split_identities(num_identities: int, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded identity-disjoint split of 0..n-1 -> (training ids sorted [num_train], the others sorted)."""
    if not 1 <= num_train < num_identities:
        raise ProtocolError(f"num_train={num_train}: need 1 <= num_train < {num_identities} (the identities in "
                            f"the folder), so that both sides hold identities")
    perm = np.random.default_rng([seed, 0]).permutation(num_identities)
    return np.sort(perm[:num_train]), np.sort(perm[num_train:])


def _genuine_candidates(owner: np.ndarray, members: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, of images of one identity among identity ids `members` -> int64 [G, 2]."""
    out = []
    for m in members:
        idx = np.flatnonzero(owner == m)
        i, j = np.triu_indices(len(idx), 1)
        out.append(np.stack([idx[i], idx[j]], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _impostor_count(owner: np.ndarray, members: np.ndarray) -> int:
    counts = np.array([(owner == m).sum() for m in members], dtype=np.int64)
    return int((counts.sum() ** 2 - (counts ** 2).sum()) // 2)


def _draw_impostors(owner: np.ndarray, members: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct unordered impostor pairs among the images of `members`, uniform -> int64 [k, 2] (i < j).

    Ordered pairs of two uniform images; same-identity pairs and repeats are dropped (so every impostor
    pair is equally likely), and the draw repeated until k."""
    idx = np.flatnonzero(np.isin(owner, members))
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < k:
        n = 2 * (k - len(chosen)) + 16
        for x, y in zip(idx[rng.integers(0, len(idx), n)].tolist(), idx[rng.integers(0, len(idx), n)].tolist()):
            if owner[x] != owner[y]:
                chosen.setdefault((min(x, y), max(x, y)), None)
                if len(chosen) == k:
                    break
    return np.array(list(chosen), dtype=np.int64).reshape(k, 2)


def lfw_pairs(owner: np.ndarray, folds: int = 10, pairs_per_fold: int = 300, seed: int = 0) -> PairSet:
    """owner [M]: identity id of each verification image -> identity-disjoint LFW-style pairs (module rules)."""
    ids = np.unique(owner)
    if len(ids) < 2 * folds:
        raise ProtocolError(f"{len(ids)} verification identities cannot fill {folds} identity-disjoint folds with "
                            f"impostor pairs (need >= {2 * folds}); train on fewer identities or use fewer folds")
    rng = np.random.default_rng([seed, 1])
    dealt = rng.permutation(ids)
    members = [np.sort(dealt[f::folds]) for f in range(folds)]
    genuine = [_genuine_candidates(owner, m) for m in members]
    k = min(pairs_per_fold, *(len(g) for g in genuine), *(_impostor_count(owner, m) for m in members))
    if k < 1:
        raise ProtocolError(f"a fold has no genuine pair (its identities have one image each); need identities "
                            f"with >= 2 images in every one of the {folds} folds")
    first, second, same, fold = [], [], [], []
    for f in range(folds):
        g = genuine[f][np.sort(rng.choice(len(genuine[f]), k, replace=False))]
        imp = _draw_impostors(owner, members[f], k, rng)
        pairs = np.concatenate([g, imp])
        first.append(pairs[:, 0]), second.append(pairs[:, 1])
        same.append(np.repeat([True, False], k)), fold.append(np.full(2 * k, f))
    return PairSet(np.concatenate(first), np.concatenate(second), np.concatenate(same), np.concatenate(fold), k)


def make_templates(owner: np.ndarray, template_size: int = 4, seed: int = 0) -> Templates:
    """owner [M] identity id per image -> templates (module rules), numbered 1.. in identity order."""
    if template_size < 1:
        raise ProtocolError(f"template_size={template_size}: a template needs at least 1 image")
    rng = np.random.default_rng([seed, 2])
    template = np.zeros(len(owner), dtype=np.int64)
    subject, next_id = [], 1
    for m in np.unique(owner):
        idx = rng.permutation(np.flatnonzero(owner == m))
        for part in np.array_split(idx, max(1, len(idx) // template_size)):
            template[part] = next_id
            subject.append(m)
            next_id += 1
    return Templates(template, np.asarray(subject, dtype=np.int64))


def template_pairs(subject: np.ndarray, max_impostor_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Templates' subjects [T] -> (template id pairs [Q, 2] (1-based, t1 < t2), labels int [Q]): every
    genuine pair, every impostor pair or max_impostor_pairs of them drawn uniformly."""
    i, j = np.triu_indices(len(subject), 1)
    label = (subject[i] == subject[j]).astype(np.int64)
    imp = np.flatnonzero(label == 0)
    if len(imp) > max_impostor_pairs:
        keep = label == 1
        keep[np.random.default_rng([seed, 3]).choice(imp, max_impostor_pairs, replace=False)] = True
        i, j, label = i[keep], j[keep], label[keep]
    return np.stack([i + 1, j + 1], 1), label


def gallery_probe(subject: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Templates' subjects [T] -> (G1 template ids, G2 template ids, probe template ids), 1-based (module rules)."""
    ids = np.unique(subject)
    half = np.random.default_rng([seed, 4]).permutation(ids)[: len(ids) // 2]
    tid = np.arange(1, len(subject) + 1)
    first = np.r_[True, subject[1:] != subject[:-1]]  # templates are numbered identity by identity
    in_g1 = np.isin(subject, half)
    return tid[first & in_g1], tid[first & ~in_g1], tid[~first]


def _check_names(root: Path, relative: list[str]) -> None:
    for name in relative:
        if any(c.isspace() for c in name):
            raise ProtocolError(f"{root / name}: white space in an identity or file name breaks the IJB and .lst "
                                f"layouts (whitespace-separated columns); rename it")


def _write_csv(path: Path, tids: np.ndarray, subject_of: np.ndarray, names: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["TEMPLATE_ID", "SUBJECT_ID", "FILENAME"])
        for t in tids:
            for name in names[t - 1]:
                w.writerow([int(t), int(subject_of[t - 1]), name])


def _write_ijb(base: Path, root: Path, relative: list[str], tpl: Templates, max_impostor_pairs: int,
               seed: int) -> dict[str, int]:
    paths = meta_paths(base / "IJBC", "IJBC")  # base/IJBC/meta/..., base/IJBC/loose_crop/...
    paths["faces"].parent.mkdir(parents=True)
    for name in relative:
        dest = paths["images"] / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / name, dest)
    media = np.arange(1, len(relative) + 1)
    paths["faces"].write_text("".join(f"{n} {t} {m}\n" for n, t, m in zip(relative, tpl.template, media)))
    points = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.reshape(-1).tolist())
    paths["landmarks"].write_text("".join(f"{n} {points} 1.0\n" for n in relative))
    pairs, label = template_pairs(tpl.subject, max_impostor_pairs, seed)
    paths["pairs"].write_text("".join(f"{a} {b} {c}\n" for (a, b), c in zip(pairs.tolist(), label.tolist())))
    g1, g2, probes = gallery_probe(tpl.subject, seed)
    per_template: list[list[str]] = [[] for _ in tpl.subject]
    for n, t in zip(relative, tpl.template):
        per_template[t - 1].append(n)
    subject_id = tpl.subject + 1  # SUBJECT_ID: verification identity position + 1
    for key, tids in (("G1", g1), ("G2", g2), ("probes", probes)):
        _write_csv(paths[key], tids, subject_id, per_template)
    return {"templates": len(tpl.subject), "template_pairs": len(label), "genuine_template_pairs": int(label.sum()),
            "gallery_G1": len(g1), "gallery_G2": len(g2), "probes": len(probes)}


def make_face_protocol(images: str | os.PathLike, out: str | os.PathLike, *, num_train: int | None = None,
                       train_fraction: float | None = None, seed: int = 0, folds: int = 10,
                       pairs_per_fold: int = 300, template_size: int = 4, max_impostor_pairs: int = 1_000_000,
                       progress: bool = False) -> dict:
    """Write the protocol files of the module docstring into `out` (a new folder, made atomically) -> the
    protocol.json record. Exactly one of num_train / train_fraction (rounded, at least 1)."""
    root, out = Path(images), Path(out)
    if out.exists():
        raise ProtocolError(f"{out} exists; choose a new output folder (nothing is overwritten)")
    try:
        paths, labels, names = list_image_folder(root)
    except (FileNotFoundError, ValueError) as err:
        raise ProtocolError(str(err)) from None
    if (num_train is None) == (train_fraction is None):
        raise ProtocolError("give exactly one of num_train (--train-identities) and train_fraction (--train-fraction)")
    if train_fraction is not None:
        if not 0 < train_fraction < 1:
            raise ProtocolError(f"train_fraction={train_fraction}: must lie strictly between 0 and 1")
        num_train = max(1, round(train_fraction * len(names)))
    relative = [p.relative_to(root).as_posix() for p in paths]
    _check_names(root, relative)
    train_ids, verify_ids = split_identities(len(names), num_train, seed)
    is_verify = np.isin(labels, verify_ids)
    v_rel = [r for r, v in zip(relative, is_verify) if v]
    owner = np.searchsorted(verify_ids, labels[is_verify])  # verification identity position of each image
    pairs = lfw_pairs(owner, folds, pairs_per_fold, seed)
    tpl = make_templates(owner, template_size, seed)
    tmp = out.parent / f".{out.name}.tmp{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        train_names = [names[i] for i in train_ids]
        packed = pack_image_folder(root, tmp / "train", header=True, pass_through=True, progress=progress,
                                   identities=train_names)
        blobs = {i: (root / v_rel[i]).read_bytes() for i in np.unique(np.r_[pairs.first, pairs.second]).tolist()}
        write_face_bin(tmp / "verification.bin", [blobs[i] for ab in zip(pairs.first.tolist(), pairs.second.tolist())
                                                  for i in ab], pairs.issame)
        (tmp / "pairs.tsv").write_text("fold\tissame\timage1\timage2\n" + "".join(
            f"{f}\t{int(s)}\t{v_rel[a]}\t{v_rel[b]}\n" for f, s, a, b in zip(pairs.fold, pairs.issame, pairs.first,
                                                                               pairs.second)))
        ijb = _write_ijb(tmp, root, v_rel, tpl, max_impostor_pairs, seed)
        record = {
            "source": str(root), "seed": seed, "folds": folds, "pairs_per_fold_asked": pairs_per_fold,
            "template_size": template_size, "max_impostor_pairs": max_impostor_pairs,
            "train": {"identities": len(train_ids), "images": packed.num_images, "rec": "train.rec"},
            "verification": {"identities": len(verify_ids), "images": len(v_rel), "pairs": len(pairs.issame),
                             "genuine_per_fold": pairs.per_fold, "impostors_per_fold": pairs.per_fold,
                             "bin": "verification.bin"},
            "ijb": {"root": ".", "dataset": "IJBC", **ijb},
            "train_identities": train_names, "verification_identities": [names[i] for i in verify_ids],
        }
        (tmp / "protocol.json").write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return record
