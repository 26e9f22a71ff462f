"""Results users can trust on resume: a checkpoint of another config is refused (naming each key and
the ways out) unless train.resume_changed=true, which then really uses the new values; changed data
is refused; epochs may grow under a constant schedule only; config.yaml never claims values a run
did not use; a torn last line of a step log is dropped with a warning; warmup given in epochs.
Tiny CPU models, one process (2-process cases: test_engine_checkpoint.py)."""

import json
import logging

import pytest
import torch
from accelerate import Accelerator

from mhe_scale.config import ConfigError, OptimConfig, TrainConfig, load_config
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import Classifier, TrainPlan, build_optimizer, fit
from mhe_scale.engine.step_log import trim_jsonl
from mhe_scale.engine.run_identity import run_config
from mhe_scale.heads import create_head
from mhe_scale.models import MLPEncoder

C, DIM = 30, 12
RUN = {"optim": {"lr": 2e-3}, "model": {"hidden": 24}}


class Crash(Exception):
    pass


def tiny_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(MLPEncoder(DIM, hidden=24, num_features=16, depth=1),
                      create_head("mhp", in_features=16, num_classes=C, num_heads=2))


def tiny_data(n: int = 160) -> SyntheticSplit:
    gen = torch.Generator().manual_seed(0)
    return SyntheticSplit(torch.randn(n, DIM, generator=gen), torch.randint(0, C, (n,), generator=gen))


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**(dict(epochs=1.0, batch_size=16, log_every=1, save_every=4, keep_last=0, seed=0,
                               output_dir="unused") | kw))


def train(out, train_cfg: TrainConfig, lr: float = 2e-3, run: dict | None = RUN, data=None, crash_at: int = 0):
    model = tiny_model()

    def stop(step: int) -> None:
        if step == crash_at:
            raise Crash

    return fit(model, build_optimizer(OptimConfig(lr=lr), model), data or tiny_data(), train_cfg,
               Accelerator(cpu=True), out_dir=out, run_config=run, step_callback=stop)


def crashed_run(out) -> None:
    """10 steps planned (160 points, batch 16), checkpoint at step 4, killed after step 5."""
    with pytest.raises(Crash):
        train(out, cfg(), crash_at=5)


def lrs(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines())}


def test_changed_config_is_refused_naming_each_key_and_the_ways_out(tmp_path):
    crashed_run(tmp_path)
    changed = {"optim": {"lr": 1e-2}, "model": {"hidden": 24}}
    with pytest.raises(ValueError) as err:
        train(tmp_path, cfg(seed=7), lr=1e-2, run=changed)
    msg = str(err.value)
    assert "optim.lr: 0.002 -> 0.01" in msg and "train.seed: 0 -> 7" in msg
    assert "train.output_dir" in msg and "train.resume_changed=true" in msg and "step-00000004" in msg
    # keys that do not change training (logging, saving, output folder) resume as before
    again = train(tmp_path, cfg(log_every=3, save_every=2, output_dir="elsewhere"))
    assert again.resumed_from == 4 and again.steps == 6 and again.config_changes == ()


