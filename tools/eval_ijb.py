"""Evaluate a face model on IJB-B / IJB-C: 1:1 verification (TAR@FAR, ROC) and 1:N identification.

    python tools/eval_ijb.py --root /data/IJB_release --dataset IJBC \\
        --model-module my_models.py:build --model-kwargs '{"weights": "backbone.pth"}' --out runs/ijbc
    python tools/eval_ijb.py --root /data/IJB_release --features ijbc_feats.npy --out runs/ijbc

Defaults follow the published IJB protocol (insightface's IJB evaluation, the numbers papers report):
each face feature f = model(x) + model(flip x) keeps its norm (--keep-norm) and is multiplied by its
detector score (--face-score) before media averaging; TAR@FAR is read with --far-rule nearest (the
highest TAR among the ROC points whose FAR is nearest to the target). --no-keep-norm
--no-face-score pools unit-length faces without scores (lower TAR on IJB-C, not comparable with
published tables); --far-rule at_most reads the best TAR whose FAR does not exceed the target.

--root holds IJBC/ (or IJBB/) in insightface's layout (meta/ + loose_crop/; see mhe_scale/eval/ijb.py).
--model-module 'package.module:function' or 'path/to/file.py:function': the function (called with
--model-kwargs) returns an nn.Module mapping aligned faces [B, 3, 112, 112] in [-1, 1] to [B, D];
channels RGB, as this project's face readers feed them in training, or BGR with --channels bgr
(models trained on OpenCV-decoded images).
--features skips extraction: a .npy [N, D] of per-face features (model(x) + model(flip x)) in the
order of the face_tid_mid file; --save-features writes the extracted ones in that format.
Writes to --out: results.json, scores.npy (one score per line of the pair file), roc.png.
Prints TAR@FAR=f as "n/a (needs >= N impostor pairs; has M)" where the pair file holds fewer than
1 / f impostor pairs, and TPIR@FPIR=f likewise for fewer than 1 / f non-mated probes (the rule of
eval_verification.py, eval.verification.far_resolvable); results.json keeps the ROC's value with
the counts ("impostors", "nonmated") beside it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mhe_scale.engine.serialize import atomic_write_text
from mhe_scale.eval.align import AlignedFaces
from mhe_scale.eval.ijb import (FARS, GALLERIES, extract_features, identification, lookup, match_rows, meta_paths,
                                read_1n_csv, read_faces, read_landmarks, read_pairs, roc, score_pairs, tar_at_far,
                                template_features)
from mhe_scale.eval.verification import far_resolvable


def load_model(spec: str, kwargs: dict) -> torch.nn.Module:
    """'pkg.mod:fn' or 'file.py:fn' -> fn(**kwargs)."""
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"--model-module must be 'module:function' or 'file.py:function', got {spec!r}")
    if mod_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        if loader is None or not Path(mod_name).is_file():
            raise ValueError(f"--model-module: no file {mod_name}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise ValueError(f"--model-module: {mod_name} has no function {fn_name!r}")
    return fn(**kwargs)


def face_features(args: argparse.Namespace, paths: dict, names: list[str], need_scores: bool):
    """-> (per-face features [N, D], detector scores [N] or None)."""
    lm = scores = None
    if args.features is None or need_scores:
        lm_names, lm, scores = read_landmarks(paths["landmarks"])
        rows = match_rows(names, lm_names, paths["landmarks"])
        lm, scores = lm[rows], scores[rows]
    if args.features is not None:
        try:  # allow_pickle stays False: an object array is refused, never unpickled
            array = np.load(args.features, allow_pickle=False)
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
                raise ValueError(f"holds {type(array).__name__} {getattr(array, 'dtype', '')}".strip())
            feats = torch.from_numpy(array)
        except (ValueError, OSError, TypeError) as err:  # numpy names no file
            raise ValueError(f"--features {args.features}: not a numeric .npy array ({err}); write it with "
                             "np.save(path, features_float32)") from None
        if feats.dim() != 2 or feats.shape[0] != len(names):
            raise ValueError(f"{args.features}: features must be [{len(names)}, D] (one row per line of "
                             f"{paths['faces']}), got {tuple(feats.shape)}")
    else:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as err:
            raise ValueError(f"--model-kwargs {args.model_kwargs!r}: not JSON ({err}); e.g. "
                             "'{\"weights\": \"b.safetensors\"}'") from None
        if not isinstance(kwargs, dict):
            raise ValueError(f"--model-kwargs {args.model_kwargs!r}: must be a JSON object of keyword arguments")
        model = load_model(args.model_module, kwargs)
        faces = AlignedFaces(paths["images"], names, lm, channels=args.channels)
        feats = extract_features(model, faces, args.batch_size, args.device, not args.no_flip, args.num_workers)
        if args.save_features is not None:
            np.save(args.save_features, feats.numpy())
    return feats, (scores if need_scores else None)


def verification(args: argparse.Namespace, paths: dict, tids: torch.Tensor, tfeats: torch.Tensor) -> dict:
    pairs, labels = read_pairs(paths["pairs"])
    (i, ok1), (j, ok2) = lookup(tids, pairs[:, 0]), lookup(tids, pairs[:, 1])
    if not bool((ok1 & ok2).all()):
        row = int((~(ok1 & ok2)).nonzero()[0])
        raise ValueError(f"{paths['pairs']}:{row + 1}: template {pairs[row].tolist()} not in {paths['faces']}")
    scores = score_pairs(tfeats, i, j, args.pair_batch)
    far, tar, _ = roc(scores, labels)
    tars = tar_at_far(far, tar, FARS, args.far_rule)
    tmp = args.out / f"scores.tmp-{os.getpid()}.npy"
    np.save(tmp, scores.numpy())
    os.replace(tmp, args.out / "scores.npy")  # atomic: a killed run leaves the old file or none
    save_roc_plot(far, tar, tars, args.out / "roc.png", f"{args.dataset} 1:1")
    res = {f"TAR@FAR={f:g}": float(t) for f, t in zip(FARS, tars)}
    res.update(AUC=float(torch.trapezoid(tar, far)), far_rule=args.far_rule, pairs=len(labels),
               genuine=int(labels.sum()), impostors=int((~labels.bool()).sum()))
    return res


def format_row(row: dict) -> str:
    """One results row's floats in percent, 'key value, ...'. TAR@FAR=f (1:1; negatives: the row's
    impostor pairs) and TPIR@FPIR=f (1:N; negatives: its non-mated probes) read 'n/a (needs >= N ...)'
    where the negatives cannot resolve f: eval.verification.far_resolvable, eval_verification's rule
    (results.json keeps the ROC's value)."""
    negatives = {"TAR@FAR=": (row.get("impostors"), "impostor pairs"),
                 "TPIR@FPIR=": (row.get("nonmated"), "non-mated probes")}
    cells = []
    for key, value in row.items():
        if not isinstance(value, float):
            continue
        prefix = next((p for p in negatives if key.startswith(p)), None)
        count, what = negatives.get(prefix, (None, ""))
        target = float(key[len(prefix):]) if prefix else 0.0
        if count is not None and not far_resolvable(count, target):
            cells.append(f"{key} n/a (needs >= {math.ceil(1 / target)} {what}; has {count})")
        else:
            cells.append(f"{key} {100 * value:.2f}")
    return ", ".join(cells)


def save_roc_plot(far: torch.Tensor, tar: torch.Tensor, tars: torch.Tensor, path: Path, title: str) -> None:
    """ROC on a log FAR axis (sampled at 2000 log-spaced FARs: the full curve may have millions of points)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lo = max(float(far[far > 0].min()), 1e-7)
    grid = torch.logspace(np.log10(lo), 0, 2000, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(grid.numpy(), tar_at_far(far, tar, grid.tolist()).numpy(), drawstyle="steps-post", label="ROC")
    ax.plot(FARS, tars.numpy(), "o", label="TAR@FAR")
    ax.set(xscale="log", xlim=(lo, 1), ylim=(0, 1.01), xlabel="FAR", ylabel="TAR", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def identify(args: argparse.Namespace, paths: dict, tids: torch.Tensor, tfeats: torch.Tensor) -> dict:
    def feats_of(csv_key: str) -> tuple[torch.Tensor, torch.Tensor]:
        t, subj = read_1n_csv(paths[csv_key])
        pos, ok = lookup(tids, t)
        if not bool(ok.all()):
            raise ValueError(f"{paths[csv_key]}: template {int(t[~ok][0])} has no face in {paths['faces']}")
        return tfeats[pos], subj

    missing = [str(paths[k]) for k in ("probes", *GALLERIES[args.dataset]) if not paths[k].is_file()]
    if missing:
        raise ValueError(f"1:N protocol files missing: {missing}; pass --tasks verify to skip identification")
    probe, probe_subj = feats_of("probes")
    res = {}
    for gallery in GALLERIES[args.dataset]:
        gal, gal_subj = feats_of(gallery)
        res[gallery] = identification(probe @ gal.T, probe_subj, gal_subj)
    keys = [k for k in next(iter(res.values())) if k not in ("mated", "nonmated")]
    res["mean"] = {k: float(np.mean([r[k] for r in res.values()])) for k in keys}
    res["mean"]["nonmated"] = min(r["nonmated"] for r in res.values() if "nonmated" in r)  # the fewest: n/a rule
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="folder holding IJBC/ or IJBB/")
    p.add_argument("--dataset", choices=("IJBC", "IJBB"), default="IJBC")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-module", help="'pkg.module:function' or 'file.py:function' returning the model")
    src.add_argument("--features", type=Path, help="precomputed per-face features .npy [N, D]")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for the model function")
    p.add_argument("--save-features", type=Path, help="write the extracted per-face features here (.npy)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--tasks", nargs="+", choices=("verify", "identify"), default=["verify", "identify"])
    p.add_argument("--face-score", action=argparse.BooleanOptionalAction, default=True,
                   help="weight each face by its detector score (published protocol; --no-face-score: unweighted)")
    p.add_argument("--keep-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="pool faces with their feature norm (published protocol); --no-keep-norm L2-normalises "
                        "each face first")
    p.add_argument("--no-flip", action="store_true", help="features of the image only, without its mirror")
    p.add_argument("--channels", choices=("rgb", "bgr"), default="rgb",
                   help="channel order fed to the model: rgb for models trained here (the RecordIO readers "
                        "decode to RGB), bgr for models trained on OpenCV-decoded images")
    p.add_argument("--far-rule", choices=("at_most", "nearest"), default="nearest",
                   help="TAR@FAR read-out: nearest (published: highest TAR at the FAR nearest the target) or "
                        "at_most (best TAR with FAR <= target, a real operating point)")
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward pass")
    p.add_argument("--pair-batch", type=int, default=1024, help="template pairs scored per batch")
    p.add_argument("--num-workers", type=int, default=0, help="image loading processes")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = meta_paths(args.root, args.dataset)
        if not paths["faces"].is_file():
            raise ValueError(f"{paths['faces']} not found: --root must hold {args.dataset}/meta/ and "
                             f"{args.dataset}/loose_crop/ (insightface's IJB layout)")
        args.out.mkdir(parents=True, exist_ok=True)
        names, templates, medias = read_faces(paths["faces"])
        feats, scores = face_features(args, paths, names, args.face_score)
        tids, tfeats = template_features(feats, templates, medias, scores, args.keep_norm)
        results: dict = {"faces": len(names), "templates": len(tids),
                         "protocol": {"face_score": args.face_score, "keep_norm": args.keep_norm,
                                      "flip": not args.no_flip, "far_rule": args.far_rule}}
        if "verify" in args.tasks:
            results["verification"] = verification(args, paths, tids, tfeats)
        if "identify" in args.tasks:
            results["identification"] = identify(args, paths, tids, tfeats)
    except (ValueError, OSError) as err:
        print(f"eval_ijb: error: {err}", file=sys.stderr)
        return 2
    results["seconds"] = round(time.perf_counter() - start, 2)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=2))
    print(f"{args.dataset}: {len(names)} faces, {len(tids)} templates ({results['seconds']} s); results in {args.out}")
    print("protocol: " + ", ".join(f"{k}={v}" for k, v in results["protocol"].items()))
    for section in ("verification", "identification"):
        rows = results.get(section, {})
        rows = rows if section == "identification" else {"1:1": rows}
        for name, r in rows.items():
            print(f"{section} {name}: {format_row(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
