"""Score a saved face checkpoint on verification pair files (.bin: LFW, CFP-FP, AgeDB-30, ...).

    python tools/eval_verification.py runs/casia_r18_mhs --bin lfw.bin cfp_fp.bin agedb_30.bin
    python tools/eval_verification.py runs/casia_r18_mhs/mhs-12x881/checkpoints/step-00012000 \\
        --bin lfw.bin --ema --json lfw.json

RUN is a training output folder (train.output_dir), one head's folder in it (<output_dir>/<head>),
or one checkpoint folder (<output_dir>/<head>/checkpoints/step-XXXXXXXX); for a folder the newest
checkpoint whose manifest verifies is used. The backbone is built from the run's config.yaml (the
nearest one above the checkpoint; --config names another, --set overrides keys) exactly as the face
task builds it, and loaded from the checkpoint's model.safetensors (the encoder.* tensors;
--ema: the EMA/SWA weights of ema.safetensors). Nothing is unpickled: the checkpoint is safetensors
+ JSON, the .bin is read with a restricted unpickler.

Protocol (mhe_scale/eval/verification.py): each image and its mirror are embedded and summed, the
sum L2-normalised, pair distance = squared L2; 10 contiguous folds; per fold the threshold that is
best on the other 9 folds; reported: accuracy mean +- population std over the folds. Thresholds
are taken from the data (midpoints of the training folds' sorted distinct distances); --grid uses
insightface's fixed grid (step 0.01 for accuracy, 0.001 for TAR), which reads 50 % for a collapsed
model whose distances fall between two grid points (warned). TAR@FAR (default 1e-3 and 1e-4): per
fold the largest threshold with FAR <= target on the other folds, TAR measured on the fold; shown
only where the file holds at least 1 / FAR impostor pairs in the training folds, else "n/a" (LFW's
3,000 impostor pairs resolve 1e-3, not 1e-4); a file without impostor pairs gives n/a and a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mhe_scale.config import ConfigError, load_config
from mhe_scale.data.face_bin import FaceBinError
from mhe_scale.engine import run_folder
from mhe_scale.engine.run_folder import find_config

ENCODER = "encoder."


def find_checkpoint(run: Path) -> Path:
    """A step folder, a run folder (<head>/checkpoints/step-*) or an output_dir with one run -> its newest
    verified step folder (engine/run_folder.py; newer unusable folders are named on stderr)."""
    found = run_folder.find_checkpoint(run)
    for folder, why in found.skipped:
        print(f"eval_verification: skipped newer {folder.name}: {why}", file=sys.stderr)
    return found.folder


def load_backbone(step: Path, cfg: Any, ema: bool = False) -> nn.Module:
    """The face backbone of cfg.model, loaded from step/model.safetensors (or ema.safetensors) -> eval mode."""
    from safetensors.torch import load_file

    from mhe_scale.tasks.face import build_face_encoder

    backbone = build_face_encoder(cfg.model, cfg.data.image_size)
    state = {k[len(ENCODER):]: v for k, v in load_file(str(step / "model.safetensors")).items() if k.startswith(ENCODER)}
    if ema:
        if not (step / "ema.safetensors").is_file():
            raise ValueError(f"{step}: no ema.safetensors (the run had no train.ema_decay / swa_start)")
        state.update({k[len(ENCODER):]: v for k, v in load_file(str(step / "ema.safetensors")).items()
                      if k.startswith(ENCODER)})  # EMA holds parameters; buffers stay the model's
    fits = f"{step}/model.safetensors does not fit model.name={cfg.model.name} (num_features={cfg.model.num_features})"
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(f"{fits}: {detail}; check the config's model.* keys") from None
    if missing or unexpected:
        raise ValueError(f"{fits}: missing {missing[:4]}, unexpected {unexpected[:4]}; check the config's model.* keys")
    return backbone.eval()


def score_bins(backbone: nn.Module, bins: list[Path], fars: list[float], folds: int, grid: bool,
               batch_size: int, image_size: int, device: str) -> dict[str, dict[str, Any]]:
    """{bin name: {pairs, genuine, impostors, accuracy, accuracy_std, threshold, TAR@FAR=f (None if n/a)}}."""
    from mhe_scale.eval.verification import ACC_THRESHOLDS, FAR_THRESHOLDS, bin_distances, verification_metrics

    backbone.to(device)
    out: dict[str, dict[str, Any]] = {}
    for path in bins:
        distances, issame = bin_distances(backbone, path, batch_size, image_size, device, progress=True)
        row: dict[str, Any] = {"pairs": len(issame)}
        for i, far in enumerate(fars):
            with warnings.catch_warnings():
                if i > 0:  # the same warnings as for the first target
                    warnings.simplefilter("ignore")
                res = verification_metrics(distances, issame, folds, far, ACC_THRESHOLDS if grid else None,
                                           FAR_THRESHOLDS if grid else None, name=str(path))
            if i == 0:
                row.update(genuine=res.genuine, impostors=res.impostors, accuracy=res.accuracy,
                           accuracy_std=res.accuracy_std, threshold=res.threshold)
            row[f"TAR@FAR={far:g}"] = res.tar if res.far_resolved else None
            row[f"TAR@FAR={far:g} std"] = res.tar_std if res.far_resolved else None
        out[path.stem] = row
    return out


def format_rows(results: dict[str, dict[str, Any]], fars: list[float], folds: int) -> str:
    lines = []
    for name, r in results.items():
        cells = [f"{name}: {r['pairs']} pairs ({r['genuine']} genuine, {r['impostors']} impostor)",
                 f"accuracy {100 * r['accuracy']:.2f} +- {100 * r['accuracy_std']:.2f} %"]
        for far in fars:
            tar = r[f"TAR@FAR={far:g}"]
            need = math.ceil(1 / (far * (1 - 1 / folds)))
            cells.append(f"TAR@FAR={far:g} " + (f"{100 * tar:.2f} +- {100 * r[f'TAR@FAR={far:g} std']:.2f} %"
                                                  if tar is not None else f"n/a (needs >= {need} impostor pairs)"))
        lines.append(", ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="output_dir, <output_dir>/<head>, or a checkpoints/step-* folder")
    p.add_argument("--bin", type=Path, nargs="+", required=True, help=".bin pair files to score")
    p.add_argument("--config", type=Path, help="the run's YAML (default: the nearest config.yaml above the checkpoint)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.num_features=256")
    p.add_argument("--ema", action="store_true", help="the EMA/SWA weights (ema.safetensors) instead of the live ones")
    p.add_argument("--far", type=float, nargs="+", default=[1e-3, 1e-4], help="target FARs for TAR@FAR")
    p.add_argument("--folds", type=int, default=10)
    p.add_argument("--grid", action="store_true", help="insightface's fixed threshold grids instead of data thresholds")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (each also mirrored)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        if not all(0 < f < 1 for f in args.far):
            raise ValueError(f"--far values must lie in (0, 1), got {args.far}")
        step = find_checkpoint(args.run)
        cfg = load_config(args.config or find_config(step), args.set)
        backbone = load_backbone(step, cfg, args.ema)
        results = score_bins(backbone, args.bin, args.far, args.folds, args.grid, args.batch_size,
                             cfg.data.image_size, args.device)
    except (ConfigError, FaceBinError, ValueError, OSError) as err:
        print(f"eval_verification: error: {err}", file=sys.stderr)
        return 2
    print(f"{step} ({cfg.model.name}, {'EMA' if args.ema else 'live'} weights, "
          f"{'grid' if args.grid else 'data'} thresholds, {args.folds} folds, {time.perf_counter() - start:.1f} s)")
    print(format_rows(results, args.far, args.folds))
    if args.json is not None:
        args.json.write_text(json.dumps({"checkpoint": str(step), "ema": args.ema, "grid": args.grid,
                                         "folds": args.folds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
