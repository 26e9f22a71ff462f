"""Retrieval benchmarks of a trained MultiGrain model (thin CLI over mhe_scale/eval/retrieval.py).

    python tools/eval_retrieval.py CONFIG CHECKPOINT/model.safetensors --protocol holidays \
        --root /data/holidays [--rotations holidays-rotate.yaml] --largest-side 500 --p 4 [--whiten W.safetensors]
    --protocol ukbench --root /data/ukbench
    --protocol revisited --root /data/roxford5k --gnd gnd_roxford5k.json
    --protocol copydays --root /data/copydays --distractors /data/yfcc_10k [--transforms strong]

CONFIG: the run's multigrain YAML (its model section builds the network); the checkpoint is a
safetensors file written by fit (keys backbone.*, classifier.*, margin.beta). --p sets GeM's p (p*).
Prints one JSON line of metrics (percent; N-S in [0, 4]).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("checkpoint")
    ap.add_argument("--protocol", required=True, choices=["holidays", "ukbench", "revisited", "copydays"])
    ap.add_argument("--root", required=True)
    ap.add_argument("--rotations", help="holidays: {name: clockwise degrees} table (rotated Holidays)")
    ap.add_argument("--gnd", help="revisited: ground truth as JSON (never a pickle)")
    ap.add_argument("--distractors", help="copydays: folder of distractor images")
    ap.add_argument("--max-distractors", type=int, default=10_000)
    ap.add_argument("--transforms", nargs="*", help="copydays: variant folders to query (e.g. strong)")
    ap.add_argument("--largest-side", type=int, default=500, help="s*: images resized so their largest side is s*")
    ap.add_argument("--p", type=float, default=None, help="GeM exponent at test time (p*)")
    ap.add_argument("--whiten", help="safetensors file with mean / matrix from models/whitening.py")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from mhe_scale.config import ConfigError

    try:
        result = evaluate_checkpoint(args)
    except (ConfigError, ValueError, OSError) as err:  # config, checkpoint, image layout, ground truth
        print(f"eval_retrieval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """The protocol's metrics for the checkpoint (args as parsed by main); bad input raises ValueError / OSError
    naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from mhe_scale.config import load_config
    from mhe_scale.eval import retrieval as R
    from mhe_scale.models.gem import find_gem
    from mhe_scale.models.whitening import Whitening
    from mhe_scale.tasks.multigrain import build_model

    cfg = load_config(args.config)
    try:
        state = load_file(args.checkpoint)
    except SafetensorError as err:
        raise ValueError(f"{args.checkpoint}: not a readable safetensors file ({err})") from None
    if "classifier.weight" not in state:
        raise ValueError(f"{args.checkpoint} has no classifier.weight; is it a multigrain checkpoint?")
    model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
    model.load_state_dict(state, strict=True)
    if args.p is not None:
        find_gem(model).set_p(args.p)
    model.eval().to(args.device)
    embed = model.embed
    if args.whiten:
        white = Whitening.from_file(args.whiten).to(args.device)
        embed = lambda x: white(model.embed(x))  # noqa: E731
    if args.protocol == "holidays":
        rset = R.holidays(args.root, args.rotations)
    elif args.protocol == "ukbench":
        rset = R.ukbench(args.root)
    elif args.protocol == "revisited":
        if not args.gnd:
            raise ValueError("--protocol revisited needs --gnd gnd_<name>.json")
        rset = R.revisited(args.root, args.gnd)
    else:
        rset = R.copydays(args.root, args.distractors, args.max_distractors, args.transforms)
    metrics = R.evaluate(rset, embed, args.largest_side, batch_size=args.batch_size, device=args.device)
    return {"protocol": rset.name, "largest_side": args.largest_side, **metrics}


if __name__ == "__main__":
    sys.exit(main())
