"""p*: GeM's exponent for a new test resolution s* (MultiGrain, section 3.3), two ways.

    # fine-tune p alone on `per_class` training images per class at s* (backbone in eval mode, CE,
    # one pass, SGD with polynomial decay); writes the checkpoint with the new p
    python tools/pstar.py finetune CONFIG CKPT/model.safetensors --largest-side 500 --per-class 50 \
        --lr 0.005 --out pstar.safetensors
    # cross-validation: top-1 on held-out test images at s* for each p of a grid
    python tools/pstar.py crossval CONFIG CKPT/model.safetensors --largest-side 500 --grid 1 2 3 4 5 6 --limit 2000

CONFIG is the run's multigrain YAML (data + model sections). Images are resized so their largest
side is s* (no crop) and batched by size. Prints one JSON line.

Reads CONFIG, CHECKPOINT (a model.safetensors, a step folder that verifies against its manifest, or a
run folder: its newest step folder that verifies, engine/run_folder.py; stderr names the file and any
newer step skipped; safetensors only, nothing unpickled) and the config's images. crossval --limit N
scores a seeded draw (--seed) of N test images, not the first N (a test split in class order gave one
or two classes); the JSON line counts the images and classes scored. Writes only --out (finetune;
atomically; a missing folder is created and said on stderr). Refuses with one line on stderr and exit 2:
a missing, unverifiable or unreadable (truncated) checkpoint, one that does not fit CONFIG's model or has
no classifier.weight, a bad CONFIG or data.preset, --largest-side / --per-class / --batch-size / --limit
below 1, an empty --grid or a p <= 0 in it, a missing image list, an --out that is a folder (checked
before any work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def size_batches(dataset, indices, batch_size: int):
    """(images [B, 3, H, W], labels [B]) over dataset[indices], images of one size per batch."""
    import torch

    by_size: dict = {}
    for i in indices:
        image, label = dataset[int(i)]
        group = by_size.setdefault(tuple(image.shape), [])
        group.append((image, label))
        if len(group) == batch_size:
            yield torch.stack([g[0] for g in group]), torch.tensor([g[1] for g in group])
            group.clear()
    for group in by_size.values():
        if group:
            yield torch.stack([g[0] for g in group]), torch.tensor([g[1] for g in group])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["finetune", "crossval"])
    ap.add_argument("config")
    ap.add_argument("checkpoint")
    ap.add_argument("--largest-side", type=int, required=True, help="s*")
    ap.add_argument("--per-class", type=int, default=50, help="finetune: training images per class")
    ap.add_argument("--lr", type=float, default=0.005)
    ap.add_argument("--power", type=float, default=1.0, help="polynomial decay exponent")
    ap.add_argument("--grid", type=float, nargs="*", default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--limit", type=int, default=None, help="crossval: a seeded draw (--seed) of N test images")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="finetune: where to write the checkpoint with p*")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, IsADirectoryError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2


def check_args(args: argparse.Namespace) -> None:
    """ValueError naming the flag for values that cannot work."""
    for flag in ("largest_side", "per_class", "batch_size", "limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    if args.mode == "crossval" and (not args.grid or min(args.grid) <= 0):
        raise ValueError(f"--grid {args.grid}: give one or more GeM exponents p > 0")
    if args.mode == "finetune" and args.out:  # before the work: it died on the write, after it, before
        out = Path(args.out)
        if out.is_dir() or out.parent.is_file():
            raise ValueError(f"--out {out}: {'is a folder' if out.is_dir() else f'{out.parent} is a file'}; "
                             "name a .safetensors file")
        if not out.parent.exists():
            out.parent.mkdir(parents=True)
            print(f"created folder {out.parent}", file=sys.stderr)


def load_checkpoint_state(path: str) -> dict:
    """The tensors of a multigrain model.safetensors, or of the step folder a run / step folder names
    (engine/run_folder.find_checkpoint: the newest that verifies; skipped newer ones said on stderr);
    errors name the file."""
    from mhe_scale.engine.run_folder import find_checkpoint
    from mhe_scale.models.state_fit import read_weights

    file = Path(path)
    if file.is_dir():
        found = find_checkpoint(file)
        for newer, why in found.skipped:
            print(f"warning: {newer} is newer than {found.folder.name} but unusable ({why})", file=sys.stderr)
        file = found.folder / "model.safetensors"
        print(f"pstar: weights {file}", file=sys.stderr)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint {file} does not exist; pass a run's checkpoints/step-*/model.safetensors")
    state = read_weights(file, "truncated? pass a finished step's model.safetensors")
    if "classifier.weight" not in state:
        raise ValueError(f"{file} has no classifier.weight; is it a multigrain checkpoint?")
    return state


def run(args: argparse.Namespace) -> int:
    """The mode's work; bad input raises ValueError / FileNotFoundError naming the flag or file."""
    check_args(args)
    import torch
    from safetensors.torch import save_file

    from mhe_scale.config import load_config
    from mhe_scale.data.image_dataset import PRESET_DEFAULTS, ImageClassificationDataset
    from mhe_scale.data.image_source import image_records
    from mhe_scale.data.image_transforms import Compose, Normalize, ToTensor
    from mhe_scale.eval.retrieval import ResizeLargestSide
    from mhe_scale.models.gem import find_gem
    from mhe_scale.models.state_fit import StateFitError, load_fitting
    from mhe_scale.tasks.multigrain import build_model, cross_validate_p, finetune_p, per_class_subset

    cfg = load_config(args.config)
    state = load_checkpoint_state(args.checkpoint)
    model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
    try:
        load_fitting(model, state)
    except StateFitError as err:
        raise ValueError(f"{args.checkpoint} does not fit {args.config}'s model section ({err}); pass the run's "
                         "own config") from None
    if cfg.data.preset not in PRESET_DEFAULTS:
        raise ValueError(f"data.preset={cfg.data.preset!r} of {args.config}: choose one of {sorted(PRESET_DEFAULTS)}")
    _, mean, std = PRESET_DEFAULTS[cfg.data.preset]
    transform = Compose([ResizeLargestSide(args.largest_side), ToTensor(), Normalize(mean, std)])
    train_records, test_records = image_records(cfg.data)
    p0 = float(find_gem(model).p)
    if args.mode == "finetune":
        data = ImageClassificationDataset(train_records, transform, cfg.data.seed)
        idx = per_class_subset(torch.as_tensor(data.labels), args.per_class, args.seed)
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(args.seed))]
        steps = -(-len(idx) // args.batch_size)
        history = finetune_p(model, size_batches(data, idx.tolist(), args.batch_size), args.lr, steps, args.power)
        result = {"mode": "finetune", "p_start": p0, "p_star": history[-1] if history else p0, "steps": len(history)}
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
            os.replace(tmp, out)
            result["out"] = str(out)
    else:
        data = ImageClassificationDataset(test_records, transform, cfg.data.seed)
        chosen = torch.arange(len(data))
        if args.limit is not None and args.limit < len(data):  # a seeded draw: test splits are often in class order
            draw = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
            chosen = draw[:args.limit].sort().values
        batches = list(size_batches(data, chosen.tolist(), args.batch_size))
        scores = cross_validate_p(model, batches, args.grid)
        result = {"mode": "crossval", "p_start": p0, "p_star": float(find_gem(model).p),
                  "top1": {str(k): v for k, v in scores.items()}, "images": len(chosen),
                  "classes": len(set(data.labels[chosen.numpy()].tolist()))}
    print(json.dumps({"largest_side": args.largest_side, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
