"""Training-health warnings (engine/health.py): each named on a run made to fail, printed once, and silent on a
healthy run. Unit checks against hand-made loss curves and embeddings; end-to-end fit runs on tiny MLPs."""

import math

import pytest
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from mhe_scale.config import OptimConfig, TrainConfig
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import Classifier, build_optimizer, fit
from mhe_scale.engine.health import (CHANCE_WINDOW, EARLY_STEPS, STUCK_MIN_STEPS, EmbeddingCheck, TrainingHealth,
                                     embedding_problem, warmup_warning)
from mhe_scale.heads import create_head
from mhe_scale.labels.codec import LabelCodec

C, DIM = 10, 8


def watch(losses: list[float], chance: dict[str, float] | None = None, total: int = 1000, metric: str = "loss",
          start: int = 0) -> list[str]:
    said: list[str] = []
    health = TrainingHealth("train", chance or {}, total, said.append)
    rows = [{"step": start + i + 1, "lr": 0.1, "loss": v} | ({metric: v} if metric != "loss" else {})
            for i, v in enumerate(losses)]
    for i in range(0, len(rows), 7):  # several flushes of 7 steps
        health.observe(rows[i:i + 7])
    return said


# ---------------------------------------------------------------- unit: loss curves
def test_a_healthy_curve_says_nothing():
    ln = math.log(C)
    assert watch([ln * (0.99 ** i) for i in range(300)], {"loss": ln}) == []


def test_early_growth_is_named_once_with_both_losses_and_the_factor():
    said = watch([2.4, 5.0, 20.8, 30.0, 25.0])
    assert said == ["warning: train: the loss grew from 2.4 at step 1 to 20.8 at step 3 (8.7x) within the first "
                    f"{EARLY_STEPS} steps: the updates are too large for this batch (lr 0.1 at that step); try a lower "
                    "optim.lr, a warm-up (train.warmup_steps / warmup_epochs) or train.clip_grad_norm"]
    assert watch([2.4] + [2.0] * EARLY_STEPS + [9.0]) == []  # after the early steps: not this check's business
    assert watch([2.4, 7.1]) == []  # 2.96x: below the factor
    assert watch([2.4, 9.0], start=EARLY_STEPS) == []  # a run resumed past the early steps


def test_a_collapse_back_to_the_chance_level_is_named():
    ln = math.log(C)
    curve = [ln * 0.9 ** i for i in range(20)] + [ln * 0.99] * (CHANCE_WINDOW - 1)
    assert watch(curve, {"loss": ln}) == []  # one older, lower step still in the window: its mean is not at chance
    said = watch(curve + [ln * 0.99], {"loss": ln})
    assert len(said) == 1 and said[0].startswith(f"warning: train: the loss went back up to {ln * 0.99:.4g} over the "
                                                 f"{CHANCE_WINDOW} steps to step {len(curve) + 1}, the chance level "
                                                 f"{ln:.4g} of this task")
    assert "after reaching" in said[0] and "collapsed" in said[0]
    # the chance level of a logged metric (MultiGrain's "ce"), printed once however long it stays there
    said = watch(curve + [ln] * 50, {"ce": ln}, metric="ce")
    assert len(said) == 1 and said[0].startswith("warning: train: the logged 'ce' went back up to")


def test_a_run_that_never_leaves_the_chance_level_is_named_after_a_tenth_of_it():
    ln = math.log(C)
    flat = [ln * 1.01] * 400
    said = watch(flat, {"loss": ln}, total=3000)
    assert len(said) == 1 and said[0].startswith(f"warning: train: the loss is {ln * 1.01:.4g} over the "
                                                 f"{CHANCE_WINDOW} steps to step 300, still at the chance level")
    assert watch(flat[:299], {"loss": ln}, total=3000) == []
    assert len(watch(flat[:STUCK_MIN_STEPS], {"loss": ln}, total=200)) == 1
    said = watch([ln * 0.5] * CHANCE_WINDOW + flat, {"loss": ln}, total=200)  # it had learned: a collapse instead
    assert len(said) == 1 and "went back up" in said[0]


def test_a_loss_far_above_the_chance_level_is_named():
    ln = math.log(C)
    assert watch([ln * 2.1] * (CHANCE_WINDOW - 1), {"loss": ln}, total=10 ** 6) == []
    said = watch([ln * 2.1] * CHANCE_WINDOW, {"loss": ln}, total=10 ** 6)
    assert said == [f"warning: train: the loss is {ln * 2.1:.4g} over the {CHANCE_WINDOW} steps to step "
                    f"{CHANCE_WINDOW}, above 2x the chance level {ln:.4g} of this task (what predicting uniformly "
                    "scores): worse than guessing, the training diverged; try a lower optim.lr, a longer warm-up or "
                    "train.clip_grad_norm, and check that the labels match the inputs"]


