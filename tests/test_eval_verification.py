"""tools/eval_verification.py end to end: a tiny face run writes checkpoints, the tool rebuilds the
backbone from the run's config, loads the newest checkpoint and scores generated .bin files."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mhe_scale.data.face_bin import write_face_bin

from conftest import load_tool
from test_verification import naive_metrics, smooth_images

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """2 optimizer steps of a tiny MobileFaceNet + partial_fc on synthetic faces, a checkpoint each step."""
    from mhe_scale.train import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main([str(REPO_ROOT / "configs" / "face" / "casia_r18_mhs.yaml"), "data.name=face_synthetic",
                 "data.num_train=64", "data.num_classes=10", "data.image_size=32", "data.dali=false",
                 "model.name=mobilefacenet", "model.num_features=16", "model.width_mult=0.25", "head.name=partial_fc",
                 "head.sample_rate=1.0", "head.sizes=null", "head.mode=null", "head.cosine=null",
                 "head.num_sampled_groups=null", "eval.verification=[]", "train.epochs=1", "train.batch_size=32",
                 "train.warmup_steps=0", "train.save_every=1", "train.log_every=1", "train.resume=false",
                 "optim.lr=0.5", f"train.output_dir={out}"]) == 0
    return out


def run_tool(*args: str) -> tuple[int, str, str]:
    tool = load_tool("eval_verification")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = tool.main(list(args))
    return code, out.getvalue(), err.getvalue()


def reference_distances(backbone, images: torch.Tensor) -> np.ndarray:
    """Per pair, written out: e = normalise(f(x) + f(mirror x)), d = |e_a - e_b|^2."""
    backbone.eval()
    d = []
    with torch.no_grad():
        for a, b in zip(images[0::2], images[1::2]):
            e = []
            for img in (a, b):
                x = (img[None].float() / 255 - 0.5) / 0.5
                e.append(F.normalize(backbone(x) + backbone(x.flip(3)), dim=1)[0].double())
            d.append(float(((e[0] - e[1]) ** 2).sum()))
    return np.array(d)


def test_tool_scores_the_newest_checkpoint(tiny_run, tmp_path):
    tool = load_tool("eval_verification")
    step = tool.find_checkpoint(tiny_run)
    assert step == tiny_run / "partial_fc" / "checkpoints" / "step-00000002"
    from mhe_scale.config import load_config

    cfg = load_config(tool.find_config(step))
    backbone = tool.load_backbone(step, cfg)
    saved = {k[len("encoder."):]: v for k, v in load_file(str(step / "model.safetensors")).items()
             if k.startswith("encoder.")}
    state = backbone.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)

    # known answer: genuine pairs are the same image twice (distance 0), impostors differ
    n = 200
    images = smooth_images(2 * n, 32, 7)
    same = torch.arange(n) % 2 == 0
    images[0::2][same] = images[1::2][same]
    write_face_bin(tmp_path / "easy.bin", images, same)
    # independent check on a hard file: random labels, distinct images
    hard = smooth_images(2 * n, 32, 8)
    hard_same = torch.rand(n, generator=torch.Generator().manual_seed(9)) < 0.5
    write_face_bin(tmp_path / "hard.bin", hard, hard_same)
    code, out, err = run_tool(str(tiny_run), "--bin", str(tmp_path / "easy.bin"), str(tmp_path / "hard.bin"),
                              "--far", "0.1", "0.01", "--json", str(tmp_path / "r.json"))
    assert code == 0, err
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    easy = res["easy"]
    assert (easy["genuine"], easy["impostors"]) == (100, 100)
    assert easy["accuracy"] == 1.0 and easy["accuracy_std"] == 0.0 and easy["TAR@FAR=0.1"] == 1.0
    assert easy["TAR@FAR=0.01"] is None and "TAR@FAR=0.01 n/a (needs >= 112 impostor pairs)" in out
    assert "accuracy 100.00 +- 0.00 %" in out and "step-00000002" in out

    from mhe_scale.data.face_bin import read_face_bin

    ref = reference_distances(backbone, read_face_bin(tmp_path / "hard.bin").decode(size=32))
    accs, _, tars, _, _ = naive_metrics(ref, hard_same.numpy(), 10, None, None, 0.1)
    assert res["hard"]["accuracy"] == pytest.approx(accs.mean(), abs=1e-12)
    assert res["hard"]["accuracy_std"] == pytest.approx(accs.std(), abs=1e-12)
    assert res["hard"]["TAR@FAR=0.1"] == pytest.approx(tars.mean(), abs=1e-12)


def test_tool_all_genuine_bin_and_errors(tiny_run, tmp_path):
    write_face_bin(tmp_path / "genuine.bin", smooth_images(40, 32, 3), torch.ones(20, dtype=torch.bool))
    step = tiny_run / "partial_fc" / "checkpoints" / "step-00000001"
    with pytest.warns(UserWarning, match="genuine.bin: no impostor"):
        code, out, err = run_tool(str(step), "--bin", str(tmp_path / "genuine.bin"))
    assert code == 0, err
    assert "0 impostor" in out and "TAR@FAR=0.001 n/a" in out and "step-00000001" in out
    code, _, err = run_tool(str(tmp_path / "nowhere"), "--bin", str(tmp_path / "genuine.bin"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nowhere" in err
    code, _, err = run_tool(str(step), "--bin", str(tmp_path / "genuine.bin"), "--set", "model.num_features=8")
    assert code == 2 and "does not fit model.name=mobilefacenet" in err
