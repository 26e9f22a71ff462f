"""Issue 22 item 2: tools/export_onnx.py exports the weights the run's metrics and thresholds came
from (an EMA run: ema.safetensors over model.safetensors; it exported model.safetensors, whose decisions
at the tuned thresholds differed on 48.5% of entries), says which, writes a sidecar JSON a deployment
reads, creates a missing --out folder and says so, and refuses bad checkpoints with one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import load_tool
from mhe_scale.config import load_config
from mhe_scale.data.image_dataset import IMAGENET_MEAN, IMAGENET_STD, transform_preset
from mhe_scale.data.multilabel_json import MultilabelImageDataset, read_multilabel_json
from mhe_scale.eval.multilabel import multilabel_report
from mhe_scale.tasks.multilabel import build_net
from mhe_scale.train import main as train_main

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
CONFIG = "configs/multilabel/coco_r50_pooled_bce.yaml"


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A 6-step EMA run (decay 0.9, lr 0.01: the average lags the weights) on 40 random 16-px images, 4 classes."""
    root = tmp_path_factory.mktemp("ema")
    rng = np.random.default_rng(1)
    images = []
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append([f"{i}.png", [c for c in "abcd" if rng.random() < 0.4]])
    for name, part in (("train", images[:24]), ("val", images[24:32]), ("test", images[32:])):
        (root / f"{name}.json").write_text(json.dumps({"classes": list("dcba"), "images": part}))
    overrides = [f"data.train_path={root / 'train.json'}", f"data.val_path={root / 'val.json'}",
                 f"data.test_path={root / 'test.json'}", "data.image_size=16", "model.name=resnet18", "model.width=4"]
    assert train_main([CONFIG, *overrides, "train.batch_size=4", "train.epochs=1", "train.eval_batch_size=8",
                       "train.save_every=3", "train.num_workers=0", "train.warmup_epochs=0", "train.ema_decay=0.9",
                       "optim.lr=0.01", f"train.output_dir={root / 'run'}"]) == 0
    return root, overrides


def reference(root: Path, overrides: list[str], weights: str) -> np.ndarray:
    """PyTorch probabilities [8, 4] of the test images with the final step's raw or EMA weights."""
    cfg = load_config(CONFIG, overrides)
    net = build_net(cfg, 4, None)
    step = root / "run" / "pooled-bce" / "checkpoints" / "step-00000006"
    state = load_file(str(step / "model.safetensors"))
    if weights == "ema":
        state |= load_file(str(step / "ema.safetensors"))
    net.load_state_dict(state)
    net.eval()
    data = MultilabelImageDataset(read_multilabel_json(root / "test.json"), transform_preset("imagenet", False, size=16))
    with torch.no_grad():
        return torch.sigmoid(net.logits(torch.stack([data[i][0] for i in range(len(data))]))).numpy()


def onnx_probabilities(path: Path, root: Path) -> np.ndarray:
    data = MultilabelImageDataset(read_multilabel_json(root / "test.json"), transform_preset("imagenet", False, size=16))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": torch.stack([data[i][0] for i in range(len(data))]).numpy()})[0]


def test_default_export_is_the_ema_weights_the_run_was_scored_with(ema_run, tmp_path, capsys):
    root, overrides = ema_run
    run = root / "run" / "pooled-bce"
    out = tmp_path / "new" / "model.onnx"
    capsys.readouterr()
    assert load_tool("export_onnx").main([CONFIG, str(run), "--out", str(out), *overrides]) == 0
    stdout = capsys.readouterr().out
    assert "weights: ema" in stdout and f"created folder {out.parent}" in stdout
    side = json.loads((tmp_path / "new" / "model.onnx.json").read_text())
    thresholds = np.load(run / "thresholds.npy")
    assert side["weights"] == "ema" and side["classes"] == ["a", "b", "c", "d"]
    assert side["thresholds"] == [float(t) for t in thresholds] and side["thresholds_match_weights"] is True
    assert side["input"]["shape"] == ["batch", 3, 16, 16] and side["input"]["channel_order"] == "RGB"
    assert side["input"]["mean"] == list(IMAGENET_MEAN) and side["input"]["std"] == list(IMAGENET_STD)
    assert side["run_folder"] == str(run.resolve()) and side["step_folder"].endswith("step-00000006")
    want = reference(root, overrides, "ema")
    # the reference is the model the run scored: its metrics at the saved thresholds are results.json's
    (result,) = json.loads((root / "run" / "results.json").read_text()).values()
    targets = read_multilabel_json(root / "test.json").targets
    report = multilabel_report(want, targets, thresholds)
    for key in ("mAP", "CF1@tuned", "OF1@tuned", "OF1@0.5"):
        assert report[key] == pytest.approx(result["metrics"][key], abs=1e-6), key
    got = onnx_probabilities(out, root)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    clear = np.abs(want - thresholds) > 1e-4  # decisions at the thresholds, away from exact ties
    assert clear.mean() > 0.9 and np.array_equal((got >= thresholds)[clear], (want >= thresholds)[clear])