def test_warmup_longer_than_the_run():
    text = warmup_warning(400, "train.warmup_epochs=8", 100, 50)
    assert text == ("the warm-up (train.warmup_epochs=8: 400 optimizer steps) is not shorter than the run (100 steps, "
                    "2 epochs): the lr rises until the last step and never reaches its peak or decay; shorten it "
                    "(e.g. train.warmup_steps=10, a tenth of the run) or train longer")
    assert warmup_warning(100, "train.warmup_steps=100", 100, 50) is not None
    assert warmup_warning(99, "train.warmup_steps=99", 100, 50) is None
    assert warmup_warning(0, "train.warmup_steps=0", 1, 1) is None


# ---------------------------------------------------------------- unit: embeddings, chance levels
def test_dead_and_constant_embedding_dimensions():
    gen = torch.Generator().manual_seed(0)
    healthy = torch.randn(64, 128, generator=gen).relu()
    assert embedding_problem(healthy) is None
    dead = healthy.clone()
    dead[:, 1:] = 0.0  # the MultiGrain run: 127 of 128 exactly zero
    assert embedding_problem(dead) == "127 of 128 dimensions are exactly 0 over 64 inputs"
    same = healthy.clone()
    same[:, :120] = healthy[0, :120]  # 120 dims identical for every input
    assert embedding_problem(same).startswith("120 of 128 dimensions are the same for all 64 inputs")
    many = healthy.clone()
    many[:, :100] = 0.0
    assert embedding_problem(many) is None  # below 90%: narrow ReLU nets keep many dead units
    said: list[str] = []
    check = EmbeddingCheck("multigrain embeddings at evaluation", said.append)
    assert check(dead, step=40) is not None and check(dead, step=80) is not None
    assert len(said) == 1 and said[0].startswith("warning: multigrain embeddings at evaluation at step 40: 127 of 128")


def test_chance_levels_of_the_softmax_heads_against_brute_force():
    fc = create_head("fc", in_features=4, num_classes=37)
    assert fc.chance_loss() == pytest.approx(math.log(37))
    assert create_head("fc", in_features=4, num_classes=37, cosine=True).chance_loss() is None
    assert create_head("fc", in_features=4, num_classes=37, multilabel=True).chance_loss() is None
    for c, sizes in ((97, [7, 5, 3]), (100, [10, 10]), (99, [10, 10]), (1000, [40, 25])):
        head = create_head("mhp", in_features=4, num_classes=c, sizes=sizes)
        digits = LabelCodec(sizes, c).encode(torch.arange(c))
        brute = 0.0
        for h in range(len(sizes)):
            p = torch.bincount(digits[:, h]).double() / c
            brute -= float((p[p > 0] * p[p > 0].log()).sum())
        assert head.chance_loss() == pytest.approx(brute, abs=1e-12)
        # and it is the loss of the best constant prediction: each head's log digit frequencies
        logits = torch.cat([torch.log(torch.bincount(digits[:, h], minlength=s).double().clamp(min=1e-300) / c)
                            for h, s in enumerate(sizes)])
        with torch.no_grad():
            head.linear.weight.zero_()
            head.linear.bias.copy_(logits.float())
            assert float(head(torch.zeros(c, 4), torch.arange(c)).loss) == pytest.approx(brute, rel=1e-5)
    assert create_head("mhp", in_features=4, num_classes=100, sizes=[10, 10], loss="bce").chance_loss() is None
    model = Classifier(nn.Linear(3, 4), fc)
    assert model.chance_losses() == {"loss": pytest.approx(math.log(37))}


def test_multigrain_reports_the_chance_level_of_its_ce():
    from mhe_scale.tasks.multigrain import MultiGrainModel

    class Backbone(nn.Module):
        num_features = 6

        def forward_features(self, x: Tensor) -> Tensor:
            return x

    assert MultiGrainModel(Backbone(), 10, lam=1.0).chance_losses() == {"ce": pytest.approx(math.log(10))}


# ---------------------------------------------------------------- end to end: fit on runs made to fail
class ReluEncoder(nn.Module):
    """x -> relu(W x + b) [B, 16]: a bias pushed far below zero kills every unit for good (no gradient)."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(DIM, 16)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.linear(x).relu()


def planted(n: int, seed: int = 0) -> SyntheticSplit:
    """Labels readable from the inputs (one prototype per class + noise)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    protos = torch.randn(C, DIM, generator=gen) * 3
    return SyntheticSplit(protos[labels] + 0.3 * torch.randn(n, DIM, generator=gen), labels)


def relu_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(ReluEncoder(), create_head("fc", in_features=16, num_classes=C))


def run(capsys, out, data, train: dict, lr: float = 1e-2, callback=None, eval_fn=None,
        model: Classifier | None = None) -> list[str]:
    """fit a ReLU classifier (out: its run folder) -> the warning lines it printed."""
    model = model or relu_classifier()
    cfg = TrainConfig(**(dict(epochs=1.0, batch_size=16, log_every=5, seed=0, output_dir=str(out), resume=False,
                              loss_log=False) | train))
    fit(model, build_optimizer(OptimConfig(lr=lr), model), data, cfg, Accelerator(cpu=True), out_dir=out,
        step_callback=None if callback is None else (lambda step: callback(model, step)), eval_fn=eval_fn)
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]


