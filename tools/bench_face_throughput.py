"""Samples/s and peak memory of one face training step (backbone + head) per head at C classes.

    python tools/bench_face_throughput.py [--classes 2059906] [--backbone mobilefacenet] [--batch 16]
        [--steps 3] [--heads fc partial_fc mhs] [--mhs-sizes 4096 503] [--device cpu|cuda]
        [--precision fp32|bf16] [--markdown]

Each head runs in its own subprocess (so peak memory is that head's alone): synthetic 112x112 faces
(SyntheticFaceDataset + FaceTransform), the backbone, the head with an ArcFace margin (1.0, 0.5, 0.0)
at scale 64, SGD with momentum 0.9 and weight decay 5e-4 as arcface_torch trains. `--warmup` steps
are not timed (the first one allocates the momentum buffers). Peak memory is the process's peak
resident set (CPU) or torch.cuda.max_memory_allocated (CUDA). Before starting a head the parent
estimates its memory (fp32 weight, gradient and momentum, plus the head's transient copies and the
logits) and skips it with a note when that exceeds the memory available now (--memory-gb overrides).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
WEBFACE42M = 2_059_906
HEAD_ARGS = {
    "fc": {"cosine": True, "margin": [1.0, 0.5, 0.0], "scale": 64.0},
    "partial_fc": {"sample_rate": 0.2, "margin": [1.0, 0.5, 0.0], "scale": 64.0},
    "mhs": {"mode": "batch_union", "num_sampled_groups": 1, "cosine": True, "margin": [1.0, 0.5, 0.0], "scale": 64.0},
}
# head memory in units of the fp32 weight W = C * D * 4 bytes (weight + grad + momentum + transient copies:
# fc normalises the whole weight and back-propagates through it; the sampled heads copy only their rows)
# and of the logits L = B * (softmax columns) * 4 bytes
WEIGHT_COPIES = {"fc": 7.0, "partial_fc": 4.0, "mhs": 3.9}  # measured at C = 200K and 2M on CPU
LOGIT_COPIES = 6.0


def head_kwargs(name: str, args: argparse.Namespace) -> dict:
    return dict(HEAD_ARGS[name], **({"sizes": list(args.mhs_sizes)} if name == "mhs" and args.mhs_sizes else {}))


def estimate_gb(name: str, args: argparse.Namespace) -> float:
    columns = {"fc": args.classes, "partial_fc": 0.2 * args.classes, "mhs": args.batch * args.mhs_sizes[1]}[name]
    weight = args.classes * args.dim * 4
    return (WEIGHT_COPIES[name] * weight + LOGIT_COPIES * args.batch * columns * 4) / 2**30 + 1.0  # + backbone


def available_gb() -> float:
    """MemAvailable of /proc/meminfo (CPU) or the free memory of the current CUDA device."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0] / 2**30
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Child process: build, warm up, time `args.steps` training steps; -> one result row."""
    sys.path.insert(0, str(REPO_ROOT))
    from mhe_scale.data.dali_face import FaceTransform
    from mhe_scale.data.face_dataset import SyntheticFaceDataset
    from mhe_scale.engine.model import Classifier
    from mhe_scale.heads.base import create_head
    from mhe_scale.models.face import build_face_backbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    data = SyntheticFaceDataset(args.batch * (args.steps + args.warmup), args.classes, 112, 0, FaceTransform(True))
    start = time.perf_counter()
    backbone = build_face_backbone(args.backbone, num_features=args.dim)
    head = create_head(name, in_features=args.dim, num_classes=args.classes, **head_kwargs(name, args))
    model = Classifier(backbone, head).to(device)
    build_s = time.perf_counter() - start
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    batches = []
    for step in range(args.steps + args.warmup):
        rows = [data[i] for i in range(step * args.batch, (step + 1) * args.batch)]
        batches.append((torch.stack([r[0] for r in rows]).to(device), torch.tensor([r[1] for r in rows], device=device)))
    columns = 0.0
    for step, (images, labels) in enumerate(batches):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            features = model.encoder.forward_features(images)
        out = model.head(features.float(), labels)  # the head in fp32, autocast off, as engine/prepared.py runs it
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = out.metrics or {}
        columns = float(metrics.get("softmax_columns", metrics.get("kept_classes", args.classes)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"head": name, "samples/s": args.batch * args.steps / seconds, "step s": seconds / args.steps,
            "peak GB": peak / 2**30, "head params (M)": sum(p.numel() for p in head.parameters()) / 1e6,
            "softmax columns": columns, "build s": build_s, "loss": float(out.loss)}


def fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=WEBFACE42M, help="number of identities C")
    parser.add_argument("--backbone", default="mobilefacenet", help="face backbone (mhe_scale.models.face)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--heads", nargs="+", default=list(HEAD_ARGS), choices=list(HEAD_ARGS))
    parser.add_argument("--mhs-sizes", type=int, nargs=2, default=[4096, 503], help="MHS (groups, members)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the backbone under torch.autocast(bfloat16), the head in fp32, as "
                             "dist.mixed_precision=bf16 trains")
    parser.add_argument("--memory-gb", type=float, default=None, help="memory budget (default: available now)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return 0
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--markdown"]
    if args.json:  # the children print their row; only the parent writes the file
        i = passthrough.index("--json")
        passthrough = passthrough[:i] + passthrough[i + 2:]
    for name in args.heads:
        need, have = estimate_gb(name, args), args.memory_gb if args.memory_gb is not None else available_gb()
        if need > have:
            rows.append({"head": name, "note": f"skipped: needs ~{need:.1f} GB, {have:.1f} GB available"})
            continue
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--heads", name, "--one", name],
                              capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            why = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
            rows.append({"head": name, "note": f"failed: {why}"})
            continue
        rows.append(json.loads(found[0][len("RESULT "):]) | {"note": f"estimate {need:.1f} GB"})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    columns = ["head", "samples/s", "step s", "peak GB", "head params (M)", "softmax columns", "note"]
    print(f"C={args.classes:,} D={args.dim} backbone={args.backbone} batch={args.batch} steps={args.steps} "
          f"device={args.device} precision={args.precision} threads={args.threads}")
    if args.markdown:
        print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [fmt(row[c]) if isinstance(row.get(c), float) else str(row.get(c, "-")) for c in columns]
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
