"""Retrieval benchmarks of a trained MultiGrain model (thin CLI over mhe_scale/eval/retrieval.py).

    python tools/eval_retrieval.py RUN --protocol holidays --root /data/holidays [--rotations holidays-rotate.yaml] \
        [--largest-side 500 --p 4] [--whiten W.safetensors] [--ema]
    --protocol ukbench --root /data/ukbench
    --protocol revisited --root /data/roxford5k --gnd gnd_roxford5k.json
    --protocol copydays --root /data/copydays --distractors /data/yfcc_10k [--transforms strong]
    --protocol folder --root /data/instances            (root/<class>/<image>: each image a query)
    python tools/eval_retrieval.py CONFIG WEIGHTS.safetensors --protocol ...   (the older form)

Reads:
- RUN: the run's output_dir, its run folder (<output_dir>/multigrain-*), its checkpoints/ folder, or
  one step-XXXXXXXX folder: the newest step folder whose manifest verifies is used (a step folder
  named directly must verify) and printed, with any newer ones skipped and why; or a .safetensors
  file (keys backbone.*, classifier.*, margin.beta: a step's model.safetensors, tools/pstar.py's
  output), used as it is (a file outside a step folder has no manifest to verify).
- The run's config: --config, or the nearest config.yaml above the checkpoint (a run writes it when
  it finishes); its model section builds the network, data.preset and data.image_size give the
  defaults below. --ema loads the step folder's ema.safetensors over the weights (the run's own
  top-1 came from them when it trained with EMA).
- Images are resized so their largest side is --largest-side (s*, default: the run's training
  resolution, data.image_size or the preset's 32 / 224), no crop; an image smaller than s* is
  enlarged at most to the training resolution unless --upsample (so 32-pixel images are not blown
  up 15x by --largest-side 500), and normalised with the preset's mean / std. --p sets GeM's p (p*).
Writes: nothing. Prints the checkpoint and settings used on stderr, progress bars on stderr, and
one JSON line of metrics on stdout (percent; N-S in [0, 4]; folder: mAP, recall@k).
Refuses (one line on stderr, exit 2): a folder with no verified checkpoint, several runs in one
output_dir, no config.yaml found (pass --config), a checkpoint that does not fit the config, a
preset without statistics, a pickled ground truth, a malformed image layout or ground truth,
--largest-side or --ks below 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="[CONFIG] RUN",
                    help="run / output_dir / checkpoints / step folder, or a .safetensors file; CONFIG first: "
                         "the older two-argument form")
    ap.add_argument("--config", help="the run's YAML (default: the nearest config.yaml above the checkpoint)")
    ap.add_argument("--protocol", required=True, choices=["holidays", "ukbench", "revisited", "copydays", "folder"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--rotations", help="holidays: {name: clockwise degrees} table (rotated Holidays)")
    ap.add_argument("--gnd", help="revisited: ground truth as JSON (never a pickle)")
    ap.add_argument("--distractors", help="copydays: folder of distractor images")
    ap.add_argument("--max-distractors", type=int, default=10_000)
    ap.add_argument("--transforms", nargs="*", help="copydays: variant folders to query (e.g. strong)")
    ap.add_argument("--largest-side", type=int, default=None,
                    help="s*: images resized so their largest side is s* (default: the run's training resolution)")
    ap.add_argument("--upsample", action="store_true",
                    help="enlarge images smaller than s* up to s* even past the training resolution")
    ap.add_argument("--p", type=float, default=None, help="GeM exponent at test time (p*)")
    ap.add_argument("--whiten", help="safetensors file with mean / matrix from models/whitening.py")
    ap.add_argument("--ema", action="store_true", help="the step folder's EMA weights (ema.safetensors)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10], help="k of mP@k / recall@k")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mhe_scale.config import ConfigError

    try:
        result = evaluate_checkpoint(args)
    except (ConfigError, ValueError, OSError) as err:  # config, checkpoint, image layout, ground truth
        print(f"eval_retrieval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def resolve_inputs(args: argparse.Namespace) -> tuple[Path, Path, Path | None, str]:
    """-> (config file, weights file, its step folder or None, a line saying which and why)."""
    from mhe_scale.engine.checkpoint import STEP_DIR
    from mhe_scale.engine.run_folder import find_checkpoint, find_config

    if len(args.paths) > 2:
        raise ValueError(f"give RUN, or CONFIG and a checkpoint; got {len(args.paths)} paths")
    config = args.config
    if len(args.paths) == 2:
        if config is not None:
            raise ValueError("a CONFIG path and --config were both given; keep one")
        config = args.paths[0]
    target = Path(args.paths[-1])
    if not target.exists():
        raise ValueError(f"{target}: no such file or folder (give a run folder, an output_dir, a step-* checkpoint "
                         "folder or a .safetensors file)")
    if target.is_file():
        step = target.parent if target.name == "model.safetensors" and STEP_DIR.match(target.parent.name) else None
        if step is not None:
            found = find_checkpoint(step)  # verifies the step folder the file sits in
            weights, where = target, found.describe()
        else:
            weights, where = target, f"{target} (a file outside a step folder: no manifest to verify)"
    else:
        found = find_checkpoint(target)
        step, weights, where = found.folder, found.folder / "model.safetensors", found.describe()
    config_path = Path(config) if config is not None else find_config(step if step is not None else target.parent)
    return config_path, weights, step, where


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """The protocol's metrics for the checkpoint (args as parsed by main); bad input raises ValueError / OSError
    naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mhe_scale.config import load_config
    from mhe_scale.data.image_dataset import PRESET_DEFAULTS
    from mhe_scale.eval import retrieval as R
    from mhe_scale.models.gem import find_gem
    from mhe_scale.models.whitening import Whitening
    from mhe_scale.models.state_fit import StateFitError, load_fitting
    from mhe_scale.tasks.multigrain import build_model

    for flag, value in (("--largest-side", args.largest_side), ("--ks", min(args.ks)),
                        ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    config_path, weights, step, where = resolve_inputs(args)
    cfg = load_config(config_path)
    if cfg.data.preset not in PRESET_DEFAULTS:
        raise ValueError(f"{config_path}: data.preset={cfg.data.preset!r} has no mean / std here "
                         f"(known: {sorted(PRESET_DEFAULTS)})")
    default_side, mean, std = PRESET_DEFAULTS[cfg.data.preset]
    train_side = int(cfg.data.image_size or default_side)
    side = args.largest_side or train_side
    try:
        state = load_file(str(weights))
        if args.ema:
            ema = step / "ema.safetensors" if step is not None else None
            if ema is None or not ema.is_file():
                raise ValueError(f"--ema: no ema.safetensors beside {weights} (the run had no train.ema_decay / "
                                 "swa_start)")
            shadows = {k: v for k, v in load_file(str(ema)).items() if k in state}  # SWA's counters left out
            if not shadows:
                raise ValueError(f"{ema}: none of its tensors is a weight of {weights}")
            state.update(shadows)
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a readable safetensors file ({err})") from None
    if "classifier.weight" not in state:
        raise ValueError(f"{weights} has no classifier.weight; is it a multigrain checkpoint?")
    model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
    try:
        load_fitting(model, state)
    except StateFitError as err:
        raise ValueError(f"{weights} does not fit the model of {config_path}: {err}") from None
    if args.p is not None:
        find_gem(model).set_p(args.p)
    model.eval().to(args.device)
    embed = model.embed
    if args.whiten:
        white = Whitening.from_file(args.whiten).to(args.device)
        embed = lambda x: white(model.embed(x))  # noqa: E731
    rset = build_set(args)
    limit = None if args.upsample else train_side
    ema_note = "" if args.ema or step is None or not (step / "ema.safetensors").is_file() else \
        " (the run also saved EMA weights: --ema uses them)"
    enlarged = "up to it (--upsample)" if limit is None else \
        f"at most to {min(side, limit)} (training resolution {train_side}; --upsample to go further)"
    print(f"eval_retrieval: {'EMA' if args.ema else 'live'} weights of {where}{ema_note}; config {config_path}; "
          f"preset {cfg.data.preset} (mean {list(mean)}, std {list(std)}); largest side {side}, smaller images "
          f"enlarged {enlarged}; {len(rset.queries)} queries, {len(rset.database)} database images", file=sys.stderr)
    metrics = R.evaluate(rset, embed, side, mean, std, batch_size=args.batch_size, device=args.device,
                         ks=args.ks, upsample_limit=limit, progress=True)
    return {"protocol": rset.name, "checkpoint": str(weights), "ema": args.ema, "preset": cfg.data.preset,
            "mean": list(mean), "std": list(std), "largest_side": side, "upsample_limit": limit, **metrics}


def build_set(args: argparse.Namespace):
    """The RetrievalSet of --protocol over --root."""
    from mhe_scale.eval import retrieval as R

    if args.protocol == "holidays":
        return R.holidays(args.root, args.rotations)
    if args.protocol == "ukbench":
        return R.ukbench(args.root)
    if args.protocol == "revisited":
        if not args.gnd:
            raise ValueError("--protocol revisited needs --gnd gnd_<name>.json")
        return R.revisited(args.root, args.gnd)
    if args.protocol == "folder":
        return R.labelled_folder(args.root)
    return R.copydays(args.root, args.distractors, args.max_distractors, args.transforms)


if __name__ == "__main__":
    sys.exit(main())