def test_fit_names_a_collapse_to_chance_and_the_dead_embeddings(capsys, tmp_path):
    """The issue's MultiGrain failure in small: the net learns, then every ReLU dies (step 30), the loss goes
    back to ln C and the embeddings at evaluation are all zero; fit warns once about each."""
    data, test = planted(1600), planted(64, seed=1)

    def kill(model, step: int) -> None:
        if step == 30:
            with torch.no_grad():
                model.encoder.linear.bias.fill_(-1e4)

    model = relu_classifier()
    check = EmbeddingCheck("embeddings at evaluation", print)

    def evaluate(ema) -> dict[str, float]:
        with torch.no_grad():
            check(model.encoder.forward_features(test.inputs))
        return {}

    said = run(capsys, tmp_path / "killed", data, {"eval_every": 50}, lr=3e-2, callback=kill, eval_fn=evaluate,
               model=model)
    assert len(said) == 2, said
    assert said[0].startswith("warning: train: the loss went back up to") and "after reaching" in said[0]
    assert said[1].startswith("warning: embeddings at evaluation: 16 of 16 dimensions are exactly 0 over 64 inputs")
    assert run(capsys, tmp_path / "healthy", data, {"eval_every": 50}, lr=3e-2) == []  # the same run, not killed


def test_fit_names_early_growth_a_stuck_run_and_a_long_warmup(capsys, tmp_path):
    data = planted(1600)
    grown = run(capsys, tmp_path, data, {}, lr=30.0)  # diverges at once (the chance-level checks may add their lines)
    assert grown[0].startswith("warning: train: the loss grew from") and len(grown) == len(set(grown))
    noise = SyntheticSplit(torch.zeros(1600, DIM), torch.arange(1600) % C)  # inputs carry no label information
    stuck = run(capsys, tmp_path, noise, {"max_steps": STUCK_MIN_STEPS})
    assert len(stuck) == 1 and stuck[0].startswith("warning: train: the loss is ") and "still at the chance" in stuck[0]
    warm = run(capsys, tmp_path, data, {"warmup_epochs": 4.0, "epochs": 2.0})
    assert warm == ["warning: train: the warm-up (train.warmup_epochs=4: 400 optimizer steps) is not shorter than the "
                    "run (200 steps, 2 epochs): the lr rises until the last step and never reaches its peak or decay; "
                    "shorten it (e.g. train.warmup_steps=20, a tenth of the run) or train longer"]


def test_multigrain_lambda_one_at_a_diverging_lr_warns_about_its_loss_and_its_embeddings(tmp_path, capsys):
    """The issue's run in small (model.lam=1 model.num_repeats=1, CE only): at lr 3 the width-4 net diverges at
    once and its GeM embeddings end constant; both are named (the CE is the module's chance-level metric)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_task_classify import write_archive

    from mhe_scale.train import main

    archive = write_archive(tmp_path / "images.tar.gz", per_class=6)
    code = main(["configs/multigrain/cifar10_r18_joint_p3.yaml", f"data.path={archive}",
                 f"data.cache_dir={tmp_path / 'cache'}", "data.num_classes=6", "model.width=4", "model.lam=1.0",
                 "model.num_repeats=1", "train.batch_size=6", "train.epochs=4", "train.eval_batch_size=16",
                 "train.log_every=6", "train.save_every=0", "optim.lr=3.0", "train.seed=3", "train.threads=1",
                 f"train.output_dir={tmp_path / 'run'}"])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert code == 0
    assert any(line.startswith("warning: train multigrain: the loss grew from") for line in said), said
    assert any(line.startswith("warning: multigrain embeddings at evaluation: ") for line in said), said


def test_face_verification_names_embeddings_that_collapsed(tmp_path):
    """tasks/face.verify hands each .bin file's embeddings to the check: 15 of 16 output dims dead are named."""
    import torch.nn.functional as F

    from mhe_scale.data.face_bin import write_face_bin
    from mhe_scale.tasks.face import verify

    gen = torch.Generator().manual_seed(0)
    small = torch.rand(40, 3, 4, 4, generator=gen)
    images = (F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False) * 255).to(torch.uint8)
    write_face_bin(tmp_path / "pairs.bin", images, torch.arange(20) % 2 == 0)

    class Net(nn.Module):
        def __init__(self, dead: int) -> None:
            super().__init__()
            self.linear, self.dead = nn.Linear(3 * 16 * 16, 16), dead

        def forward(self, x: Tensor) -> Tensor:
            out = self.linear(x.flatten(1))
            return torch.cat([out[:, self.dead:], torch.zeros(len(x), self.dead)], dim=1)

    for dead, warned in ((15, True), (8, False)):
        said: list[str] = []
        torch.manual_seed(0)
        metrics = verify(Net(dead), [str(tmp_path / "pairs.bin")], 8, 16, check=EmbeddingCheck("face", said.append))
        assert "pairs acc" in metrics
        assert bool(said) == warned and (not said or said[0].startswith("warning: face: 15 of 16 dimensions are "
                                                                         "exactly 0 over 40 inputs"))
