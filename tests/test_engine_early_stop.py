"""fit's stop_fn hook: training ends after the evaluation that asks for it, the checkpoint at that step
carries the stop, and a resume from it trains no further."""

import json

import torch
from accelerate import Accelerator

from mhe_scale.config import OptimConfig
from mhe_scale.engine import build_optimizer, fit
from test_engine_loop import flat_params, read_log, tiny_data, tiny_model, train_cfg


def _run(out, calls: list, stop_at: int, **kw):
    torch.manual_seed(0)
    model = tiny_model()
    optimizer = build_optimizer(OptimConfig(lr=5e-3), model)

    def stop(step: int, metrics: dict[str, float]) -> bool:
        calls.append((step, metrics["n"]))
        return len(calls) == stop_at

    result = fit(model, optimizer, tiny_data(256), train_cfg(eval_every=3, output_dir=str(out), **kw),
                 Accelerator(cpu=True), out_dir=out, eval_fn=lambda ema: {"n": 1.0}, stop_fn=stop)
    return model, result


def test_stop_fn_ends_fit_at_the_evaluation_that_returns_true(tmp_path):
    calls: list = []
    _, result = _run(tmp_path, calls, stop_at=2, log_every=4)  # 16 steps planned, evaluations at 3, 6, ...
    assert result.steps == 6 and result.stopped_early
    assert [s for s, _ in calls] == [3, 6] and [s for s, _ in result.evaluations] == [3, 6]
    assert [r["step"] for r in read_log(tmp_path / "loss_log.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_never_stopping_runs_to_the_end(tmp_path):
    _, result = _run(tmp_path, [], stop_at=99)
    assert result.steps == 16 and not result.stopped_early


def test_the_stop_checkpoint_is_saved_and_a_resume_trains_no_further(tmp_path):
    calls: list = []
    model, result = _run(tmp_path, calls, stop_at=3, save_every=4, resume="auto", keep_last=5)  # stop at 9
    assert result.steps == 9 and result.stopped_early
    steps = sorted(int(p.name.split("-")[-1]) for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert steps[-1] == 9 and 8 in steps
    state = json.loads((tmp_path / "checkpoints" / f"step-{9:08d}" / "trainer_state.json").read_text())
    assert state["info"]["stopped_early"] is True
    stopped_weights = flat_params(model)

    again: list = []
    resumed_model, resumed = _run(tmp_path, again, stop_at=99, save_every=4, resume="auto", keep_last=5)
    assert resumed.resumed_from == 9 and resumed.steps == 0 and resumed.stopped_early and again == []
    torch.testing.assert_close(flat_params(resumed_model), stopped_weights, rtol=0, atol=0)
    assert [r["step"] for r in read_log(tmp_path / "loss_log.jsonl")][-1] == 9


def test_a_stop_at_a_save_step_rewrites_that_checkpoint_with_the_mark(tmp_path):
    _, result = _run(tmp_path, [], stop_at=4, save_every=4, resume="auto")  # evaluations 3, 6, 9, 12: stop at 12
    assert result.steps == 12 and result.stopped_early
    state = json.loads((tmp_path / "checkpoints" / f"step-{12:08d}" / "trainer_state.json").read_text())
    assert state["info"]["stopped_early"] is True
    again: list = []
    _, resumed = _run(tmp_path, again, stop_at=99, save_every=4, resume="auto")
    assert resumed.resumed_from == 12 and resumed.steps == 0 and again == []
