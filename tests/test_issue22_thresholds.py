"""Issue 22 item 5 (task side): the multilabel task tunes its thresholds on data.val_path and says so
in results.json; when that split is the scored test split, or shares images with it, the run prints
one warning line naming both (the documented workflow tuned on the test split without a word)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mhe_scale.train import main as train_main


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> Path:
    """24 random 16-px images, two classes; train = 0..11, val = 12..17, test = 18..23, overlap = 15..20."""
    import numpy as np

    root = tmp_path_factory.mktemp("ml")
    rng = np.random.default_rng(0)
    images = []
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append([f"{i}.png", ["a"] if i % 2 else ["a", "b"] if i % 3 else ["b"]])
    for name, part in (("train", images[:12]), ("val", images[12:18]), ("test", images[18:]), ("overlap", images[15:21])):
        (root / f"{name}.json").write_text(json.dumps({"classes": ["a", "b"], "images": part}))
    return root


def run(splits: Path, out: Path, val: str, capsys) -> tuple[str, dict]:
    capsys.readouterr()
    assert train_main(["configs/multilabel/coco_r50_pooled_bce.yaml", f"data.train_path={splits / 'train.json'}",
                       f"data.val_path={splits / val}", f"data.test_path={splits / 'test.json'}", "data.image_size=16",
                       "model.name=resnet18", "model.width=4", "train.batch_size=4", "train.epochs=1",
                       "train.eval_batch_size=8", "train.save_every=0", "train.num_workers=0", "train.warmup_epochs=0",
                       "train.ema_decay=null", f"train.output_dir={out}"]) == 0
    (result,) = json.loads((out / "results.json").read_text()).values()
    return capsys.readouterr().err, result


def test_tuning_on_the_test_split_warns_once_naming_it(splits, tmp_path, capsys):
    err, result = run(splits, tmp_path / "same", "test.json", capsys)
    lines = [line for line in err.splitlines() if line.startswith("warning: thresholds are tuned")]
    assert len(lines) == 1 and f"data.val_path={splits / 'test.json'}, which is the scored test split" in lines[0]
    assert result["thresholds"] == {"tuned_on": str(splits / "test.json"), "test_images_shared": 6, "same_file": True}
    err, result = run(splits, tmp_path / "overlap", "overlap.json", capsys)
    assert "shares 3 of its 6 images with the scored test split" in err  # images 18, 19, 20
    assert result["thresholds"]["test_images_shared"] == 3 and not result["thresholds"]["same_file"]


def test_a_held_out_val_split_tunes_without_a_warning(splits, tmp_path, capsys):
    err, result = run(splits, tmp_path / "held", "val.json", capsys)
    assert "warning: thresholds" not in err
    assert result["thresholds"] == {"tuned_on": str(splits / "val.json"), "test_images_shared": 0, "same_file": False}
    assert (tmp_path / "held" / "pooled-bce" / "thresholds.npy").is_file() and "CF1@tuned" in result["metrics"]


def test_shipped_coco_config_tunes_on_the_held_out_train_split():
    from mhe_scale.config import load_config

    cfg = load_config("configs/multilabel/base_coco.yaml")
    assert cfg.data.val_path == "data/coco/train_val.json" and cfg.data.val_path != cfg.data.test_path