def test_resume_changed_uses_the_new_values_and_says_so(tmp_path):
    crashed_run(tmp_path)
    result = train(tmp_path, cfg(resume_changed=True), lr=1e-2, run={"optim": {"lr": 1e-2}, "model": {"hidden": 24}})
    assert result.resumed_from == 4 and result.config_changes == ("optim.lr: 0.002 -> 0.01",)
    logged = lrs(tmp_path)
    assert [logged[s] for s in (1, 4)] == [2e-3, 2e-3] and [logged[s] for s in range(5, 11)] == [1e-2] * 6
    state = json.loads((tmp_path / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())["info"]
    assert state["run_config"]["optim"]["lr"] == 1e-2  # the next resume compares with the new values
    assert state["config_history"] == [{"step": 4, "changes": ["optim.lr: 0.002 -> 0.01"]}]


def test_changed_training_data_is_refused(tmp_path):
    train(tmp_path, cfg(epochs=0.5))  # a finished run: resuming it would train 0 steps
    with pytest.raises(ValueError, match="training points: 160 -> 128"):
        train(tmp_path, cfg(epochs=0.5), data=tiny_data(128))


def test_fit_without_run_config_still_compares_its_train_config(tmp_path):
    crashed_run(tmp_path)
    with pytest.raises(ValueError, match=r"train.clip_grad_norm: null -> 1.0"):
        train(tmp_path, cfg(clip_grad_norm=1.0), run=None)


def test_more_epochs_extend_a_constant_schedule_but_not_a_cosine_one(tmp_path):
    train(tmp_path / "const", cfg())
    longer = train(tmp_path / "const", cfg(epochs=2.0))
    assert longer.resumed_from == 10 and longer.steps == 10 and longer.config_changes == ("train.epochs: 1.0 -> 2.0",)
    train(tmp_path / "cos", cfg(schedule="cosine"))
    with pytest.raises(ValueError, match=r"train.epochs: 1.0 -> 2.0 \(the lr schedule spans train.epochs"):
        train(tmp_path / "cos", cfg(schedule="cosine", epochs=2.0))


def test_a_torn_last_log_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    log = tmp_path / "loss_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        trim_jsonl(log, 5)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
    assert str(log) in caplog.text and "line 3" in caplog.text
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"loss_log.jsonl line 2: not a step record"):
        trim_jsonl(log, 5)


def test_a_resume_after_a_torn_loss_log_line_continues(tmp_path):
    crashed_run(tmp_path)
    with open(tmp_path / "loss_log.jsonl", "a") as f:
        f.write('{"step": 6, "epo')  # killed while appending
    result = train(tmp_path, cfg())
    assert result.resumed_from == 4 and sorted(lrs(tmp_path)) == list(range(1, 11))


def test_warmup_epochs_are_resolved_for_any_number_of_processes():
    n = 1000
    for procs in (1, 2, 8):
        plan = TrainPlan.build(cfg(epochs=10, batch_size=8, warmup_epochs=2), n, procs)
        assert plan.warmup_steps == 2 * (n // (8 * procs))
    assert TrainPlan.build(cfg(epochs=10, batch_size=8, warmup_epochs=0.5), n, 1).warmup_steps == 62  # round(62.5)
    with pytest.raises(ValueError, match="train.warmup_epochs=2.*train.warmup_steps=5"):
        TrainPlan.build(cfg(warmup_epochs=2, warmup_steps=5), n, 1)


@pytest.mark.parametrize("name", ["casia_r18_mhs", "webface42m_r50_mhs", "webface42m_r50_pfc02"])
def test_face_configs_give_their_warmup_in_epochs(name):
    from pathlib import Path

    train_cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "face" / f"{name}.yaml").train
    assert train_cfg.warmup_epochs == 2 and train_cfg.warmup_steps == 0  # the recipes state 2 epochs


def test_config_yaml_never_claims_values_the_run_did_not_use(tmp_path):
    from mhe_scale.tasks.synthetic import run_synthetic

    base = ["data.num_classes=40", "data.num_train=256", "data.num_test=32", "data.input_dim=8", "model.hidden=16",
            "model.num_features=8", "model.depth=1", "head.num_heads=2", "eval.baseline=null", "train.epochs=1",
            "train.batch_size=64", "train.save_every=2", f"train.output_dir={tmp_path}"]
    load = lambda *extra: load_config(None, base + list(extra))  # noqa: E731
    acc = Accelerator(cpu=True)
    run_synthetic(load("optim.lr=0.002"), acc)
    written = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match="optim.lr: 0.002 -> 0.01"):
        run_synthetic(load("optim.lr=0.01"), acc)
    assert (tmp_path / "config.yaml").read_text() == written  # not rewritten to claim lr 0.01
    results = run_synthetic(load("optim.lr=0.01", "train.epochs=1", "train.resume_changed=true"), acc)
    assert results["mhp"]["config_changes"] == ["optim.lr: 0.002 -> 0.01"]
    note = (tmp_path / "config.yaml").read_text()
    assert note.startswith("# Resumed with train.resume_changed=true") and "optim.lr: 0.002 -> 0.01" in note


