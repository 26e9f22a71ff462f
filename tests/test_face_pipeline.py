"""Face training pipeline: DALI vs PyTorch readers, augmentation, the face task end to end, configs.

DALI tests skip when nvidia.dali cannot be imported; tests on the real im2rec file skip when
../shared/data is absent (a synthetic JPEG folder covers the insightface layout either way).
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mhe_scale.config import load_config
from mhe_scale.data.face_dataset import FaceDataConfig
from mhe_scale.data.dali_face import (FaceTransform, build_face_loader, dali_available, image_record_index)
from mhe_scale.data.face_bin import write_face_bin
from mhe_scale.data.face_dataset import RecordIOFaceDataset, pack_image_folder
from mhe_scale.heads.factory import build_head

from conftest import load_tool

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL = "recordio-im2rec-faces/validation"
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia.dali cannot be imported")
FACE_CONFIGS = sorted((REPO_ROOT / "configs" / "face").glob("*.yaml"))
DATASET_FACTS = {"webface42m": 2_059_906, "ms1mv2": 85_742, "ms1mv3": 93_431, "casia": 10_572}


# ---- helpers and naive references ----------------------------------------------------------------
def real_files(shared_data: Path) -> tuple[Path, Path]:
    rec, idx = shared_data / f"{REAL}.rec", shared_data / f"{REAL}.idx"
    if not rec.is_file():
        pytest.skip(f"{rec} not present")
    return rec, idx


def file_order(ds: RecordIOFaceDataset) -> np.ndarray:
    """Dataset positions sorted by byte offset: the order DALI's reader visits records."""
    return np.argsort([ds.reader.offset(int(k)) for k in ds.keys], kind="stable")


def normalised(image: torch.Tensor) -> torch.Tensor:
    return (image.double() - 127.5) / 127.5


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Invert the [-1, 1] normalisation exactly (pixels are integers)."""
    return torch.round(images.double() * 127.5 + 127.5).to(torch.uint8)


@pytest.fixture(scope="module")
def packed_header(tmp_path_factory) -> Path:
    """3 identities x 2-3 random JPEGs packed in the insightface layout (header + identity records)."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for ident, count in (("anna", 3), ("bert", 2), ("cleo", 3)):
        (root / "img" / ident).mkdir(parents=True)
        for j in range(count):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / ident / f"{j}.jpg", quality=90)
    pack_image_folder(root / "img", root / "hdr", header=True, progress=False)
    return root / "hdr"


# ---- PyTorch augmentation ------------------------------------------------------------------------
def test_face_transform_normalises_flips_and_resizes():
    image = torch.arange(3 * 4 * 5, dtype=torch.float32).reshape(3, 4, 5).mul(4).clamp(max=255).to(torch.uint8)
    plain = FaceTransform(flip=False)(image)
    assert plain.dtype == torch.float32 and torch.allclose(plain.double(), normalised(image), atol=1e-6)
    assert FaceTransform(flip=False)(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2)).tolist() == [[[-1.0, 1.0]]]
    flips = []
    for seed in range(12):  # the flip is decided by torch's global RNG: replay it
        torch.manual_seed(seed)
        expect_flip = bool(torch.rand(()) < 0.5)
        torch.manual_seed(seed)
        out = FaceTransform(flip=True)(image)
        assert torch.equal(out, plain.flip(2) if expect_flip else plain)
        flips.append(expect_flip)
    assert any(flips) and not all(flips)
    assert FaceTransform(flip=False, size=8)(image).shape == (3, 8, 8)


# ---- DALI vs PyTorch on the same files -----------------------------------------------------------
def check_dali_matches_torch(rec: Path, idx: Path, tmp_path: Path) -> None:
    from mhe_scale.data.dali_face import DALIFaceLoader, DALIRecordDataset

    ds = RecordIOFaceDataset(rec, idx)
    order = file_order(ds)
    reference = torch.stack([ds[int(i)][0] for i in order])  # PIL decode, uint8
    loader = DALIFaceLoader(rec, idx, 8, shuffle=False, flip=False, drop_last=False, index_dir=tmp_path)
    batches = list(loader)
    assert len(loader) == len(batches) == math.ceil(len(ds) / 8)
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and images.shape == reference.shape
    assert torch.equal(as_uint8(images), reference)  # identical decoded pixels
    assert torch.allclose(images.double(), normalised(reference), atol=1e-6)
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.as_tensor(ds.labels[order]))
    # the map-style DALI dataset that engine.fit uses: any index batch, same pixels and labels
    mapped = DALIRecordDataset(rec, idx, max_batch_size=8, flip=False)
    picks = [int(i) for i in order[[3, 0, len(ds) - 1, 1]]]
    items = mapped.__getitems__(picks)
    for (img, label), i in zip(items, picks):
        assert label == ds.labels[i] and torch.equal(as_uint8(img), ds[i][0])


