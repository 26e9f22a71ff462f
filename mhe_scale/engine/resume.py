"""Whether a checkpoint may be resumed by this run, and what the resume keeps from the new config.

`fit` records the run-defining config (run_identity.py) and the TrainPlan in every checkpoint.
On resume `check_resume` refuses, before anything is loaded:
  * another global batch (batch_size x processes x grad_accum_steps): steps, the lr schedule and
    the data position are counted in global batches, so they would silently change (a 2 -> 1
    process resume trained 6.9 epochs instead of 6 and the cosine lr jumped back up). Another
    number of processes with the same global batch is fine (the model, optimizer, schedule and
    EMA are replicated; class-sharded heads reshard; per-rank RNG files do not, with a warning).
    DeepSpeed ZeRO partitions need the same number of processes.
  * a changed training key or number of training points, unless train.resume_changed=true; then
    the new optimizer hyperparameters are applied after loading (reapply_hyperparameters), so
    the new values really are used from the resumed step on.
`train.epochs` and `train.max_steps` (the run's length) may change with the constant schedule (a
run is extended or shortened, the lr curve does not move); with any other schedule they reshape the
rest of the curve and are a difference.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mhe_scale.engine.run_identity import describe, differences, plain, run_config as _strip

EPOCHS = "train.epochs"
LENGTH_KEYS = (EPOCHS, "train.max_steps")
"""Keys that only set how many steps a run takes: free to change under the constant schedule."""


def run_identity(run_config: Mapping[str, Any] | None, cfg: Any) -> dict[str, Any]:
    """What fit records: the given run config with its train section replaced by the TrainConfig
    fit really uses (plain nested dicts, NOT_TRAINING keys removed; train.epochs left out when
    train.max_steps sets the run's length)."""
    tree = plain(dict(run_config or {}))
    tree["train"] = plain(cfg)
    if tree["train"].get("max_steps") is not None:  # train.max_steps sets the length: epochs change nothing
        tree["train"].pop("epochs", None)
    return _strip(tree)


def _batch_fix(old: int, micro: int, procs: int, accum: int) -> str:
    options = []
    if old % (procs * accum) == 0:
        options.append(f"train.batch_size={old // (procs * accum)}")
    if old % (micro * procs) == 0:
        options.append(f"train.grad_accum_steps={old // (micro * procs)}")
    if old % (micro * accum) == 0:
        options.append(f"{old // (micro * accum)} processes")
    return " or ".join(options) if options else "a batch size and accumulation whose product with the processes is it"


def check_global_batch(found: Path, info: Mapping[str, Any], plan: Any) -> None:
    """Raise ValueError if the checkpoint's global batch (or, under DeepSpeed, process count) differs."""
    old = info.get("plan", {})
    g = old.get("global_batch")
    if g is not None and g != plan.global_batch:
        raise ValueError(
            f"{found} was trained with a global batch of {g} ({old.get('micro_batch')} x {old.get('num_processes')} "
            f"processes x {old.get('grad_accum_steps')} accumulation), this run has {plan.global_batch} "
            f"({plan.micro_batch} x {plan.num_processes} x {plan.grad_accum_steps}): steps, the lr schedule and the "
            f"data position are counted in global batches and would change; keep batch_size x processes x "
            f"grad_accum_steps = {g} (here: {_batch_fix(g, plan.micro_batch, plan.num_processes, plan.grad_accum_steps)}),"
            " or choose another train.output_dir (train.resume_changed does not cover this)")
    procs = old.get("num_processes")
    if info.get("engine") == "deepspeed" and procs is not None and procs != plan.num_processes:
        raise ValueError(f"{found} holds DeepSpeed ZeRO partitions of {procs} processes and this run has "
                         f"{plan.num_processes}: resume it on {procs} processes, or choose another train.output_dir")


def check_resume(found: Path, info: Mapping[str, Any], identity: Mapping[str, Any], plan: Any,
                 resume_changed: bool, warn: Callable[[str], None]) -> list[str]:
    """Refuse (ValueError naming every differing key, old -> new, and the ways out) a checkpoint of
    another run; return the accepted differences as 'key: old -> new' lines (empty: same run)."""
    check_global_batch(found, info, plan)
    old = info.get("run_config")
    if old is None:
        warn(f"warning: {found} records no config (written by an older mhe_scale); whether it belongs to "
             "this config is not checked")
        return []
    diffs = differences(old, identity)
    old_n = info.get("plan", {}).get("num_train")
    if old_n is not None and old_n != plan.num_train:
        diffs.append(("training points", old_n, plan.num_train))
    constant = all(s == "constant" for s in (old.get("train", {}).get("schedule"), identity["train"].get("schedule")))
    refused = [d for d in diffs if not (d[0] in LENGTH_KEYS and constant)]
    lines = [f"{k}: {describe(a)} -> {describe(b)}" for k, a, b in diffs]
    if refused and not resume_changed:
        listed = "; ".join(f"{k}: {describe(a)} -> {describe(b)}"
                           + (f" (the lr schedule spans {k}: the rest of its curve would change)"
                              if k in LENGTH_KEYS else "") for k, a, b in refused)
        raise ValueError(f"{found} was written by a run with another config ({listed}); resuming would continue "
                         "that run, not this one. Start this run in another train.output_dir, or set "
                         "train.resume_changed=true to resume from this checkpoint anyway with the new values")
    for line in lines:
        warn(f"resuming {found} with a changed config: {line}")
    return lines


def _schedulers(scheduler: Any) -> list[Any]:
    if scheduler is None:
        return []
    if hasattr(scheduler, "encoder") and hasattr(scheduler, "head"):  # prepared.Schedulers
        return [scheduler.encoder, scheduler.head]
    return [scheduler]


def snapshot_hyperparameters(scheduler: Any) -> list[list[dict[str, Any]]]:
    """The freshly built optimizers' param-group settings (lr, initial_lr, weight_decay, ...), per schedule."""
    return [[{k: v for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
            for s in _schedulers(scheduler)]


def reapply_hyperparameters(scheduler: Any, snapshot: list[list[dict[str, Any]]]) -> None:
    """After loading a checkpoint: put the new config's hyperparameters back (the optimizer state and
    the schedule's step stay the checkpoint's) and set each group's lr for the current step."""
    for s, groups in zip(_schedulers(scheduler), snapshot):
        for g, fresh, factor in zip(s.optimizer.param_groups, groups, s.lr_lambdas):
            g.update({k: v for k, v in fresh.items() if k != "lr"})
            g["lr"] = g["initial_lr"] * factor(s.last_epoch)
        s.base_lrs = [g["initial_lr"] for g in s.optimizer.param_groups]
        s._last_lr = [g["lr"] for g in s.optimizer.param_groups]


__all__ = ["run_identity", "check_resume", "check_global_batch", "snapshot_hyperparameters",
           "reapply_hyperparameters"]
