"""IJB-B / IJB-C evaluation: metadata readers, feature extraction, template pooling, 1:1 and 1:N metrics.

Layout (insightface's IJB release): ROOT/IJBC/loose_crop/*.jpg and ROOT/IJBC/meta/ with
  ijbc_face_tid_mid.txt           'image_name template_id media_id', one line per face
  ijbc_name_5pts_score.txt        'image_name x1 y1 ... x5 y5 detector_score', same faces
  ijbc_template_pair_label.txt    'template1 template2 label' (1 = same subject), the 1:1 protocol
  ijbc_1N_gallery_G1.csv, _G2.csv, ijbc_1N_probe_mixed.csv   1:N (header TEMPLATE_ID,SUBJECT_ID,...)
IJB-B: the same with 'ijbb_' names and galleries S1 / S2.

Pipeline: face f_i = model(x_i) + model(flip(x_i)), L2-normalised (unless keep_norm), times the
detector score (optional); media feature = mean of its faces within a (template, media); template
feature = L2-normalise(sum of its media). Scores are cosine similarities of template features.
Every reader raises an error naming the file and line it choked on.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def meta_paths(root: str | os.PathLike, dataset: str = "IJBC") -> dict[str, Path]:
    """Paths of the metadata files; root is the folder holding IJBC/ (or the IJBC folder itself)."""
    if dataset not in GALLERIES:
        raise ValueError(f"dataset must be one of {sorted(GALLERIES)}, got {dataset!r}")
    root = Path(root)
    base = root / dataset if (root / dataset).is_dir() else root
    meta, p = base / "meta", dataset.lower()
    g1, g2 = GALLERIES[dataset]
    return {"images": base / "loose_crop", "faces": meta / f"{p}_face_tid_mid.txt",
            "landmarks": meta / f"{p}_name_5pts_score.txt", "pairs": meta / f"{p}_template_pair_label.txt",
            g1: meta / f"{p}_1N_gallery_{g1}.csv", g2: meta / f"{p}_1N_gallery_{g2}.csv",
            "probes": meta / f"{p}_1N_probe_mixed.csv"}


def _locate_bad_line(path: Path, ncols: int, numeric_from: int) -> str:
    """Slow pass over a file that failed the bulk parse -> 'path:line: what is wrong'."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            toks = line.split("#", 1)[0].split() if numeric_from == 0 else line.split()
            if not toks:
                continue
            if len(toks) != ncols:
                return f"{path}:{n}: expected {ncols} fields, got {len(toks)}: {line.strip()!r}"
            try:
                [int(t) if numeric_from == 0 else float(t) for t in toks[numeric_from:]]
            except ValueError:
                return f"{path}:{n}: not a number in {line.strip()!r}"
    return f"{path}: cannot parse the file (no single bad line found)"


def read_int_table(path: str | os.PathLike, ncols: int) -> np.ndarray:
    """Whitespace-separated integers, ncols per line -> int64 [N, ncols] (numpy's C parser)."""
    path = Path(path)
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        raise ValueError(_locate_bad_line(path, ncols, 0)) from None
    if table.shape[1] != ncols:
        raise ValueError(_locate_bad_line(path, ncols, 0) if table.shape[0] else f"{path}: no data lines")
    return table