@needs_dali
def test_dali_equals_pytorch_on_real_im2rec_file(shared_data, tmp_path):
    rec, idx = real_files(shared_data)
    assert image_record_index(RecordIOFaceDataset(rec, idx), tmp_path) == idx  # im2rec: read as it is
    check_dali_matches_torch(rec, idx, tmp_path)


@needs_dali
def test_dali_equals_pytorch_on_insightface_layout(packed_header, tmp_path):
    rec, idx = packed_header.with_suffix(".rec"), packed_header.with_suffix(".idx")
    ds = RecordIOFaceDataset(rec, idx)
    assert ds.layout == "insightface" and len(ds) == 8
    filtered = image_record_index(ds, tmp_path)
    keys = sorted(int(line.split("\t")[0]) for line in filtered.read_text().splitlines())
    assert keys == list(range(1, 9))  # header (0) and identity records (9..11) dropped
    stamp = filtered.stat().st_mtime_ns
    assert image_record_index(ds, tmp_path) == filtered and filtered.stat().st_mtime_ns == stamp  # cached
    check_dali_matches_torch(rec, idx, tmp_path)


@needs_dali
def test_dali_shards_partition_the_file_and_flips_follow_torch_rng(packed_header, tmp_path):
    from mhe_scale.data.dali_face import DALIFaceLoader, DALIRecordDataset

    rec, idx = packed_header.with_suffix(".rec"), packed_header.with_suffix(".idx")
    ds = RecordIOFaceDataset(rec, idx)
    seen = []
    for shard in range(2):
        loader = DALIFaceLoader(rec, idx, 3, shard_id=shard, num_shards=2, shuffle=False, flip=False,
                                drop_last=False, index_dir=tmp_path)
        seen += [as_uint8(img) for images, _ in loader for img in images]
    reference = [ds[int(i)][0] for i in file_order(ds)]
    assert len(seen) == len(reference) and all(torch.equal(a, b) for a, b in zip(seen, reference))
    mapped = DALIRecordDataset(rec, idx, max_batch_size=8, flip=True)
    torch.manual_seed(3)
    flags = torch.rand(8) < 0.5
    torch.manual_seed(3)
    items = mapped.__getitems__(list(range(8)))
    assert 0 < int(flags.sum()) < 8
    for i, (img, _) in enumerate(items):
        assert torch.equal(as_uint8(img), ds[i][0].flip(2) if flags[i] else ds[i][0])


def test_pytorch_fallback_when_dali_is_missing(packed_header, monkeypatch):
    import mhe_scale.data.dali_face as dali_face

    monkeypatch.setattr(dali_face, "dali_available", lambda: False)
    rec, idx = packed_header.with_suffix(".rec"), packed_header.with_suffix(".idx")
    with pytest.warns(UserWarning, match="cannot be imported"):
        loader = build_face_loader(rec, idx, 3, dali=True, num_workers=0, size=16, shuffle=True, drop_last=False)
    labels = []
    for images, batch_labels in loader:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        assert float(images.min()) >= -1 and float(images.max()) <= 1
        labels += batch_labels.tolist()
    assert sorted(labels) == sorted(RecordIOFaceDataset(rec, idx).labels.tolist())


# ---- configs -------------------------------------------------------------------------------------
def test_face_configs_load_and_build_their_heads():
    expected_sizes = {"ms1mv2_r100_mhs": [43, 1994], "ms1mv3_r100_mhs": [13, 7187], "casia_r18_mhs": [12, 881]}
    names = {p.stem for p in FACE_CONFIGS}
    assert {"webface42m_r100_mhs", "webface42m_r100_pfc02", "webface42m_r50_mhs", "webface42m_r50_pfc02",
            *expected_sizes} <= names
    for path in FACE_CONFIGS:
        cfg = load_config(path)
        dataset = path.stem.split("_")[0]
        assert cfg.data.name == "face_recordio" and cfg.data.num_classes == DATASET_FACTS[dataset], path
        assert cfg.optim.name == "sgd" and cfg.head.scale == 64.0 and cfg.model.name.startswith("iresnet")
        assert "#" in path.read_text().splitlines()[0]  # the source is cited at the top
        if cfg.head.sizes is not None:
            assert math.prod(cfg.head.sizes) >= cfg.data.num_classes, path
        if path.stem in expected_sizes:
            assert list(cfg.head.sizes) == expected_sizes[path.stem]
        with torch.device("meta"):  # full size, nothing allocated
            head = build_head(cfg.head, cfg.model.num_features, cfg.data.num_classes, False)
        assert head.num_classes == cfg.data.num_classes
        assert sum(p.numel() for p in head.parameters()) >= cfg.data.num_classes * cfg.model.num_features
        small = load_config(path, ["data.num_classes=60", "head.sizes=[6,10]"] if cfg.head.sizes else
                            ["data.num_classes=60"])
        out = build_head(small.head, 16, 60, False)(torch.randn(4, 16), torch.tensor([0, 7, 33, 59]))
        assert torch.isfinite(out.loss)


