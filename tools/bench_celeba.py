"""Issue 24's table: face heads trained on CelebA-249's training identities, verified on the others.

    python tools/bench_celeba.py [--images ../shared/data/celeba-249/images] [--protocol runs/celeba249_protocol]
        [--train-identities 200] [--rows pixels pca fc pfc02 mhs mhs_g32 pfc01 pfc02_dense mhs_dense]
        [--seeds 0] [--set train.epochs=6 ...] [--deadline-min 90] [--out runs/bench_celeba]
        [--results results/celeba249.json]

1. The protocol (tools/make_face_protocol.py, seed 0) unless --protocol already holds one.
2. Per row and seed: a baseline that needs no training (pixels: the aligned face resized to the models'
   input, as a vector; pca: eigenfaces, the top --pca-components principal directions of the training
   identities' images) or `mhe-scale train configs/face/celeba249/celeba249_mfn_<row>.yaml data.path=... train.seed=s`
   in a subprocess (OMP_NUM_THREADS=1; peak RSS = its VmHWM, polled; time = the task's "train s"),
   then its last checkpoint scored (tools/eval_verification.py's loader) on
   - verification.bin: 10-fold accuracy +- std over the folds, TAR@FAR 1e-2 and 1e-3
     (mhe_scale/eval/verification.py; each distinct image embedded once, pairs by index: the same numbers
     as bin_distances);
   - IJBC/: tools/eval_ijb.py --features (per-face f(x) + f(flip x), the published pooling, --far-rule
     at_most): 1:1 TAR@FAR 1e-2 / 1e-3 and 1:N rank-1 (mean of G1 and G2).
A finished row (OUT/rows/<row>-s<seed>.json) is not rerun; no row starts after --deadline-min.
Writes --results (rows + command, commit, date, torch, load) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAINED = {"fc": ("fc", []), "pfc02": ("pfc02", []), "pfc01": ("pfc01", []), "mhs": ("mhs", []),
           "mhs_g32": ("mhs_g32", []), "pfc02_dense": ("pfc02", ["optim.head_update=dense"]),
           "mhs_dense": ("mhs", ["optim.head_update=dense"]), "pfc01_dense": ("pfc01", ["optim.head_update=dense"]),
           "mhs_g32_dense": ("mhs_g32", ["optim.head_update=dense"])}
"""Trained row -> (configs/face/celeba249/celeba249_mfn_<config>.yaml, extra overrides)."""
BASELINES = ("pixels", "pca")
FARS = (1e-2, 1e-3)


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def train_command(row: str, seed: int, protocol: Path, folder: Path, overrides: list[str],
                  batch_size: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of one trained row; a row '<row>_x2' trains <row> class-sharded on 2 CPU processes
    (accelerate launch on gloo) at half the per-process batch, the same global batch."""
    two = row.endswith("_x2")
    config, extra = TRAINED[row[:-3] if two else row]
    args = [f"configs/face/celeba249/celeba249_mfn_{config}.yaml", f"data.path={protocol / 'train.rec'}", f"train.seed={seed}",
            f"train.output_dir={folder}", *extra, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if not two:
        return [sys.executable, "-m", "mhe_scale.cli", "train", *args], env
    from mhe_scale.parallel.testing import free_port

    env["ACCELERATE_USE_CPU"] = "1"
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), "-m", "mhe_scale.train", *args, f"train.batch_size={batch_size // 2}"], env


