"""The multilabel task end to end on real COCO-MINI photos: every head x loss trains and is scored,
thresholds.npy is written, 2 processes equal 1 process with accumulation, resume continues."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhe_scale.parallel.testing import free_port
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, load_tool
from mhe_scale.config import load_config
from mhe_scale.data.multilabel_json import read_multilabel_json, write_multilabel_json
from mhe_scale.eval.multilabel import mean_average_precision
from mhe_scale.tasks.multilabel import (MultilabelClassifier, build_criterion, build_net, load_multilabel_data,
                                        predict_probabilities)
from mhe_scale.train import main as train_main


@pytest.fixture(scope="module")
def coco_splits(coco_mini, tmp_path_factory) -> Path:
    """train.json (the 80 train2017 photos), val.json / test.json (val2017 halves)."""
    root = tmp_path_factory.mktemp("coco-splits")
    tool = load_tool("import_coco")
    for split, out in (("train", "train.json"), ("val", "val_all.json")):
        assert tool.main([str(coco_mini / "annotations" / f"instances_{split}2017.json"), "--images",
                          str(coco_mini / f"{split}2017"), "--out", str(root / out)]) == 0
    raw = json.loads((root / "val_all.json").read_text())
    # the importer's image_root (when it writes one) holds the images of both halves
    write_multilabel_json(root / "val.json", raw["classes"], raw["images"][:40], image_root=raw.get("image_root"))
    write_multilabel_json(root / "test.json", raw["classes"], raw["images"][40:], image_root=raw.get("image_root"))
    return root


def overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_path={root / 'train.json'}", f"data.val_path={root / 'val.json'}",
            f"data.test_path={root / 'test.json'}", "data.image_size=32", "model.name=resnet18", "model.width=4",
            "model.decoder_dim=16", "model.decoder_heads=2", "model.decoder_ff=32", "model.num_groups=20",
            "model.gcn_hidden=16", "model.gcn_embed_dim=8", "train.batch_size=8", "train.epochs=1",
            "train.eval_batch_size=16", "train.log_every=1", "train.save_every=5", "train.num_workers=0",
            "train.warmup_epochs=0", "train.ema_decay=null", "optim.lr=0.001", "train.seed=3",
            f"train.output_dir={out}", *extra]


@pytest.mark.parametrize("head,loss", [("pooled", "bce"), ("pooled", "asl"), ("pooled_cosine", "aam"),
                                       ("ml_decoder", "asl"), ("ml_decoder-cos", "aam"), ("ml_gcn-cos", "aam")])
def test_every_head_and_loss_trains_and_is_scored(coco_splits, tmp_path, head, loss):
    name, _, cos = head.partition("-")
    out = tmp_path / "run"
    ema = ["train.ema_decay=0.9"] if name == "ml_gcn" else []  # scored with the averaged weights
    assert train_main(["configs/multilabel/coco_r50_pooled_bce.yaml",  # loss keys unset: each loss's defaults
                       *overrides(coco_splits, out, f"model.head={name}", f"model.cosine={bool(cos)}",
                                  f"loss.name={loss}", "train.epochs=0.2", *ema)]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert 0.0 < metrics["mAP"] <= 1.0
    assert {"CF1@0.5", "OF1@0.5", "CF1@tuned", "OF1@tuned", "F1_example@tuned"} <= set(metrics)
    (thresholds,) = out.glob("*/thresholds.npy")
    assert np.load(thresholds).shape == (80,) and np.load(thresholds).dtype == np.float32


def test_cosine_head_with_a_logit_loss_is_refused(coco_splits, tmp_path, capsys):
    code = train_main(["configs/multilabel/coco_r50_mldecoder_asl.yaml",
                       *overrides(coco_splits, tmp_path, "model.head=pooled_cosine", "loss.name=asl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "loss.name='asl' does not fit model.head='pooled_cosine'" in err and "\n" not in err


def torchrun(args: list[str]) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "mhe_scale.train", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_processes_equal_one_process_with_accumulation_and_resume(coco_splits, tmp_path):
    """2 processes x micro-batch 8 == 1 process x 8 x 2 accumulation (same micro-batches, so batch
    norm sees the same statistics); metrics gathered over processes equal the single-process ones;
    a run resumed from its step-5 checkpoint ends with the same weights."""
    cfg = ["configs/multilabel/coco_r50_mldecoder_aam.yaml"]
    common = ["model.decoder_dropout=0", "train.epochs=1"]
    one = tmp_path / "one"
    assert train_main([*cfg, *overrides(coco_splits, one, *common, "train.grad_accum_steps=2")]) == 0
    two = tmp_path / "two"
    torchrun([*cfg, *overrides(coco_splits, two, *common)])
    folder = "ml_decoder-cos-aam"
    step = "checkpoints/step-00000005"  # 80 images / 16 per step
    a, b = (load_file(str(d / folder / step / "model.safetensors")) for d in (one, two))
    for key in (k for k in a if "running" not in k and "num_batches" not in k):
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    # the metrics gathered over 2 processes are those of the saved model scored by one process
    two_metrics = json.loads((two / "results.json").read_text())[folder]["metrics"]
    config = load_config(cfg[0], overrides(coco_splits, two, *common))
    data = load_multilabel_data(config.data)
    net = build_net(config, 80, data.train.annotations.targets)
    net.load_state_dict(b)
    probs, targets = predict_probabilities(MultilabelClassifier(net, build_criterion(config.loss)), data.test, 7)
    assert mean_average_precision(probs, targets)[0] == pytest.approx(two_metrics["mAP"], abs=1e-6)
    # resume: a copy of a 2-epoch run cut back to its step-5 checkpoint resumes there and ends equal
    full = tmp_path / "full"
    args = [*cfg, *common, "train.grad_accum_steps=2", "train.epochs=2"]
    assert train_main([*args[:1], *overrides(coco_splits, full, *args[1:])]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    end = "checkpoints/step-00000010"
    shutil.rmtree(resumed / folder / end)
    assert train_main([*args[:1], *overrides(coco_splits, resumed, *args[1:])]) == 0
    assert json.loads((resumed / "results.json").read_text())[folder]["resumed_from"] == 5
    a, b = (load_file(str(d / folder / end / "model.safetensors")) for d in (full, resumed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_shipped_multilabel_configs_build_their_net():
    targets = np.random.default_rng(0).random((50, 80)) < 0.1
    for path in sorted((REPO_ROOT / "configs" / "multilabel").glob("*.yaml")):
        cfg = load_config(path, ["model.width=4"])  # the published width only costs time here
        assert cfg.task == "multilabel", path
        net = build_net(cfg, 80, targets)
        assert net.head.num_classes == 80 and float(net.logit_scale) == (cfg.loss.s or 1.0), path