# ---- the task ------------------------------------------------------------------------------------
def tiny_face_overrides(tmp_path: Path) -> list[str]:
    return ["model.name=mobilefacenet", "model.num_features=32", "model.width_mult=0.25", "data.image_size=32",
            "data.dali=false", "train.batch_size=32", "train.log_every=1", "train.resume=false",
            f"train.output_dir={tmp_path / 'run'}", "optim.name=sgd", "optim.lr=0.1", "optim.weight_decay=5e-4"]


def test_face_task_trains_on_real_file_and_verifies(shared_data, tmp_path):
    from accelerate import Accelerator

    from mhe_scale.tasks.face import run_face

    rec, _ = real_files(shared_data)
    ds = RecordIOFaceDataset(rec, rec.with_suffix(".idx"))
    # 12 same and 12 different pairs from the file's own images -> a .bin pair file
    by_label = [np.flatnonzero(ds.labels == c) for c in range(ds.num_classes)]
    pairs = [(ids[0], ids[1], True) for ids in by_label[:12]] + \
            [(by_label[c][0], by_label[c + 1][0], False) for c in range(12, 24)]
    blobs = [ds.reader.read_image(int(ds.keys[i]))[1] for a, b, _ in pairs for i in (a, b)]
    write_face_bin(tmp_path / "pairs.bin", blobs, [same for _, _, same in pairs])
    cfg = load_config(None, ["data.name=face_recordio", f"data.path={rec}", "data.num_classes=25",
                             "head.name=mhs", "head.sizes=[5,5]", "head.mode=batch_union", "head.cosine=true",
                             "head.num_sampled_groups=1", "head.margin=[1.0,0.5,0.0]", "head.scale=16",
                             "train.epochs=3", f"eval.verification=[{tmp_path / 'pairs.bin'}]", "train.eval_every=7",
                             *tiny_face_overrides(tmp_path)])
    results = run_face(cfg, Accelerator(cpu=True))
    row = results["mhs [5, 5]"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "mhs-5x5" / "loss_log.jsonl").open()]
    assert len(losses) == 21  # 229 // 32 = 7 steps per epoch x 3 epochs
    assert np.mean(losses[-7:]) < np.mean(losses[:7]) - 0.3, losses
    assert 0.0 <= row["metrics"]["pairs acc"] <= 1.0 and 0.0 <= row["metrics"]["pairs acc std"] <= 0.5
    assert not any("TAR" in k for k in row["metrics"])  # 12 impostor pairs cannot measure FAR 1e-3
    assert row["costs"]["samples/s"] > 0 and row["costs"]["head params (M)"] == pytest.approx(25 * 32 / 1e6)
    periodic = [json.loads(line) for line in (tmp_path / "run" / "mhs-5x5" / "eval_log.jsonl").open()]
    assert [p["step"] for p in periodic] == [7, 14, 21] and all(0 <= p["pairs acc"] <= 1 for p in periodic)
    assert (tmp_path / "run" / "results.md").read_text().count("mhs [5, 5]") == 2  # metric and cost tables


