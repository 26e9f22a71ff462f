"""Classifier stage: shot-group accuracy and tau-normalisation against naive loops / known answers,
weighted kNN on a known case, the linear probe and cRT on a pre-training checkpoint (the backbone,
BN statistics included, does not move), and a clear error for a checkpoint path without weights."""

import json

import numpy as np
import pytest
import torch

from mhe_scale.eval.longtail import knn_predict, shot_accuracy, shot_counts, tau_predictions
from mhe_scale.models.image import build_image_backbone
from mhe_scale.tasks.probe import LinearProbe, resolve_checkpoint
from tests.test_longtail_moco import lists, overrides  # noqa: F401  (fixture)


def test_shot_accuracy_known_answer():
    groups = torch.tensor([0, 0, 1, 2])  # classes 0, 1 many; 2 medium; 3 few
    targets = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3])
    preds = torch.tensor([0, 0, 1, 2, 0, 3, 0, 0])
    acc = shot_accuracy(shot_counts(preds, targets, groups))
    assert acc == pytest.approx({"overall": 4 / 8, "many": 2 / 3, "medium": 1 / 2, "few": 1 / 3})


def test_tau_predictions_equal_a_loop_over_taus():
    g = torch.Generator().manual_seed(0)
    f, w = torch.randn(7, 5, generator=g), torch.randn(4, 5, generator=g) * torch.tensor([[5.0], [1], [0.2], [2]])
    taus = [0.0, 0.3, 1.0]
    got = tau_predictions(f, w, taus)
    for t, tau in enumerate(taus):
        normed = w / w.norm(dim=1, keepdim=True) ** tau
        assert torch.equal(got[t], (f @ normed.t()).argmax(1))
    # known answer: a head class with a 10x weight norm wins at tau 0, loses at tau 1 (cosine classifier)
    assert tau_predictions(torch.tensor([[0.5, 1.0]]), torch.tensor([[10.0, 0], [0, 1]]), [0.0, 1.0]).tolist() == [[0], [1]]


def test_knn_votes_by_similarity():
    bank = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    pred = knn_predict(bank, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), 2, k=3, temperature=0.05)
    assert pred.tolist() == [0, 1]  # 2 close votes beat 1 far one


def test_probe_keeps_bn_statistics_frozen():
    torch.manual_seed(0)
    probe = LinearProbe(build_image_backbone("resnet18", stem="cifar", width=4), 3)
    before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    probe.train()
    loss, _ = probe(torch.randn(4, 3, 8, 8) * 3, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert all(torch.equal(v, before[k]) for k, v in probe.encoder.state_dict().items())
    assert all(p.grad is None for p in probe.encoder.parameters()) and probe.fc.weight.grad is not None


@pytest.mark.parametrize("sampler", ["epoch", "class_balanced"])
def test_probe_and_crt_on_a_pretraining_checkpoint(lists, tmp_path, sampler):  # noqa: F811
    from mhe_scale.train import main as train_main

    pre = tmp_path / "pre"
    assert train_main(["configs/longtail/cifar10_lt100_kcl.yaml", *overrides(lists, pre)]) == 0
    out = tmp_path / "probe"
    args = [a for a in overrides(lists, out) if not a.startswith(("task=", "contrastive."))]
    assert train_main(["configs/longtail/cifar10_lt100_probe.yaml", *args, f"probe.checkpoint={pre / 'kcl'}",
                       f"data.sampler={sampler}", "optim.lr=0.5"]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert {f"tau{t:g}_overall" for t in np.round(np.arange(11) * 0.1, 1)} <= set(metrics)
    assert 0 <= metrics["overall"] <= 1 and "few" in metrics
    folder = "crt" if sampler == "class_balanced" else "probe-epoch"
    assert (out / folder / "loss_log.jsonl").is_file()


def test_probe_groups_by_another_lists_counts(lists, tmp_path):  # noqa: F811
    """The balancedness report: train the probe on one list, group classes by another list's counts."""
    import math

    from mhe_scale.train import main as train_main

    pre = tmp_path / "pre"
    assert train_main(["configs/longtail/cifar10_lt100_kcl.yaml", *overrides(lists, pre)]) == 0
    counts = tmp_path / "counts.txt"  # class 0: 101 images (many), classes 1..9: 30 (medium), none few
    counts.write_text("".join(f"x/{c}_{i}.jpg {c}\n" for c in range(10) for i in range(101 if c == 0 else 30)))
    out = tmp_path / "probe"
    args = [a for a in overrides(lists, out) if not a.startswith(("task=", "contrastive."))]
    assert train_main(["configs/longtail/cifar10_lt100_probe.yaml", *args, f"probe.checkpoint={pre / 'kcl'}",
                       f"probe.shot_counts_from={counts}"]) == 0
    (metrics,) = [r["metrics"] for r in json.loads((out / "results.json").read_text()).values()]
    assert not math.isnan(metrics["many"]) and not math.isnan(metrics["medium"]) and math.isnan(metrics["few"])


def test_checkpoint_path_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="probe.checkpoint=.*no model.safetensors"):
        resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["cifar10_lt100_kcl", "cifar10_lt100_probe", "imagenet_lt_r50_kcl",
                                  "imagenet_lt_r50_ce", "imagenet_lt_r50_probe", "imagenet_lt_r50_crt"])
def test_shipped_longtail_configs_load(name):
    from mhe_scale.config import load_config

    cfg = load_config(f"configs/longtail/{name}.yaml")
    assert cfg.task in ("contrastive", "probe")
    if cfg.task == "contrastive" and cfg.contrastive.method != "ce":
        assert cfg.contrastive.queue_size % cfg.train.batch_size == 0
