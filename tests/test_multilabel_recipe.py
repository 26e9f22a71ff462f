"""Recipe options of the multilabel task (issue 13): RandAugment switch, early stopping on validation
mAP, and the refusal of SAM."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mhe_scale.data.rand_augment import RandAugment
from mhe_scale.tasks.early_stop import EarlyStopping
from mhe_scale.tasks.multilabel import MultilabelDataConfig, train_transform
from mhe_scale.train import main as train_main
from test_multilabel_task import coco_splits, overrides  # noqa: F401 (a fixture)


def test_data_rand_augment_inserts_randaugment_before_to_tensor() -> None:
    assert not any(isinstance(t, RandAugment) for t in train_transform(MultilabelDataConfig()).transforms)
    tf = train_transform(MultilabelDataConfig(preset="cifar", rand_augment=[2, 9]))
    (ra,) = [t for t in tf.transforms if isinstance(t, RandAugment)]
    assert (ra.num_ops, ra.magnitude) == (2, 9.0)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    a, b = tf(img, np.random.default_rng([0, 1, 2])), tf(img, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 32, 32) and bool((a == b).all())


@pytest.mark.parametrize("value,match", [([2], r"give \[N, M\]"), ([1.5, 3], r"give \[N, M\]"),
                                         ([2, 12], "data.rand_augment: RandAugment needs")])
def test_bad_data_rand_augment_is_refused(value, match) -> None:
    with pytest.raises(ValueError, match=match):
        train_transform(MultilabelDataConfig(rand_augment=value))


# ---------------------------------------------------------------- early stopping on validation mAP
def test_early_stopping_rule_counts_evaluations_without_a_rise() -> None:
    rule = EarlyStopping("val_mAP", patience=2, min_delta=0.01)
    answers = [rule(s, {"val_mAP": v}) for s, v in ((2, 0.30), (4, 0.35), (6, 0.355), (8, float("nan")))]
    assert answers == [False, False, False, True] and (rule.best, rule.best_step) == (0.35, 4)


def test_early_stopping_state_travels_with_the_checkpoint(tmp_path) -> None:
    rule = EarlyStopping("val_mAP", patience=3)
    rule(2, {"val_mAP": 0.5}), rule(4, {"val_mAP": 0.4})
    rule.extra_state(True).save(tmp_path)
    again = EarlyStopping("val_mAP", patience=3)
    again.extra_state(False).load(tmp_path)
    assert (again.best, again.best_step, again.bad) == (0.5, 2, 1)
    assert again(6, {"val_mAP": 0.45}) is False and again(8, {"val_mAP": 0.45}) is True  # 3rd without a rise
    with pytest.raises(FileNotFoundError, match="without early stopping"):
        EarlyStopping("val_mAP", 1).extra_state(False).load(tmp_path / "nowhere")


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_the_task_stops_when_validation_map_cannot_rise_and_a_resume_trains_no_further(coco_splits, tmp_path):
    out = tmp_path / "run"
    args = ["configs/multilabel/coco_r50_pooled_bce.yaml",
            *overrides(coco_splits, out, "model.head=pooled", "loss.name=bce", "train.eval_every=2",
                       "train.save_every=3", "train.resume=auto",
                       "recipe.early_stop_patience=1", "recipe.early_stop_min_delta=1.0")]  # no rise can count
    assert train_main(args) == 0  # 80 images / batch 8: 10 steps planned
    (run,) = json.loads((out / "results.json").read_text()).values()
    stop = run["early_stop"]
    assert (stop["stopped"], stop["key"], stop["best_step"], stop["bad"]) == (True, "val_mAP", 2, 1)
    assert 0 < stop["best"] <= 1
    evals = [json.loads(line) for line in (out / "pooled-bce" / "eval_log.jsonl").read_text().splitlines()]
    assert _steps(out / "pooled-bce" / "eval_log.jsonl") == [2, 4] and "val_mAP" in evals[0]
    assert _steps(out / "pooled-bce" / "loss_log.jsonl")[-1] == 4
    ckpts = sorted(p.name for p in (out / "pooled-bce" / "checkpoints").iterdir())
    assert ckpts[-1] == "step-00000004"

    assert train_main(args) == 0  # resume from the stop: nothing more is trained
    (again,) = json.loads((out / "results.json").read_text()).values()
    assert again["resumed_from"] == 4 and again["early_stop"]["stopped"] is True
    assert again["early_stop"]["best_step"] == 2
    assert _steps(out / "pooled-bce" / "loss_log.jsonl")[-1] == 4


def test_early_stopping_without_a_val_split_or_evaluations_is_refused(coco_splits, tmp_path, capsys):
    base = overrides(coco_splits, tmp_path, "model.head=pooled", "loss.name=bce", "recipe.early_stop_patience=2")
    code = train_main(["configs/multilabel/coco_r50_pooled_bce.yaml", *base, "train.eval_every=0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "recipe.early_stop_patience needs train.eval_every > 0" in err and "\n" not in err
    code = train_main(["configs/multilabel/coco_r50_pooled_bce.yaml", *base, "train.eval_every=2",
                       "data.val_path=null"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "recipe.early_stop_patience needs data.val_path" in err