def test_run_config_leaves_out_what_does_not_change_training():
    exp = load_config(None, ["train.output_dir=/x", "train.log_every=7", "eval.ks=[1]", "optim.lr=0.5"])
    rc = run_config(exp)
    assert rc["optim"]["lr"] == 0.5 and "output_dir" not in rc["train"] and "log_every" not in rc["train"]
    assert "eval" not in rc and "name" not in rc
    assert run_config(exp, head={"name": "fc"})["head"] == {"name": "fc"}


def test_a_checkpoint_from_before_an_added_key_resumes_at_its_as_before_value():
    """optim.head_momentum / optim.head_update did not exist when older runs were saved: their absence equals
    the value that trains as before (None / dense); any other value is still a difference."""
    from mhe_scale.engine.run_identity import differences

    old = {"optim": {"lr": 0.1, "momentum": 0.9}}
    same = {"optim": {"lr": 0.1, "momentum": 0.9, "head_momentum": None, "head_update": "dense"}}
    assert differences(old, same) == [] and differences(same, old) == []
    changed = differences(old, {"optim": {"lr": 0.1, "momentum": 0.9, "head_momentum": 0.0, "head_update": "auto"}})
    assert [(k, new) for k, _, new in changed] == [("optim.head_momentum", 0.0), ("optim.head_update", "auto")]
    assert differences(old, {"optim": {"lr": 0.1, "momentum": 0.9, "nesterov": False}})[0][0] == "optim.nesterov"


# ---------------------------------------------------------------- train.max_steps
def test_max_steps_sets_the_run_length_and_the_schedule_spans_it(tmp_path):
    """160 points / batch 16 = 10 steps per epoch; max_steps=13 trains 13 (into the second epoch) whatever
    train.epochs says, and the cosine lr of step s is lr * lr_factor(s, 13, warmup 3)."""
    from mhe_scale.engine import lr_factor

    plan = TrainPlan.build(cfg(max_steps=13, warmup_steps=20), 160, 1)
    assert (plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (10, 13, 13)
    assert TrainPlan.build(cfg(epochs=5.0, max_steps=3), 160, 1).total_steps == 3
    result = train(tmp_path, cfg(max_steps=13, schedule="cosine", warmup_steps=3, save_every=0))
    assert result.steps == 13
    logged = lrs(tmp_path)
    assert sorted(logged) == list(range(1, 14))
    assert [logged[s + 1] for s in range(13)] == pytest.approx([2e-3 * lr_factor(s, 13, 3, "cosine") for s in range(13)])
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert epochs == [0] * 10 + [1] * 3


def test_max_steps_resumes_to_the_same_curve_and_a_changed_length_follows_the_epochs_rule(tmp_path):
    whole = tmp_path / "whole"
    train(whole, cfg(max_steps=13, schedule="cosine"))
    with pytest.raises(Crash):
        train(tmp_path / "cut", cfg(max_steps=13, schedule="cosine"), crash_at=6)
    again = train(tmp_path / "cut", cfg(max_steps=13, schedule="cosine"))
    assert again.resumed_from == 4 and again.steps == 9
    read = lambda out: [(r["step"], r["loss"]) for r in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines())]
    assert read(tmp_path / "cut") == read(whole)
    with pytest.raises(ValueError, match=r"train.max_steps: 13 -> 20 \(the lr schedule spans train.max_steps"):
        train(whole, cfg(max_steps=20, schedule="cosine"))
    assert train(whole, cfg(max_steps=13, schedule="cosine", epochs=7.0)).resumed_from == 13  # epochs: unused
    train(tmp_path / "const", cfg(max_steps=5))
    longer = train(tmp_path / "const", cfg(max_steps=8))
    assert longer.resumed_from == 5 and longer.steps == 3 and longer.config_changes == ("train.max_steps: 5 -> 8",)


def test_max_steps_below_one_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps=0 must be >= 1"):
        load_config(None, ["train.max_steps=0"])
    with pytest.raises(ValueError, match=r"train\.max_steps=-2 must be >= 1"):
        fit(tiny_model(), build_optimizer(OptimConfig(), tiny_model()), tiny_data(), cfg(max_steps=-2),
            Accelerator(cpu=True), out_dir="unused")