def test_raw_weights_on_request_and_they_differ(ema_run, tmp_path, capsys):
    root, overrides = ema_run
    step = root / "run" / "pooled-bce" / "checkpoints" / "step-00000006"
    out = tmp_path / "raw.onnx"
    capsys.readouterr()
    assert load_tool("export_onnx").main([CONFIG, str(step / "model.safetensors"), "--out", str(out),
                                          "--weights", "model", *overrides]) == 0
    assert "weights: model" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw.onnx.json").read_text())["weights"] == "model"
    got, raw, ema = onnx_probabilities(out, root), reference(root, overrides, "model"), reference(root, overrides, "ema")
    np.testing.assert_allclose(got, raw, rtol=1e-4, atol=1e-5)
    assert np.abs(raw - ema).max() > 1e-3  # the test can tell the two apart
    # naming model.safetensors of an EMA step folder still exports the average by default (what the docs said to pass)
    assert load_tool("export_onnx").main([CONFIG, str(step / "model.safetensors"), "--out", str(out), *overrides]) == 0
    np.testing.assert_allclose(onnx_probabilities(out, root), ema, rtol=1e-4, atol=1e-5)
    older = root / "run" / "pooled-bce" / "checkpoints" / "step-00000003"
    capsys.readouterr()
    assert load_tool("export_onnx").main([CONFIG, str(older), "--out", str(out), *overrides]) == 0
    assert "was tuned on the run's final weights (step-00000006), not on step-00000003" in capsys.readouterr().out
    assert json.loads((tmp_path / "raw.onnx.json").read_text())["thresholds_match_weights"] is False


def test_bad_checkpoints_are_one_line(ema_run, tmp_path, capsys):
    root, overrides = ema_run
    step = root / "run" / "pooled-bce" / "checkpoints" / "step-00000006"
    truncated = tmp_path / "step-00000006"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes()[:4000])
    cases = [(truncated / "model.safetensors", [], "model.safetensors: not a readable safetensors file"),
             (truncated, [], "model.safetensors: not a readable safetensors file"),
             (step, ["model.width=8"], "does not fit the config's model (size mismatch"),
             (step, ["model.head=ml_decoder"], "does not fit the config's model: missing"),
             (truncated / "model.safetensors", ["--weights", "ema"], "not a readable safetensors file"),
             (tmp_path / "nothing", [], "does not exist")]
    tool = load_tool("export_onnx")
    for checkpoint, extra, named in cases:
        capsys.readouterr()
        assert tool.main([CONFIG, str(checkpoint), "--out", str(tmp_path / "x.onnx"), *overrides, *extra]) == 2, named
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err and err.startswith("error: "), err
    (step / "ema.safetensors").rename(tmp_path / "ema.safetensors")
    try:  # a step folder whose files no longer match its manifest is refused
        capsys.readouterr()
        assert tool.main([CONFIG, str(step), "--out", str(tmp_path / "x.onnx"), *overrides]) == 2
        assert "fails verification against its manifest: ema.safetensors is missing" in capsys.readouterr().err
    finally:
        (tmp_path / "ema.safetensors").rename(step / "ema.safetensors")


def test_a_config_other_than_the_runs_is_refused(ema_run, tmp_path, capsys):
    """The shipped config with only the model overrides exported at its data.image_size (448) a run trained at
    64: same weights, other decisions (mAP 9.2 vs the run's 10.9 on COCO-MINI), sidecar and all, rc 0."""
    root, overrides = ema_run
    run = root / "run" / "pooled-bce"
    tool = load_tool("export_onnx")
    out = tmp_path / "x.onnx"
    for extra, named in ((["data.image_size=32"], "data.image_size: 32 here, 16 in the run"),
                         (["data.preset=cifar"], 'data.preset: "cifar" here, "imagenet" in the run')):
        capsys.readouterr()
        assert tool.main([CONFIG, str(run), "--out", str(out), *overrides, *extra]) == 2, named
        err = capsys.readouterr().err.strip()
        assert named in err and "\n" not in err and f"pass the run's own config ({root / 'run' / 'config.yaml'})" in err
        assert not out.exists()
    # another input size on purpose: --image-size
    assert tool.main([CONFIG, str(run), "--out", str(out), *overrides, "--image-size", "24"]) == 0
    assert json.loads(out.with_name("x.onnx.json").read_text())["input"]["shape"] == ["batch", 3, 24, 24]
    # the run's own resolved config as CONFIG, no overrides at all (data paths are absolute in it)
    assert tool.main([str(root / "run" / "config.yaml"), str(run), "--out", str(out)]) == 0
    assert json.loads(out.with_name("x.onnx.json").read_text())["input"]["shape"] == ["batch", 3, 16, 16]


def test_the_sidecars_resize_rule_is_the_eval_transform(ema_run, tmp_path):
    """It said only 'resize the shorter side to R, centre crop S': rounding the longer side or flooring the
    offsets is one pixel off (20x24 images at S 16: longer side 21.6, left offset 2.5)."""
    import math

    root, overrides = ema_run
    out = tmp_path / "m.onnx"
    assert load_tool("export_onnx").main([CONFIG, str(root / "run" / "pooled-bce"), "--out", str(out), *overrides]) == 0
    rule = json.loads(out.with_name("m.onnx.json").read_text())["input"]["resize_exact"]
    assert (rule["longer_side"], rule["crop_offset"], rule["interpolation"]) == ("floor", "round_half_even",
                                                                                 "PIL bilinear")
    pixels = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    r, s = rule["shorter_side"], rule["crop"]
    h, w = pixels.shape[:2]
    nh, nw = (r, math.floor(r * w / h)) if h <= w else (math.floor(r * h / w), r)
    resized = np.asarray(Image.fromarray(pixels).resize((nw, nh), Image.BILINEAR))
    top, left = round((nh - s) / 2), round((nw - s) / 2)  # Python's round: half to even
    mine = resized[top:top + s, left:left + s]
    rng = np.random.default_rng(0)
    library = transform_preset("imagenet", False, size=16).transforms[0](pixels, rng)
    assert (nw, left) == (21, 2) and np.array_equal(mine, library)

