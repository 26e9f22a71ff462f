"""The classify task end to end: a CIFAR-layout archive (generated here; the real CIFAR-10 archive
when ../shared/data is present) through `mhe-scale train`, every MHE head, 2 processes equal to
1 process with gradient accumulation, and a class-sharded head."""

import io
import json
import re
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mhe_scale.parallel.testing import free_port
import torch
from PIL import Image
from safetensors.torch import load_file

from mhe_scale.config import load_config
from mhe_scale.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "bird", "cat", "dog", "frog", "ship"]


def write_archive(path: Path, per_class: int = 8, seed: int = 0) -> Path:
    """A CIFAR-10-jpeg-layout .tar.gz: {train,test}/<class>/NNNN.jpg, 32x32, a colour per class."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c, name in enumerate(CLASSES):
                for i in range(per_class):
                    base = np.array([40 * c % 256, 255 - 40 * c, 30 + 35 * c], dtype=np.float64)
                    pixels = np.clip(base + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(pixels).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{name}/{i:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("cifarlike") / "images.tar.gz")


def overrides(archive: Path, out: Path, *extra: str) -> list[str]:
    return ["task=classify", f"data.path={archive}", f"data.cache_dir={out.parent / 'cache'}",
            "model.width=4", "train.batch_size=8", "train.epochs=2", "train.eval_batch_size=16",
            "train.log_every=1", "train.save_every=3", "optim.lr=0.01", "train.seed=3",
            f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("head", ["fc", "mhp", "mhc", "mhs"])
def test_every_head_trains_and_is_scored(archive, tmp_path, head):
    sizes = {"mhp": ["head.sizes=[3,2]"], "mhc": ["head.num_groups=3"], "mhs": ["head.sizes=[3,2]"]}.get(head, [])
    out = tmp_path / "run"
    assert train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, out, f"head={{name:{head}}}"),
                       *sizes]) == 0
    results = json.loads((out / "results.json").read_text())
    (metrics,) = [r["metrics"] for r in results.values()]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    log = [json.loads(line) for line in next(out.glob("*/loss_log.jsonl")).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))  # 48 images / 8 per step x 2 epochs
    if head == "mhs":  # a head's metrics are logged with the loss
        assert all("softmax_columns" in r for r in log)


def test_a_learnable_archive_is_learned(archive, tmp_path):
    out = tmp_path / "run"
    assert train_main(["configs/classify/cifar10_r18_mhp.yaml",
                       *overrides(archive, out, "head={name:mhp,sizes:[3,2]}", "train.epochs=8", "optim.lr=0.05")]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert metrics["top1"] > 0.5  # six colours: chance is 1/6


def test_bad_data_path_is_one_line_error(tmp_path, capsys):
    code = train_main(["configs/classify/cifar10_r18_mhp.yaml", "data.path=/nonexistent/cifar.tar.gz",
                       f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: data.path='/nonexistent/cifar.tar.gz' does not exist")
    assert "\n" not in err


def accelerate_launch(args: list[str], cwd: Path = REPO) -> None:
    """`accelerate launch` with 2 CPU processes (gloo): ACCELERATE_USE_CPU=1 + --multi_gpu, the form that
    really starts 2 processes on CPU (docs/environment.md)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "-m", "mhe_scale.train", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "num_processes=2" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("sharded", [False, True])