def tree_peaks(root: int, peaks: dict[int, int]) -> None:
    """Update peaks {pid: VmHWM kB} for `root` and its descendants (from /proc; gone processes are skipped)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            continue
        peaks[pid] = max(peaks.get(pid, 0), hwm)


def train_run(row: str, seed: int, protocol: Path, out: Path, overrides: list[str]) -> dict:
    """One trained row in a child process -> {train s, final loss, peak RSS GB, folder, command}.

    Peak RSS = the largest VmHWM among the child and its descendants, polled every 0.2 s (a process's
    VmHWM starts afresh at exec; the child's ru_maxrss does not: it counts the forking parent's pages, here
    this tool's, e.g. PCA's data); 'peak RSS sum GB' adds the processes' peaks (2-process rows)."""
    from mhe_scale.config import load_config

    folder = out / "runs" / f"{row}-s{seed}"
    batch = load_config(REPO / "configs" / "face" / "celeba249" / "celeba249_mfn_fc.yaml", overrides).train.batch_size
    cmd, env = train_command(row, seed, protocol, folder, overrides, batch)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start, peaks = time.perf_counter(), {}
    with open(out / "logs" / f"{row}-s{seed}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while proc.poll() is None:
            tree_peaks(proc.pid, peaks)
            time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{row} seed {seed} failed; see {out / 'logs' / f'{row}-s{seed}.log'}")
    results = json.loads((folder / "results.json").read_text())
    costs = next(iter(results.values()))["costs"]
    return {"wall s": time.perf_counter() - start, "train s": costs["train s"], "final loss": costs["final loss"],
            "peak RSS GB": max(peaks.values(), default=0) * 1024 / 1e9,
            "peak RSS sum GB": sum(peaks.values()) * 1024 / 1e9, "folder": str(folder.relative_to(out)),
            "command": " ".join(cmd[2:])}


def decode(blobs: list[bytes], size: int):
    """Encoded images -> uint8 [N, 3, size, size], decoded and resized as a .bin's images are (FaceBin.decode)."""
    import torch

    from mhe_scale.data.face_bin import FaceBin

    return FaceBin("<images>", blobs, torch.zeros(0, dtype=torch.bool)).decode(0, len(blobs), size)


def as_input(pixels):
    """uint8 [N, 3, S, S] -> float [N, 3, S, S] in [-1, 1], the formula of verification.embed_images."""
    return (pixels.float() / 255.0 - 0.5) / 0.5


def pixel_model():
    """Raw pixels: x [B, 3, S, S] -> [B, 3 S S]."""
    from torch import nn

    return nn.Flatten()


def pca_model(protocol: Path, size: int, components: int):
    """Eigenfaces fitted on the training identities' images (train.rec) only: x -> (x - mean) @ V [B, K]."""
    import torch
    from torch import nn

    from mhe_scale.data.face_dataset import RecordIOFaceDataset

    data = RecordIOFaceDataset(protocol / "train.rec", protocol / "train.idx")
    blobs = [data.reader.read_image(int(k))[1] for k in data.keys]
    x = as_input(decode(blobs, size)).flatten(1)  # [N, 3 S S]
    mean = x.mean(0)
    v = torch.linalg.svd(x - mean, full_matrices=False).Vh[:components].T.contiguous()  # [3 S S, K], exact

    class Eigenfaces(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", mean)
            self.register_buffer("v", v)

        def forward(self, images):
            return (images.flatten(1) - self.mean) @ self.v

    return Eigenfaces()


def trained_model(folder: Path):
    """The backbone of a finished run's last checkpoint, as tools/eval_verification.py loads it."""
    from mhe_scale.config import load_config

    tool = load_tool("eval_verification")
    step = tool.find_checkpoint(folder)
    return tool.load_backbone(step, load_config(tool.find_config(step)))


def score(model, protocol: Path, size: int, out: Path, batch_size: int = 256) -> dict:
    """verification.bin and IJBC/ metrics of `model` (images [B, 3, S, S] in [-1, 1] -> [B, D]); see the module doc."""
    import contextlib

    import torch
    import torch.nn.functional as F

    from mhe_scale.data.face_bin import read_face_bin
    from mhe_scale.eval.ijb import extract_features, meta_paths, read_faces
    from mhe_scale.eval.verification import pair_distances, verification_metrics

    pairs = read_face_bin(protocol / "verification.bin")
    paths = meta_paths(protocol, "IJBC")
    names, _, _ = read_faces(paths["faces"])
    index: dict[bytes, int] = {}
    face_rows = [index.setdefault((paths["images"] / n).read_bytes(), len(index)) for n in names]
    bin_rows = [index.setdefault(b, len(index)) for b in pairs.images]
    with torch.inference_mode():
        raw = extract_features(model, as_input(decode(list(index), size)), batch_size, flip=True)  # f(x) + f(flip x)
    distances = pair_distances(F.normalize(raw[bin_rows], dim=1))  # = bin_distances on the .bin
    row: dict = {}
    for i, far in enumerate(FARS):
        res = verification_metrics(distances, pairs.issame, 10, far, name=str(protocol / "verification.bin"))
        if i == 0:
            row.update({"acc": res.accuracy, "acc std": res.accuracy_std})
        row[f"TAR@FAR={far:g}"] = res.tar if res.far_resolved else None
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "ijb_features.npy", raw[face_rows].numpy())
    with contextlib.redirect_stdout(io.StringIO()):
        code = load_tool("eval_ijb").main(["--root", str(protocol), "--features", str(out / "ijb_features.npy"),
                                           "--far-rule", "at_most", "--out", str(out / "ijb")])
    if code:
        raise SystemExit(f"eval_ijb failed on {protocol} (exit {code})")
    ijb = json.loads((out / "ijb" / "results.json").read_text())
    row.update({f"IJB TAR@FAR={f:g}": ijb["verification"][f"TAR@FAR={f:g}"] for f in FARS})
    row["IJB rank1"] = ijb["identification"]["mean"]["rank1"]
    return row


def run_row(row: str, seed: int, args: argparse.Namespace, size: int) -> dict:
    """One row and seed -> its record (written to OUT/rows/<row>-s<seed>.json)."""
    import torch

    torch.set_num_threads(1)
    name = f"{row}-s{seed}"
    record: dict = {"row": row, "seed": seed}
    if row in BASELINES:
        start = time.perf_counter()
        model = pixel_model() if row == "pixels" else pca_model(args.protocol, size, args.pca_components)
        record.update({"fit s": time.perf_counter() - start})
    else:
        train_file = args.out / "train" / f"{name}.json"
        if not train_file.is_file():
            train_file.parent.mkdir(parents=True, exist_ok=True)
            train_file.write_text(json.dumps(train_run(row, seed, args.protocol, args.out, args.set), indent=1))
        record.update(json.loads(train_file.read_text()))
        model = trained_model(args.out / record["folder"])
    start = time.perf_counter()
    record.update(score(model.eval(), args.protocol, size, args.out / "eval" / name))
    record["eval s"] = time.perf_counter() - start
    return record


def fmt(values: list, pct: bool = True) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    scale = 100 if pct else 1
    if len(vals) == 1:
        return f"{scale * vals[0]:.1f}"
    return f"{scale * np.mean(vals):.1f} ± {scale * np.std(vals):.1f}"


def table(records: list[dict]) -> str:
    """Markdown: one line per row, mean ± std over its seeds (accuracy: ± the folds' std with one seed)."""
    lines = ["| row | seeds | verif. acc % | TAR@1e-2 | TAR@1e-3 | IJB 1:1 TAR@1e-2 | IJB TAR@1e-3 | IJB rank-1 | "
             "train s | peak RSS GB |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = list(dict.fromkeys(r["row"] for r in records))
    for row in rows:
        rs = [r for r in records if r["row"] == row]
        acc = (f"{100 * rs[0]['acc']:.2f} ± {100 * rs[0]['acc std']:.2f} (folds)" if len(rs) == 1 else
               f"{fmt([r['acc'] for r in rs])} (seeds)")
        cols = [fmt([r.get(k) for r in rs]) for k in ("TAR@FAR=0.01", "TAR@FAR=0.001", "IJB TAR@FAR=0.01",
                                                       "IJB TAR@FAR=0.001", "IJB rank1")]
        cost = [fmt([r.get(k) for r in rs], False) if any(k in r for r in rs) else "-"
                for k in ("train s", "peak RSS GB")]  # a seed without the key (unmeasured) is left out
        lines.append(f"| {row} | {len(rs)} | {acc} | " + " | ".join(cols + cost) + " |")
    return "\n".join(lines)


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "celeba-249" / "images")
    p.add_argument("--protocol", type=Path, default=REPO / "runs" / "celeba249_protocol")
    p.add_argument("--train-identities", type=int, default=200)
    p.add_argument("--rows", nargs="+", default=["pixels", "pca", "fc", "pfc02", "mhs", "mhs_g32", "pfc01"],
                   choices=[*BASELINES, *TRAINED, *(f"{r}_x2" for r in TRAINED)],
                   help="rows in order; <row>_x2: <row> class-sharded on 2 processes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", nargs="*", default=[], help="overrides for every training run (e.g. train.epochs=4)")
    p.add_argument("--pca-components", type=int, default=128)
    p.add_argument("--deadline-min", type=float, default=float("inf"), help="start no row after this many minutes")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_celeba")
    p.add_argument("--results", type=Path, default=REPO / "results" / "celeba249.json")
    args = p.parse_args(argv)
    args.protocol, args.out = args.protocol.resolve(), args.out.resolve()
    start, load_start = time.perf_counter(), machine_load()
    if not (args.protocol / "protocol.json").is_file():
        code = load_tool("make_face_protocol").main([str(args.images), str(args.protocol), "--train-identities",
                                                     str(args.train_identities)])
        if code:
            return code
    from mhe_scale.config import load_config

    size = load_config(REPO / "configs" / "face" / "celeba249" / "celeba249_mfn_fc.yaml", args.set).data.image_size
    records, skipped = [], []
    for row in args.rows:
        for seed in args.seeds:
            if row in BASELINES and seed != args.seeds[0]:
                continue  # nothing random: pixels and the exact PCA give the same row for every seed
            done = args.out / "rows" / f"{row}-s{seed}.json"
            if not done.is_file():
                if time.perf_counter() - start > 60 * args.deadline_min:
                    skipped.append(f"{row}-s{seed}")
                    continue
                print(f"[{(time.perf_counter() - start) / 60:.1f} min] {row} seed {seed}", flush=True)
                done.parent.mkdir(parents=True, exist_ok=True)
                done.write_text(json.dumps(run_row(row, seed, args, size), indent=1))
            records.append(json.loads(done.read_text()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    import torch

    meta = {"command": "python tools/bench_celeba.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "load at start": load_start, "load at end": machine_load(),
            "image size": size, "protocol": json.loads((args.protocol / "protocol.json").read_text())["verification"],
            "not run (deadline)": skipped, "rows": records}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_name(args.results.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, args.results)
    print(table(records))
    if skipped:
        print(f"not run before the deadline: {' '.join(skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