def test_face_synthetic_through_the_entry_point(tmp_path):
    from mhe_scale.train import main

    overrides = ["data.name=face_synthetic", "data.num_train=64", "data.num_classes=10", "head.name=partial_fc",
                 "head.sample_rate=0.5", "train.epochs=1", *tiny_face_overrides(tmp_path)]
    assert main([str(REPO_ROOT / "configs" / "face" / "casia_r18_mhs.yaml"), *overrides,
                 "head.sizes=null", "head.mode=null", "head.cosine=null", "head.num_sampled_groups=null",
                 "eval.verification=[]", "train.warmup_epochs=null", "train.save_every=0"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["partial_fc"]["costs"]["head params (M)"] == pytest.approx(10 * 32 / 1e6)


def test_face_task_refuses_labels_beyond_num_classes(packed_header):
    from mhe_scale.tasks.face import load_face_data

    cfg = FaceDataConfig()
    cfg.name, cfg.path, cfg.num_classes = "face_recordio", str(packed_header.with_suffix(".rec")), 2
    with pytest.raises(ValueError, match="data.num_classes=2"):
        load_face_data(cfg, 4, torch.device("cpu"))


def test_bench_tool_skips_heads_that_do_not_fit(capsys):
    bench = load_tool("bench_face_throughput")
    args = bench.parse_args(["--classes", "2059906", "--batch", "16"])
    weight_gb = 2059906 * 512 * 4 / 2**30
    assert bench.estimate_gb("fc", args) > 7 * weight_gb > bench.estimate_gb("mhs", args) > 3 * weight_gb
    assert bench.main(["--classes", "1000", "--heads", "fc", "mhs", "--memory-gb", "0.5", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped: needs") == 2 and "| head | samples/s |" in out


def _pack_jpegs(path: Path, sizes: list[tuple[int, int]], corrupt: int | None = None) -> tuple[Path, Path]:
    """One grey JPEG per (H, W) in sizes (key = position, label = key % 2); `corrupt`: zero 30 bytes of that one."""
    import io

    from mhe_scale.data.recordio import IRHeader, RecordIOWriter, pack_image_record

    with RecordIOWriter(path.with_suffix(".rec"), path.with_suffix(".idx")) as writer:
        for key, (h, w) in enumerate(sizes):
            out = io.BytesIO()
            Image.new("RGB", (w, h), (60, 90, 120)).save(out, format="JPEG")
            data = out.getvalue()
            if key == corrupt:
                data = data[:20] + b"\0" * 30 + data[50:]  # inside the JPEG headers: PIL and DALI both refuse it
            writer.write(key, pack_image_record(IRHeader(0, float(key % 2), key, 0), data))
    return path.with_suffix(".rec"), path.with_suffix(".idx")


@needs_dali
def test_dali_errors_name_the_file_and_record(tmp_path):
    from mhe_scale.data.dali_face import DALIFaceLoader, DALIRecordDataset
    from mhe_scale.data.recordio import RecordIOError

    rec, idx = _pack_jpegs(tmp_path / "bad", [(8, 8)] * 6, corrupt=3)
    message = r"bad\.rec, byte offset \d+, key 3: DALI cannot decode this record's image \(nvImageCodec"
    with pytest.raises(RecordIOError, match=message):
        list(DALIFaceLoader(rec, idx, 2, shuffle=False, flip=False, num_threads=1, index_dir=tmp_path))
    ds = DALIRecordDataset(rec, idx, max_batch_size=4, flip=False, num_threads=1)
    with pytest.raises(RecordIOError, match=message):
        ds.__getitems__([1, 3])
    assert len(ds.__getitems__([0, 1])) == 2  # the failed pipeline is rebuilt


@needs_dali
def test_dali_mixed_image_sizes_are_named_or_resized(tmp_path):
    from mhe_scale.data.dali_face import DALIFaceLoader, DALIRecordDataset

    rec, idx = _pack_jpegs(tmp_path / "mixed", [(8, 8), (8, 8), (6, 10), (8, 8)])
    message = r"mixed\.rec: images of different sizes: key 0 is 8x8 but key 2 is 6x10 \(H x W\).*pass size=S"
    with pytest.raises(ValueError, match=message):
        list(DALIFaceLoader(rec, idx, 4, shuffle=False, flip=False, num_threads=1, index_dir=tmp_path))
    with pytest.raises(ValueError, match=message):
        DALIRecordDataset(rec, idx, max_batch_size=4, flip=False, num_threads=1).__getitems__([0, 1, 2, 3])
    # with size=8 every image is resized: the 8x8 ones unchanged (grey stays grey), the 6x10 one to 8x8
    (images, labels), = list(DALIFaceLoader(rec, idx, 4, shuffle=False, flip=False, size=8, num_threads=1,
                                            index_dir=tmp_path))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == [0, 1, 0, 1]
    items = DALIRecordDataset(rec, idx, max_batch_size=4, flip=False, size=8, num_threads=1).__getitems__([0, 1, 2, 3])
    assert all(x.shape == (3, 8, 8) for x, _ in items)
    assert torch.equal(items[0][0], images[0])


# ---- config checks, one-line errors, synchronised batch norm --------------------------------------
def test_shipped_config_unchanged_stops_with_one_line_naming_the_placeholder(tmp_path, capsys):
    from mhe_scale.train import main

    code = main([str(REPO_ROOT / "configs" / "face" / "casia_r18_mhs.yaml"), f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: data.path='/train_tmp/") and "placeholder" in err and "Traceback" not in err


def test_missing_verification_file_is_reported_before_training(packed_header, tmp_path):
    from accelerate import Accelerator

    from mhe_scale.config import ConfigError
    from mhe_scale.tasks.face import run_face

    cfg = load_config(None, ["data.name=face_recordio", f"data.path={packed_header.with_suffix('.rec')}",
                             "data.num_classes=3", "eval.verification=/train_tmp/x/lfw.bin", *tiny_face_overrides(tmp_path)])
    with pytest.raises(ConfigError, match=r"eval.verification='/train_tmp/x/lfw.bin': no such file .*placeholder"):
        run_face(cfg, Accelerator(cpu=True))
    assert not (tmp_path / "run").exists()  # nothing trained


def test_one_verification_path_without_brackets(tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "face" / "casia_r18_mhs.yaml", ["eval.verification=/data/lfw.bin"])
    assert list(cfg.eval.verification) == ["/data/lfw.bin"]
    yaml = tmp_path / "one.yaml"
    yaml.write_text("eval:\n  verification: lfw.bin\n")
    assert list(load_config(yaml).eval.verification) == ["lfw.bin"]
    assert list(load_config(yaml, ["eval.verification=[a.bin,b.bin]"]).eval.verification) == ["a.bin", "b.bin"]


def test_sync_batchnorm_option():
    from mhe_scale.config import ConfigError
    from mhe_scale.tasks.face import build_face_encoder, sync_batchnorm

    cfg = load_config(None, ["task=face", "model.name=mobilefacenet", "model.num_features=8", "model.width_mult=0.25"]).model
    net = build_face_encoder(cfg, 32)
    assert sync_batchnorm(net, True, 1, torch.device("cpu")) is net  # one process: nothing to synchronise
    with pytest.raises(ConfigError, match="model.sync_batchnorm=true with 2 processes on cpu.*GPU"):
        sync_batchnorm(net, True, 2, torch.device("cpu"))
    synced = sync_batchnorm(net, True, 2, torch.device("cuda"))  # converting needs no GPU, running does
    kinds = {type(m).__name__ for m in synced.modules()}
    assert "SyncBatchNorm" in kinds and "BatchNorm2d" not in kinds


BN_CHILD = '''
import os, sys, torch, torch.distributed as dist
from torch import nn
from mhe_scale.tasks.face import sync_batchnorm
sync, out = sys.argv[1] == "1", sys.argv[2]
gpu = torch.cuda.is_available() and torch.cuda.device_count() >= 2
dist.init_process_group("nccl" if gpu else "gloo")
rank = dist.get_rank()
device = torch.device(f"cuda:{rank}" if gpu else "cpu")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
torch.manual_seed(1)
x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
model = nn.parallel.DistributedDataParallel(sync_batchnorm(net(), sync, 2, device).to(device))
opt = torch.optim.SGD(model.parameters(), lr=0.5)
loss = nn.functional.cross_entropy(model(x[4 * rank:4 * rank + 4].to(device)), y[4 * rank:4 * rank + 4].to(device))
loss.backward()
opt.step()
if rank == 0:
    ref = net()  # one process, the union batch of 8
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    nn.functional.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    err = max(float((a.detach().cpu() - b.detach()).abs().max()) for a, b in zip(model.module.parameters(),
                                                                             ref.parameters()))
    open(out, "w").write(str(err))
dist.barrier()  # no process tears gloo down while the other still works
dist.destroy_process_group()
'''


@pytest.mark.parametrize("sync", [False, True])
def test_two_processes_batchnorm_vs_one_process(tmp_path, sync):
    """Per-process BN statistics: 2 processes x 4 images differ from 1 process x 8 after one step;
    with model.sync_batchnorm they are equal (needs 2 GPUs: torch's SyncBatchNorm is GPU-only)."""
    import os
    import subprocess
    import sys

    if sync and torch.cuda.device_count() < 2:
        pytest.skip("SyncBatchNorm runs on GPU tensors only; needs 2 CUDA devices")
    import socket

    script, out = tmp_path / "child.py", tmp_path / "err.txt"
    script.write_text(BN_CHILD)
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script), str(int(sync)), str(out)],
                          cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    err = float(out.read_text())
    assert (err < 1e-5) if sync else (err > 1e-3), err