def test_two_processes_equal_one_process_with_accumulation(archive, tmp_path, sharded):
    """2 processes x micro-batch 8 read the same micro-batches as 1 process x 8 x 2 accumulation
    (data/samplers.py), and batch norm sees the same micro-batch statistics, so the weights agree.
    Running BN statistics are per process (rank 0's are saved); they are not compared."""
    # fc: its softmax covers every class, so the 2-rank global batch equals two accumulated micro-batches
    head = ["head={name:fc}"] if sharded else ["head={name:mhp,sizes:[3,2]}"]
    shard = ["dist.shard_head=true"] if sharded else []
    one = tmp_path / "one"
    assert train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, one, *head, *shard,
                                                                           "train.grad_accum_steps=2")]) == 0
    two = tmp_path / "two"
    accelerate_launch(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, two, *head, *shard)])
    folder = next(p.name for p in one.iterdir() if p.is_dir() and p.name != "cache")
    step = "checkpoints/step-00000006"
    a, b = load_file(str(one / folder / step / "model.safetensors")), load_file(str(two / folder / step / "model.safetensors"))
    weights = [k for k in a if "running" not in k and "num_batches" not in k]
    assert set(b) <= set(a) and any(k.startswith("encoder.") for k in b)
    for key in (k for k in weights if k in b):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    log_a = [json.loads(x)["loss"] for x in (one / folder / "loss_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (two / folder / "loss_log.jsonl").read_text().splitlines()]
    assert log_b == pytest.approx(log_a, rel=1e-4, abs=1e-5)
    if sharded:  # the head lives in per-rank shard files, not in model.safetensors
        assert not any(k.startswith("head.") for k in b)
        whole = load_file(str(one / folder / step / "head-shard-0-of-1.safetensors"))
        halves = [load_file(str(two / folder / step / f"head-shard-{r}-of-2.safetensors")) for r in range(2)]
        key = next(k for k in whole if k.endswith("weight"))
        torch.testing.assert_close(torch.cat([h[key] for h in halves]), whole[key], rtol=1e-4, atol=1e-5)
        assert sorted(p.name for p in (two / folder / step).glob("head-shard-*")) == \
            ["head-shard-0-of-2.safetensors", "head-shard-1-of-2.safetensors"]


def test_real_cifar10_archive_end_to_end(shared_data, tmp_path):
    archive = shared_data / "cifar10-jpeg" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        archive = next((shared_data / "cifar10-jpeg").glob("*.tar*"))
    out = tmp_path / "run"
    assert train_main(["configs/classify/cifar10_r18_mhp.yaml", f"data.path={archive}", "data.limit_per_class=6",
                       f"data.cache_dir={tmp_path / 'cache'}", "model.width=4", "train.batch_size=20", "train.epochs=1",
                       f"train.output_dir={out}"]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0


def test_shipped_classify_configs_load():
    for path in sorted((REPO / "configs" / "classify").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.task == "classify", path


def test_head_factory_errors_are_one_line(archive, tmp_path, capsys):
    code = train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, tmp_path / "run", "head.sizes=[2,2]")])
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: head sizes [2, 2]"), lines


def test_a_changed_config_in_the_same_folder_is_refused(archive, tmp_path, capsys):
    """Rerunning with another optim.lr in the same output folder names the key instead of resuming."""
    out = tmp_path / "run"
    assert train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, out, "train.epochs=1")]) == 0
    capsys.readouterr()
    code = train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(archive, out, "train.epochs=1",
                                                                            "optim.lr=0.5")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "optim.lr: 0.01 -> 0.5" in err[0], err


def test_every_task_records_what_defines_its_run():
    """Each task's fit call passes run_config (without it a changed config resumes the old run)."""
    import re

    for path in sorted((REPO / "mhe_scale" / "tasks").glob("*.py")):
        text = path.read_text()
        for call in re.finditer(r"\bfit\(", text):
            depth, end = 0, call.end() - 1
            for end in range(call.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            assert "run_config=" in text[call.start():end], f"{path.name}: fit(...) without run_config="


def test_an_undecodable_image_is_one_line_naming_the_record(archive, tmp_path, capsys):
    """A corrupt JPEG decoded in a DataLoader worker (train.num_workers=2) ends the run with one line
    naming the cache file and record, not the worker's traceback."""
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(archive) as src, tarfile.open(bad, "w:gz") as out:
        for i, member in enumerate(src.getmembers()):
            data = src.extractfile(member).read()
            if i == 3:
                data = data[:20] + b"\0" * 40 + data[60:]
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    code = train_main(["configs/classify/cifar10_r18_mhp.yaml", *overrides(bad, tmp_path / "run", "train.num_workers=2")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(err) == 1, err
    assert re.search(r"error: .*train\.rec, record key 3: \d+ image bytes do not decode", err[0]), err
