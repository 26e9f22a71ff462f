"""The multigrain task end to end on a CIFAR-layout archive: trains through fit (1 and 2 processes),
the margin loss sees every copy of an image across processes, resume continues exactly, β has its
own optimizer group without weight decay, and the loss is λ·CE + (1−λ)·margin."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mhe_scale.parallel.testing import free_port
import torch
from safetensors.torch import load_file

from mhe_scale.config import load_config
from mhe_scale.config import OptimConfig
from mhe_scale.losses.margin import MarginLoss
from mhe_scale.models.gem import GeM
from mhe_scale.models.resnet import resnet
from mhe_scale.tasks.multigrain import MultiGrainModel, build_optimizer
from mhe_scale.train import main as train_main

sys.path.insert(0, str(Path(__file__).parent))
from test_task_classify import write_archive  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/multigrain/cifar10_r18_joint_p3.yaml"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return write_archive(tmp_path_factory.mktemp("mg") / "images.tar.gz", per_class=6)


def overrides(archive: Path, out: Path, *extra: str) -> list[str]:
    # 36 train images, micro-batch 6 (2 distinct x 3 copies): 6 steps per epoch
    return [f"data.path={archive}", f"data.cache_dir={out.parent / 'cache'}", "data.num_classes=6",
            "model.width=4", "train.batch_size=6", "train.epochs=1", "train.eval_batch_size=16",
            "train.log_every=1", "train.save_every=2", "train.keep_last=0", "optim.lr=0.02", "train.seed=3",
            "train.num_workers=0", f"train.output_dir={out}", *extra]


def log_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in next(out.glob("*/loss_log.jsonl")).read_text().splitlines()]


def test_trains_logs_both_losses_and_resumes_exactly(archive, tmp_path):
    out = tmp_path / "run"
    assert train_main([CONFIG, *overrides(archive, out, "train.epochs=1")]) == 0
    results = json.loads((out / "results.json").read_text())
    (metrics,) = [r["metrics"] for r in results.values()]
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    log = log_of(out)
    assert [r["step"] for r in log] == list(range(1, 7))
    for r in log:  # joint objective: loss = 0.5 ce + 0.5 margin; every anchor has its 2 other copies
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["margin"], rel=1e-5, abs=1e-6)
        assert r["pairs"] == pytest.approx(2.0)
    ckpts = next(out.glob("*/checkpoints"))
    final = load_file(str(ckpts / "step-00000006" / "model.safetensors"))
    assert "margin.beta" in final and any(k.endswith("pool.p") for k in final)
    # crash after step 4: drop the last checkpoint, rerun the same command -> resumes from step 4
    shutil.rmtree(ckpts / "step-00000006")
    assert train_main([CONFIG, *overrides(archive, out, "train.epochs=1")]) == 0
    again = load_file(str(ckpts / "step-00000006" / "model.safetensors"))
    for key in final:
        assert torch.equal(final[key], again[key]), key
    assert [r["loss"] for r in log_of(out)] == [r["loss"] for r in log]


def test_lambda_one_is_plain_cross_entropy(archive, tmp_path):
    out = tmp_path / "ce"
    assert train_main([CONFIG, *overrides(archive, out, "model.lam=1.0", "model.gem_p=1.0")]) == 0
    for r in log_of(out):
        assert r["loss"] == pytest.approx(r["ce"], rel=1e-6)


def test_beta_group_has_no_weight_decay_and_the_classifier_sees_unnormalised_embeddings():
    torch.manual_seed(0)
    model = MultiGrainModel(resnet(18, stem="cifar", width=4, pool=GeM(3.0)), 5, 0.5, MarginLoss(beta_init=1.2))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4), model, beta_lr=0.5)
    beta_group = [g for g in opt.param_groups if g["name"] == "beta"][0]
    assert beta_group["params"] == [model.margin.beta] and beta_group["weight_decay"] == 0 and beta_group["lr"] == 0.5
    other = [g for g in opt.param_groups if g["name"] == "network"][0]
    assert other["weight_decay"] == 1e-4 and len(other["params"]) == len(list(model.parameters())) - 1
    x = torch.randn(6, 3, 32, 32)
    model.eval()
    e = model.embed(x)
    assert not torch.allclose(e.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(model.predict(x, 5)[0], model.classifier(e).topk(5, dim=1)[0])


def test_wrong_sampler_is_refused(archive, tmp_path, capsys):
    code = train_main([CONFIG, *overrides(archive, tmp_path / "x", "data.sampler=epoch")])
    assert code != 0 and "data.sampler=repeated_aug" in capsys.readouterr().err


def test_micro_steps_that_would_split_copies_are_refused(archive, tmp_path, capsys):
    code = train_main([CONFIG, *overrides(archive, tmp_path / "x", "train.batch_size=4", "train.grad_accum_steps=3")])
    assert code != 0 and "not a multiple of model.num_repeats=3" in capsys.readouterr().err


def test_two_processes_gather_the_copies_and_resume(archive, tmp_path):
    """With 2 processes each image's 3 copies are split over the ranks (samplers.py); the margin
    loss must still see all of them (pairs == 2), and a resumed 2-process run continues exactly."""
    out = tmp_path / "two"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "mhe_scale.train", CONFIG,
           *overrides(archive, out, "train.batch_size=3")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    log = log_of(out)
    assert len(log) == 6 and all(r["pairs"] == pytest.approx(2.0) for r in log)
    ckpts = next(out.glob("*/checkpoints"))
    final = load_file(str(ckpts / "step-00000006" / "model.safetensors"))
    shutil.rmtree(ckpts / "step-00000006")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    again = load_file(str(ckpts / "step-00000006" / "model.safetensors"))
    for key in final:
        assert torch.equal(final[key], again[key]), key


def test_shipped_multigrain_configs_load():
    for path in sorted((REPO / "configs" / "multigrain").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.task == "multigrain" and cfg.data.sampler == "repeated_aug", path
        assert cfg.train.batch_size % cfg.model.num_repeats == 0, path


def _tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tools_run_on_a_trained_checkpoint(archive, tmp_path, capsys):
    """tools/pstar.py (both modes) and tools/eval_retrieval.py on the checkpoint of a tiny run."""
    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    assert train_main([CONFIG, *overrides(archive, out, "train.save_every=6")]) == 0
    ckpt = next(out.glob("*/checkpoints/step-00000006/model.safetensors"))
    config = out / "config.yaml"  # the resolved config of the run
    capsys.readouterr()
    assert _tool("pstar").main(["crossval", str(config), str(ckpt), "--largest-side", "40", "--grid", "1", "3",
                                "--limit", "12"]) == 0
    cv = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cv["p_start"] == 3.0 and set(cv["top1"]) == {"1.0", "3.0"} and cv["p_star"] in (1.0, 3.0)
    new = tmp_path / "pstar.safetensors"
    assert _tool("pstar").main(["finetune", str(config), str(ckpt), "--largest-side", "40", "--per-class", "2",
                                "--batch-size", "4", "--out", str(new)]) == 0
    ft = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ft["steps"] == 3 and ft["p_star"] >= 1.0 and load_file(str(new))["backbone.pool.p"].item() == ft["p_star"]
    rng = np.random.default_rng(0)
    for name in ["100000", "100001", "100100", "100101", "100102"]:
        (tmp_path / "hol" / "jpg").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "hol" / "jpg" / f"{name}.jpg")
    assert _tool("eval_retrieval").main([str(config), str(new), "--protocol", "holidays", "--root",
                                         str(tmp_path / "hol"), "--largest-side", "48", "--p", "4",
                                         "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["protocol"] == "holidays" and 0 < metrics["mAP"] <= 100
    # bad input: one line naming the file, exit 2 (a traceback before)
    (tmp_path / "gnd.json").write_text('{"qimlist": ["a"], "gnd": [')
    (tmp_path / "junk.safetensors").write_text("junk")
    for args, named in ([str(config), str(new), "--protocol", "revisited", "--root", str(tmp_path / "hol"), "--gnd",
                         str(tmp_path / "gnd.json")], "gnd.json: not readable JSON"), \
                       ([str(config), str(tmp_path / "junk.safetensors"), "--protocol", "holidays", "--root",
                         str(tmp_path / "hol")], "junk.safetensors: not a readable safetensors file"):
        assert _tool("eval_retrieval").main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("eval_retrieval: error: ") and named in err and "\n" not in err