def read_named_table(path: str | os.PathLike, ncols: int) -> tuple[list[str], np.ndarray]:
    """Lines 'name v1 ... v_{ncols-1}' -> (names [N], float64 values [N, ncols - 1])."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        rows = [line.split() for line in f]
    rows = [r for r in rows if r]
    try:
        if any(len(r) != ncols for r in rows):
            raise ValueError
        values = np.array([r[1:] for r in rows], dtype=np.float64).reshape(len(rows), ncols - 1)
    except ValueError:
        raise ValueError(_locate_bad_line(path, ncols, 1)) from None
    return [r[0] for r in rows], values


def read_faces(path: str | os.PathLike) -> tuple[list[str], Tensor, Tensor]:
    """face_tid_mid file -> (image names [N], template ids [N], media ids [N])."""
    names, v = read_named_table(path, 3)
    if not np.all(v == np.round(v)):
        row = int(np.nonzero((v != np.round(v)).any(1))[0][0])
        raise ValueError(f"{_line_of(path, row)}: template and media ids must be integers")
    ids = torch.from_numpy(v.astype(np.int64))
    return names, ids[:, 0].contiguous(), ids[:, 1].contiguous()


def _line_of(path: str | os.PathLike, row: int) -> str:
    """'path:line' of the row-th (0-based) non-blank line."""
    with open(path, encoding="utf-8") as f:
        n = [i for i, line in enumerate(f, 1) if line.strip()][row]
    return f"{path}:{n}"


def read_landmarks(path: str | os.PathLike) -> tuple[list[str], Tensor, Tensor]:
    """name_5pts_score file -> (image names [N], landmarks float32 [N, 5, 2], detector scores [N])."""
    names, v = read_named_table(path, 12)
    t = torch.from_numpy(v).float()
    return names, t[:, :10].reshape(-1, 5, 2).contiguous(), t[:, 10].contiguous()


def match_rows(names: Sequence[str], other: Sequence[str], other_path: str | os.PathLike) -> Tensor:
    """Row of `other` (e.g. the landmark file's names) for each of names [N] -> LongTensor [N]."""
    if list(names) == list(other):
        return torch.arange(len(names))
    where = {n: i for i, n in enumerate(other)}
    missing = next((n for n in names if n not in where), None)
    if missing is not None:
        raise ValueError(f"{other_path}: no line for image {missing!r} of the faces file; "
                         f"both files must list the same images")
    return torch.tensor([where[n] for n in names], dtype=torch.long)


def read_pairs(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """template_pair_label file -> (template id pairs [P, 2], labels bool [P])."""
    t = read_int_table(path, 3)
    bad = ~np.isin(t[:, 2], (0, 1))
    if bad.any():
        raise ValueError(f"{_line_of(path, int(np.argmax(bad)))}: label must be 0 or 1, got {t[bad][0, 2]}")
    t = torch.from_numpy(t)
    return t[:, :2].contiguous(), t[:, 2].bool()


def read_1n_csv(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """1:N gallery/probe CSV (one row per image) -> (template ids [T], subject ids [T]), sorted by template."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip().upper() for h in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise ValueError(f"{path}:1: header must name TEMPLATE_ID and SUBJECT_ID columns, got {header}")
        it, isub = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        pairs = []
        for row in reader:
            if not row:
                continue
            try:
                pairs.append((int(row[it]), int(row[isub])))
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{reader.line_num}: TEMPLATE_ID and SUBJECT_ID must be integers, "
                                 f"got {row}") from None
    if not pairs:
        raise ValueError(f"{path}: no data rows after the header")
    u = torch.unique(torch.tensor(pairs), dim=0)  # distinct (template, subject)
    clash = u[1:, 0] == u[:-1, 0]
    if bool(clash.any()):
        raise ValueError(f"{path}: template {int(u[1:][clash][0, 0])} has rows with two SUBJECT_IDs; "
                         f"a template belongs to one subject")
    return u[:, 0].contiguous(), u[:, 1].contiguous()


def lookup(keys: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of query ids in sorted unique keys [T] -> (index [Q] clamped, found bool [Q])."""
    pos = torch.searchsorted(keys, query.contiguous()).clamp_(max=max(len(keys) - 1, 0))
    return pos, keys[pos] == query


@torch.inference_mode()
def extract_features(model: nn.Module, faces: Dataset, batch_size: int = 128, device: str = "cpu",
                     flip: bool = True, num_workers: int = 0) -> Tensor:
    """Per-face features f = model(x) + model(flip(x)) (or model(x)) -> float32 [N, D] on the CPU."""
    model = model.eval().to(device)
    out = []
    for x in DataLoader(faces, batch_size=batch_size, num_workers=num_workers):
        x = x.to(device)
        if flip:
            f = model(torch.cat([x, x.flip(3)])).float()
            f = f[: len(x)] + f[len(x):]
        else:
            f = model(x).float()
        out.append(f.cpu())
    return torch.cat(out)


def template_features(faces: Tensor, templates: Tensor, medias: Tensor, scores: Tensor | None = None,
                      keep_norm: bool = False) -> tuple[Tensor, Tensor]:
    """Pool face features [N, D] into templates -> (template ids [T] sorted, features [T, D] unit norm).

    Each face is L2-normalised (unless keep_norm), times its detector score when scores [N] are
    given; faces of one (template, media) are averaged; a template sums its media and is normalised.
    Vectorised: unique(return_inverse) + index_add_, no loop over templates.
    """
    if faces.dim() != 2 or faces.shape[0] != templates.shape[0] or templates.shape != medias.shape:
        raise ValueError(f"need faces [N, D] with templates [N] and medias [N]; got {tuple(faces.shape)}, "
                         f"{tuple(templates.shape)}, {tuple(medias.shape)} (one feature row per face line)")
    f = faces.float() if faces.dtype not in (torch.float32, torch.float64) else faces
    if not keep_norm:
        f = F.normalize(f, dim=1)
    if scores is not None:
        f = f * scores.to(f).unsqueeze(1)
    tm, inv = torch.unique(torch.stack([templates, medias], 1), dim=0, return_inverse=True)  # [M, 2], [N]
    media = f.new_zeros(len(tm), f.shape[1]).index_add_(0, inv, f)
    media /= torch.bincount(inv, minlength=len(tm)).to(f).unsqueeze(1)
    tids, tinv = torch.unique(tm[:, 0], return_inverse=True)
    pooled = f.new_zeros(len(tids), f.shape[1]).index_add_(0, tinv, media)
    return tids, F.normalize(pooled, dim=1)


def score_pairs(feats: Tensor, idx1: Tensor, idx2: Tensor, batch_size: int = 1024, presort: bool = True) -> Tensor:
    """Dot products feats[idx1[p]] . feats[idx2[p]] -> [P], in batches of gathered rows.

    feats [T, D]; idx1, idx2 [P] row indices. presort orders the pairs by idx1 first so that the
    left rows of a batch repeat and stay in cache; scores come back in the input order.
    """
    if idx1.shape != idx2.shape or idx1.dim() != 1:
        raise ValueError(f"idx1 and idx2 must be [P] of the same length, got {tuple(idx1.shape)}, {tuple(idx2.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.sort(idx1, stable=True).indices if presort else None
    i, j = (idx1[order], idx2[order]) if presort else (idx1, idx2)
    out = torch.empty(len(i), dtype=feats.dtype)
    bs = min(batch_size, max(len(i), 1))
    a, b = feats.new_empty(bs, feats.shape[1]), feats.new_empty(bs, feats.shape[1])
    for s in range(0, len(i), bs):  # loop over batches of pairs, not over pairs
        n = min(bs, len(i) - s)
        torch.index_select(feats, 0, i[s:s + n], out=a[:n])
        torch.index_select(feats, 0, j[s:s + n], out=b[:n])
        torch.sum(a[:n].mul_(b[:n]), 1, out=out[s:s + n])
    if presort:
        out = torch.empty_like(out).index_copy_(0, order, out)
    return out


def roc(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ROC over every distinct threshold -> (far, tar, thresholds) [K + 1], starting at (0, 0, +inf).

    far/tar at threshold t: fraction of negatives / positives with score >= t (float64).
    Sort + cumsum; same points as sklearn's roc_curve(drop_intermediate=False).
    """
    labels = labels.bool()
    npos, nneg = int(labels.sum()), int((~labels).sum())
    if npos == 0 or nneg == 0:
        raise ValueError(f"a ROC needs positive and negative pairs, got {npos} positive, {nneg} negative")
    s, order = torch.sort(scores, descending=True)
    lab = labels[order]
    tp, fp = torch.cumsum(lab, 0), torch.cumsum(~lab, 0)
    last = torch.ones_like(lab)
    last[:-1] = s[1:] != s[:-1]  # last position of each group of tied scores
    zero = torch.zeros(1, dtype=torch.float64)
    tar = torch.cat([zero, tp[last].double() / npos])
    far = torch.cat([zero, fp[last].double() / nneg])
    thr = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), s[last].double()])
    return far, tar, thr


def tar_at_far(far: Tensor, tar: Tensor, targets: Sequence[float] = FARS, rule: str = "at_most") -> Tensor:
    """TAR at each target FAR from a ROC (far, tar ascending) -> float64 [len(targets)].

    rule 'at_most': the best TAR whose FAR does not exceed the target (a real operating point).
    rule 'nearest': among the ROC points whose FAR is closest to the target, the highest TAR
    (the published IJB rule: insightface reverses sklearn's roc_curve before taking the first
    nearest point, "select largest tpr at same fpr"); may sit at a FAR slightly above the target.
    """
    t = torch.tensor(list(targets), dtype=torch.float64)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"target FARs must lie in [0, 1], got {list(targets)}")
    if rule == "at_most":
        return tar[torch.searchsorted(far, t, right=True) - 1]
    if rule == "nearest":
        out = []
        for x in t.tolist():  # one pass over the ROC per target
            gap = (far - x).abs()
            out.append(tar[gap == gap.min()].max())
        return torch.stack(out)
    raise ValueError(f"rule must be 'at_most' or 'nearest', got {rule!r}")


def identification(sim: Tensor, probe_subjects: Tensor, gallery_subjects: Tensor, ranks: Sequence[int] = (1, 5, 10),
                   fpirs: Sequence[float] = (0.01, 0.1)) -> dict[str, float]:
    """Closed-set CMC and open-set TPIR@FPIR from a probe x gallery similarity sim [P, G].

    A probe is mated if its subject is in the gallery. A subject's score is the max over its
    gallery templates; a mated probe's rank is the number of gallery subjects scoring >= its
    mate (ties count against it). rank-k = fraction of mated probes with rank <= k.
    Open set: FPIR(t) = fraction of non-mated probes whose top score is >= t; TPIR(t) = fraction of
    mated probes at rank 1 with mate score >= t; TPIR@FPIR=f is the best TPIR with FPIR(t) <= f.
    """
    if not all(0 <= f < 1 for f in fpirs):
        raise ValueError(f"fpirs must lie in [0, 1), got {list(fpirs)}")
    subjects, ginv = torch.unique(gallery_subjects, return_inverse=True)
    subj_scores = sim.new_full((sim.shape[0], len(subjects)), float("-inf"))
    subj_scores.scatter_reduce_(1, ginv.expand_as(sim), sim, "amax")
    pos, mated = lookup(subjects, probe_subjects)
    if not bool(mated.any()):
        raise ValueError("no probe's subject is in the gallery: CMC and TPIR are undefined")
    mate = subj_scores[torch.arange(len(pos)), pos][mated]
    rank = (subj_scores[mated] >= mate.unsqueeze(1)).sum(1)
    out = {f"rank{k}": float((rank <= k).double().mean()) for k in ranks}
    nonmated_top = subj_scores[~mated].max(1).values
    if len(nonmated_top):
        accepted = torch.where(rank == 1, mate, torch.full_like(mate, float("-inf")))
        labels = torch.cat([torch.ones_like(mate, dtype=torch.bool), torch.zeros_like(nonmated_top, dtype=torch.bool)])
        fpir, tpir, _ = roc(torch.cat([accepted, nonmated_top]), labels)
        tp = tar_at_far(fpir, tpir, fpirs, "at_most")
    else:  # every probe is mated: no false-positive rate to set a threshold by
        tp = torch.full((len(fpirs),), float("nan"))
    out.update({f"TPIR@FPIR={f:g}": float(v) for f, v in zip(fpirs, tp)})
    out.update(mated=int(mated.sum()), nonmated=int((~mated).sum()))
    return out
