"""tools/eval_retrieval.py on a tiny multigrain run: a run / step folder resolves to the newest
verified checkpoint (named on stderr), the run's preset and training resolution are the defaults
(CIFAR statistics, 32 px: no 15x enlargement to 500), the labelled-folder protocol, progress bars,
and one-line refusals."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import load_tool
from mhe_scale.config import load_config
from mhe_scale.data.image_dataset import CIFAR10_MEAN, CIFAR10_STD
from mhe_scale.eval.retrieval import evaluate, labelled_folder
from mhe_scale.tasks.multigrain import build_model
from mhe_scale.train import main as train_main

sys.path.insert(0, str(Path(__file__).parent))
from test_multigrain_task import CONFIG, overrides  # noqa: E402
from test_task_classify import write_archive  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished 6-step run with step folders 2, 4, 6 (tests that corrupt one work on a copy)."""
    base = tmp_path_factory.mktemp("evalret")
    archive = write_archive(base / "images.tar.gz", per_class=6)
    out = base / "run"
    assert train_main([CONFIG, *overrides(archive, out, "train.save_every=2")]) == 0
    return out


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instances")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"id{c}").mkdir()
        for i in range(3):
            base = np.array([80 * c, 200 - 60 * c, 40 + 70 * c], np.float64)
            pixels = np.clip(base + rng.normal(0, 40, 3) + rng.normal(0, 40, (24, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / f"id{c}" / f"{i}.png")
    return root


def tool_run(capsys, *args: str) -> tuple[int, dict | None, str]:
    code = load_tool("eval_retrieval").main([*map(str, args), "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, (json.loads(out.strip().splitlines()[-1]) if code == 0 else None), err


def expected(run: Path, step: str, instances: Path, side: int, mean, std) -> dict:
    """evaluate() on the step's weights, built here from the run's config."""
    cfg = load_config(run / "config.yaml")
    state = load_file(str(next(run.glob(f"*/checkpoints/{step}/model.safetensors"))))
    model = build_model(cfg.model, int(state["classifier.weight"].shape[0]))
    model.load_state_dict(state)
    return evaluate(labelled_folder(instances), model.eval().embed, side, mean, std, batch_size=16)


def test_run_folder_uses_the_newest_checkpoint_and_the_runs_preset(run, instances, capsys):
    code, got, err = tool_run(capsys, run, "--protocol", "folder", "--root", instances)
    assert code == 0, err
    assert got["checkpoint"].endswith("step-00000006/model.safetensors") and "step-00000006 (manifest verified)" in err
    # the run trained at 32 px with the cifar preset: its statistics, no enlargement to 500
    assert (got["preset"], got["largest_side"], got["upsample_limit"]) == ("cifar", 32, 32)
    assert got["mean"] == list(CIFAR10_MEAN) and got["std"] == list(CIFAR10_STD)
    want = expected(run, "step-00000006", instances, 32, CIFAR10_MEAN, CIFAR10_STD)
    assert {k: got[k] for k in want} == want
    assert got["queries"] == 9 and set(want) >= {"mAP", "recall@1", "recall@5", "recall@10"}
    assert "embed folder:" in err and "rank folder" in err  # progress bars


def test_a_corrupt_newest_step_is_skipped_and_named(run, instances, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step6 = next(copy.glob("*/checkpoints/step-00000006"))
    with open(step6 / "model.safetensors", "r+b") as f:
        f.truncate(100)
    for target in (copy, step6.parent.parent, step6.parent):  # output_dir, run folder, checkpoints/
        code, got, err = tool_run(capsys, target, "--protocol", "folder", "--root", instances)
        assert code == 0, err
        assert got["checkpoint"].endswith("step-00000004/model.safetensors"), target
        assert "skipped newer step-00000006: model.safetensors has 100 bytes" in err
    code, got, err = tool_run(capsys, step6.parent / "step-00000002", "--protocol", "folder", "--root", instances)
    assert code == 0 and got["checkpoint"].endswith("step-00000002/model.safetensors")  # a step folder named
    assert got["mAP"] == expected(copy, "step-00000002", instances, 32, CIFAR10_MEAN, CIFAR10_STD)["mAP"]
    code, _, err = tool_run(capsys, step6, "--protocol", "folder", "--root", instances)
    assert code == 2 and "step-00000006: checkpoint is unusable (fails verification against its manifest: model.safetensors has 100 bytes" in err
    assert err.startswith("eval_retrieval: error: ") and err.count("\n") == 1


def test_larger_sides_only_when_asked(run, instances, capsys):
    code, got, err = tool_run(capsys, run, "--protocol", "folder", "--root", instances, "--largest-side", "500")
    assert code == 0 and (got["largest_side"], got["upsample_limit"]) == (500, 32)
    assert got["mAP"] == expected(run, "step-00000006", instances, 32, CIFAR10_MEAN, CIFAR10_STD)["mAP"]
    code, got, err = tool_run(capsys, run, "--protocol", "folder", "--root", instances, "--largest-side", "48",
                              "--upsample")
    assert code == 0 and (got["largest_side"], got["upsample_limit"]) == (48, None)
    assert got["mAP"] == expected(run, "step-00000006", instances, 48, CIFAR10_MEAN, CIFAR10_STD)["mAP"]


@pytest.mark.parametrize("case", ["empty", "no_config", "side", "two_configs"])
def test_refusals_are_one_line(run, instances, tmp_path, capsys, case):
    weights = next(run.glob("*/checkpoints/step-00000006/model.safetensors"))
    if case == "empty":
        args, named = [tmp_path, "--protocol", "folder", "--root", instances], "no model.safetensors there and no run folder"
    elif case == "no_config":
        lone = tmp_path / "w.safetensors"
        shutil.copy(weights, lone)
        args, named = [lone, "--protocol", "folder", "--root", instances], "no config.yaml in or above"
    elif case == "side":
        args, named = [run, "--protocol", "folder", "--root", instances, "--largest-side", "-3"], \
            "--largest-side must be >= 1"
    else:
        args, named = [run / "config.yaml", weights, "--config", run / "config.yaml", "--protocol", "folder",
                       "--root", instances], "both given"
    code, _, err = tool_run(capsys, *args)
    assert code == 2 and named in err and err.startswith("eval_retrieval: error: ") and err.count("\n") == 1


def test_ema_weights_on_request(run, instances, tmp_path, capsys):
    code, _, err = tool_run(capsys, run, "--protocol", "folder", "--root", instances, "--ema")
    assert code == 2 and "--ema: no ema.safetensors beside" in err  # the run trained without EMA
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = next(copy.glob("*/checkpoints/step-00000006"))
    live = load_file(str(step / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    shadows = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in live.items() if v.is_floating_point()}
    save_file({**shadows, "__swa_samples__": torch.tensor(3)}, str(step / "ema.safetensors"))
    code, got, err = tool_run(capsys, copy, "--protocol", "folder", "--root", instances)
    assert code == 0 and not got["ema"] and "the run also saved EMA weights: --ema uses them" in err
    code, got_ema, err = tool_run(capsys, copy, "--protocol", "folder", "--root", instances, "--ema")
    assert code == 0 and got_ema["ema"] and "EMA weights of" in err
    cfg = load_config(copy / "config.yaml")
    model = build_model(cfg.model, int(live["classifier.weight"].shape[0]))
    model.load_state_dict({**live, **shadows})
    want = evaluate(labelled_folder(instances), model.eval().embed, 32, CIFAR10_MEAN, CIFAR10_STD, batch_size=16)
    assert got_ema["mAP"] == want["mAP"] and got_ema["recall@1"] == want["recall@1"]
    assert (got_ema["mAP"], got_ema["recall@1"]) != (got["mAP"], got["recall@1"])  # the shadows mattered
