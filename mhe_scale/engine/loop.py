"""The training loop on HF accelerate: one process, DDP, or DeepSpeed ZeRO 1/2/3 (evaluation: evaluate.py).

The loop knows nothing about a head's math: it calls the head for a loss, `accelerator.backward`,
and steps the optimizer(s), the lr schedule(s) and the EMA once per optimizer step (every
`grad_accum_steps` micro-batches, when `accelerator.sync_gradients`). What gets prepared and what
stays outside (a class-sharded head) is in prepared.py; how the Accelerator is built (DeepSpeed,
mixed precision, trackers) in accelerator.py. Derived numbers live in a frozen TrainPlan. Data
order is a pure function of (seed, epoch) (a streamed training set, stream.BatchStream, promises
the same), so a resumed run reads exactly the batches an uninterrupted one would. Host syncs
happen only at log, save and evaluation steps.
See docs/engine.md for checkpoint contents and resume semantics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from mhe_scale.config import TrainConfig
from mhe_scale.engine.accelerator import (NoOptimizerState, NoState, cast_floating, check_deepspeed_agrees,
                                          check_prepared, deepspeed_state_hooks, grad_norm_tensor,
                                          input_dtype, is_deepspeed, mark_zero3_leaf, zero_stage)
from mhe_scale.engine.checkpoint import (ExtraState, Progress, TrainingState, find_resumable_everywhere,
                                         list_checkpoints, load_checkpoint, save_checkpoint)
from mhe_scale.engine.ema import (ExponentialMovingAverage, build_weight_average, refresh_fit_average_bn,
                                  uses_weight_average)
from mhe_scale.engine.health import TrainingHealth, requested_warmup, warmup_warning
from mhe_scale.engine.step_log import NonFiniteLossError, StepLog, trim_jsonl
from mhe_scale.engine.module import TrainingModule
from mhe_scale.engine.prepared import Schedulers, ShardedHeadTraining, check_optimizers
from mhe_scale.engine.resume import check_resume, reapply_hyperparameters, run_identity, snapshot_hyperparameters
from mhe_scale.engine.sam import check_sam, frozen_bn_statistics, perturb, restore
from mhe_scale.engine.schedule import build_scheduler, check_schedule
from mhe_scale.engine.storage import check_shared_folder
from mhe_scale.engine.stream import BatchStream

EvalFn = Callable[[ExponentialMovingAverage | None], dict[str, float]]
"""fit's periodic evaluation: gets the EMA (or None), returns metrics (same on every process)."""
StopFn = Callable[[int, dict[str, float]], bool]
"""stop_fn(step, metrics) after each periodic evaluation: True ends fit early (same answer on every process)."""
SamplerFactory = Callable[["TrainPlan", int, int], Sampler]
"""(plan, rank, seed) -> this process's batch sampler with set_position(epoch, start_step) (data/samplers.py)."""


@dataclass(frozen=True)
class TrainPlan:
    """Quantities derived once from the config and the data; logged, never written back."""

    num_train: int
    num_processes: int
    micro_batch: int
    grad_accum_steps: int
    global_batch: int
    """Samples per optimizer step: micro_batch * num_processes * grad_accum_steps."""
    steps_per_epoch: int
    """Optimizer steps per pass (the last partial global batch of each epoch is dropped)."""
    total_steps: int
    warmup_steps: int

    @staticmethod
    def build(cfg: TrainConfig, num_train: int, num_processes: int) -> "TrainPlan":
        global_batch = cfg.batch_size * num_processes * cfg.grad_accum_steps
        steps_per_epoch = num_train // global_batch
        if steps_per_epoch < 1:
            raise ValueError(f"{num_train} training points cannot fill one optimizer step of {global_batch} "
                             f"(train.batch_size={cfg.batch_size} x {num_processes} processes x "
                             f"train.grad_accum_steps={cfg.grad_accum_steps}); lower them")
        total = max(1, math.ceil(cfg.epochs * steps_per_epoch)) if cfg.max_steps is None else int(cfg.max_steps)
        warmup = cfg.warmup_steps
        if cfg.warmup_epochs is not None:  # an epoch count holds for any number of processes
            if cfg.warmup_steps or cfg.warmup_epochs < 0:
                raise ValueError(f"train.warmup_epochs={cfg.warmup_epochs} with train.warmup_steps={cfg.warmup_steps}: "
                                 "give one of them (warmup_epochs >= 0), set the other to 0 / null")
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        return TrainPlan(num_train, num_processes, cfg.batch_size, cfg.grad_accum_steps, global_batch,
                         steps_per_epoch, total, min(warmup, total))


def named_sampler(name: str, labels: Tensor | None = None, **options) -> SamplerFactory:
    """A SamplerFactory for a sampler of data/samplers.py by name ('epoch', 'class_balanced',
    'repeated_aug', 'm_per_class'); labels [N] for the class-aware ones."""
    from mhe_scale.data.samplers import build_sampler

    def make(plan: TrainPlan, rank: int, seed: int) -> Sampler:
        return build_sampler(name, labels, micro_batch=plan.micro_batch, grad_accum_steps=plan.grad_accum_steps,
                             num_processes=plan.num_processes, rank=rank, seed=seed,
                             steps_per_epoch=plan.steps_per_epoch, num_samples=plan.num_train, **options)

    return make


@dataclass(frozen=True)
class FitResult:
    steps: int
    """Optimizer steps taken in this call (0 when resumed from a finished run)."""
    seconds: float
    samples_per_second: float
    last_loss: float
    resumed_from: int | None
    """Step of the checkpoint training resumed from, if any."""
    ema: ExponentialMovingAverage | None
    """Pass to evaluate(..., ema=...) to evaluate the averaged weights."""
    evaluations: tuple[tuple[int, dict[str, float]], ...] = ()
    """(step, metrics) of the periodic evaluations run in this call (train.eval_every)."""
    config_changes: tuple[str, ...] = ()
    """'key: old -> new' for each config difference accepted on resume (train.resume_changed)."""
    stopped_early: bool = False
    """stop_fn ended training (in this call, or in the run whose final checkpoint this call resumed)."""


def check_train_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the bad train.* key."""
    check_schedule(cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.poly_power)
    for key in ("batch_size", "grad_accum_steps", "log_every"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key}={getattr(cfg, key)} must be >= 1")
    for key in ("save_every", "keep_last", "eval_every", "num_workers"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"train.{key}={getattr(cfg, key)} must be >= 0")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ValueError(f"train.max_steps={cfg.max_steps} must be >= 1 (or null: train.epochs decides)")
    if not (math.isfinite(cfg.epochs) and cfg.epochs > 0):
        raise ValueError(f"train.epochs={cfg.epochs} must be > 0 (fractions such as 0.5 train part of an epoch)")
    if cfg.clip_grad_norm is not None and not cfg.clip_grad_norm > 0:
        raise ValueError(f"train.clip_grad_norm={cfg.clip_grad_norm} must be > 0 (or null to disable)")
    if cfg.resume not in (True, False, "auto"):
        raise ValueError(f"train.resume={cfg.resume!r} must be true, false or auto")


def _start(cfg: TrainConfig, root: Path, state: TrainingState, accelerator, extras: Sequence[ExtraState],
           plan: TrainPlan, engine: str, identity: dict | None = None) -> tuple[Progress, dict | None]:
    """Fresh Progress (info None), or the one of the newest valid checkpoint under root (per cfg.resume);
    a checkpoint of another run (resume.check_resume) is refused. info["config_changes"]: what was accepted."""
    fresh = Progress(0, 0, 0, cfg.seed), None
    if cfg.resume is False:
        if cfg.save_every > 0 and list_checkpoints(root):
            raise FileExistsError(f"{root} already holds checkpoints and train.resume=false; set train.resume=auto "
                                  "to continue that run, or choose another train.output_dir")
        return fresh
    found = find_resumable_everywhere(root, accelerator)
    if found is None:
        if cfg.resume is True:
            raise FileNotFoundError(f"train.resume=true but {root} holds no valid checkpoint")
        return fresh
    info = json.loads((found / "trainer_state.json").read_text()).get("info", {})
    if info.get("engine", "torch") != engine:
        raise ValueError(f"{found} was written by the {info.get('engine', 'torch')} engine and this run uses {engine} "
                         "(DeepSpeed keeps weights and optimizer in its own files): resume it the way it was "
                         "trained, or choose another train.output_dir")
    changes = check_resume(found, info, identity or run_identity(None, cfg), plan,
                           cfg.resume_changed, accelerator.print)
    fresh_hyperparameters = snapshot_hyperparameters(state.scheduler)
    progress = load_checkpoint(found, state, accelerator, extras)
    if changes:  # resume_changed: the new optimizer settings, not the checkpoint's, from here on
        reapply_hyperparameters(state.scheduler, fresh_hyperparameters)
    info = dict(info, config_changes=changes)
    if progress.sampler_seed != cfg.seed:
        accelerator.print(f"warning: {found} was written with train.seed={progress.sampler_seed}, now {cfg.seed}; "
                          "the data order keeps following the checkpoint's seed")
    if progress.batch_in_epoch >= plan.steps_per_epoch:
        progress = Progress(progress.step, progress.epoch + 1, 0, progress.sampler_seed)
    accelerator.print(f"resumed from {found}: step {progress.step}, epoch {progress.epoch}, "
                      f"batch {progress.batch_in_epoch}")
    return progress, info


def start_health(desc: str, chance: dict[str, float], cfg: TrainConfig, plan: TrainPlan,
                 printer: Callable[[str], None]) -> TrainingHealth:
    """The training-health watcher of one fit call (engine/health.py); prints the warm-up warning now."""
    requested, given = requested_warmup(cfg.warmup_steps, cfg.warmup_epochs, plan.steps_per_epoch)
    warning = warmup_warning(requested, given, plan.total_steps, plan.steps_per_epoch)
    if warning is not None:
        printer(f"warning: {desc}: {warning}")
    return TrainingHealth(desc, chance, plan.total_steps, printer)


def _refuse_unsupported(cfg: TrainConfig, accelerator, sharded: bool) -> None:
    stage = zero_stage(accelerator)
    if stage == 3 and uses_weight_average(cfg):
        raise NotImplementedError("train.ema_decay / train.swa_start(_epoch) with ZeRO-3: the weights are "
                                  "partitioned, the average would cover empty shards; use ZeRO-1/2 or no EMA/SWA")
    if sharded and uses_weight_average(cfg):
        raise NotImplementedError("train.ema_decay / train.swa_start(_epoch) with a class-sharded head is not "
                                  "supported (the shadows would need per-rank files); set them to null")
    if sharded and stage is not None and cfg.clip_grad_norm is not None:
        raise NotImplementedError("train.clip_grad_norm with DeepSpeed and a class-sharded head: DeepSpeed clips the "
                                  "encoder alone, so no global norm exists; clip without DeepSpeed or set it to null")
    if sharded and accelerator.mixed_precision == "fp16":
        raise NotImplementedError("fp16 with a class-sharded head: the loss scale would reach the head's gradients "
                                  "unscaled; use bf16")


def train_loader(train_set: Dataset, plan: TrainPlan, cfg: TrainConfig, rank: int, seed: int,
                 sampler_factory: SamplerFactory | None = None) -> tuple[DataLoader, Callable[[int, int], None]]:
    """The DataLoader of this rank's training micro-batches and set_position(epoch, start_step),
    called before each pass: index batches of a map-style dataset, or a BatchStream's own batches."""
    # every loader has its own generator: creating an iterator must not draw from the global RNG
    # (a resumed run would then see other dropout masks)
    generator = torch.Generator().manual_seed(cfg.seed)
    if not isinstance(train_set, BatchStream):
        sampler = (sampler_factory or named_sampler("epoch"))(plan, rank, seed)
        loader = DataLoader(train_set, batch_sampler=sampler, generator=generator, num_workers=cfg.num_workers,
                            persistent_workers=cfg.num_workers > 0)
        return loader, sampler.set_position
    if sampler_factory is not None:
        raise ValueError(f"{type(train_set).__name__} is a stream: it orders its own batches, so it takes no sampler")
    if cfg.num_workers > 1:
        raise ValueError(f"train.num_workers={cfg.num_workers}: every worker would read the whole stream "
                         f"({type(train_set).__name__}), repeating its rows; use 0 or 1 for a streamed training set")
    position = partial(train_set.set_position, micro_per_epoch=plan.steps_per_epoch * plan.grad_accum_steps,
                       grad_accum_steps=plan.grad_accum_steps, rank=rank, world=plan.num_processes,
                       micro_batch=plan.micro_batch, seed=seed)
    return DataLoader(train_set, batch_size=None, num_workers=cfg.num_workers, generator=generator), position


def fit(model: TrainingModule, optimizer: torch.optim.Optimizer, train_set: Dataset, cfg: TrainConfig,
        accelerator, desc: str = "train", out_dir: str | Path | None = None,
        extra_state: Sequence[ExtraState] = (), step_callback: Callable[[int], None] | None = None,
        head_optimizer: torch.optim.Optimizer | None = None, eval_fn: EvalFn | None = None,
        run_name: str = "", sampler: SamplerFactory | None = None, run_config: dict | None = None,
        stop_fn: StopFn | None = None) -> FitResult:
    """Train `model` (a TrainingModule: (inputs, targets) -> (loss, metrics), see engine/module.py) to
    TrainPlan.total_steps optimizer steps, resuming from out_dir/checkpoints per cfg.resume.

    out_dir defaults to cfg.output_dir (checkpoints/, loss_log.jsonl, eval_log.jsonl go there);
    extra_state hooks (and the module's own extra_state()) run on every process at each save / load;
    model.after_optimizer_step(step) and then step_callback(step) run after every optimizer step (after
    that step's checkpoint and evaluation). A class-sharded head (model.class_sharded_head()) needs
    its own `head_optimizer`; `optimizer` then holds the other parameters. eval_fn(ema) runs every
    cfg.eval_every steps on every process. Tracker tags start with `run_name/` when given.
    `sampler(plan, rank, seed)` builds this process's batch sampler (default: EpochBatchSampler).
    run_config: the run-defining experiment config (engine.run_identity.run_config), recorded in
    each checkpoint; a resume with other values is refused (docs/engine.md, resume semantics).
    stop_fn(step, metrics) runs after each periodic evaluation on every process; True ends training
    there (a checkpoint is saved at that step when cfg.save_every > 0, marked so that a resume from it
    trains no further: docs/engine.md, early stopping).
    Raises NonFiniteLossError on a NaN/inf loss.
    """
    from accelerate.utils import send_to_device

    check_train_config(cfg)
    plan = TrainPlan.build(cfg, len(train_set), accelerator.num_processes)
    run_dir = Path(out_dir if out_dir is not None else cfg.output_dir)
    sharded_head = model.class_sharded_head()
    sharded = sharded_head is not None
    check_optimizers(model, optimizer, head_optimizer)
    _refuse_unsupported(cfg, accelerator, sharded)
    deepspeed = is_deepspeed(accelerator)
    check_sam(cfg.sam_rho, deepspeed=deepspeed, sharded=sharded, grad_accum_steps=cfg.grad_accum_steps,
              mixed_precision=accelerator.mixed_precision)
    if deepspeed:
        check_deepspeed_agrees(accelerator, cfg)
    accelerator.gradient_accumulation_steps = plan.grad_accum_steps
    accelerator.step = 0

    def schedule(opt: torch.optim.Optimizer):
        return build_scheduler(opt, plan.total_steps, plan.warmup_steps, cfg.schedule, cfg.min_lr_ratio,
                               cfg.poly_power, cfg.initial_lr_ratio)

    scheduler = schedule(optimizer)
    if deepspeed and getattr(accelerator, "deepspeed_engine_wrapped", None) is not None:
        accelerator.free_memory()  # one engine at a time: a second one trains wrongly beside the first
    if zero_stage(accelerator) == 3:
        for leaf in model.zero3_leaf_modules():
            mark_zero3_leaf(leaf)
    trainable, optimizer = accelerator.prepare(model, optimizer)
    check_prepared(accelerator, trainable)
    core = accelerator.unwrap_model(trainable)
    head = None
    extras = list(core.extra_state()) + list(extra_state)
    if sharded_head is not None:
        sharded_head.to(accelerator.device)
        head = ShardedHeadTraining(sharded_head, head_optimizer, schedule(head_optimizer))  # type: ignore[arg-type]
        extras.insert(0, head.extra_state())
    weights = core.checkpoint_module()
    # refused above for sharded heads
    ema = build_weight_average(weights, cfg, plan.steps_per_epoch) if uses_weight_average(cfg) else None
    schedules = scheduler if head is None else Schedulers(scheduler, head.scheduler)
    if deepspeed:
        save_ds, load_ds = deepspeed_state_hooks(trainable)
        extras.insert(0, ExtraState("deepspeed", save_ds, load_ds))
        state = TrainingState(NoState(), NoOptimizerState(), schedules, ema)  # type: ignore[arg-type]
    else:
        state = TrainingState(weights, optimizer, schedules, ema)
    engine = "deepspeed" if deepspeed else "torch"
    if accelerator.num_processes > 1 and (cfg.save_every > 0 or cfg.resume is True):
        check_shared_folder(run_dir, accelerator)
    identity = run_identity(run_config, cfg)
    progress, info = _start(cfg, run_dir / "checkpoints", state, accelerator, extras, plan, engine, identity)
    resumed = None if info is None else progress.step
    info = info or {}
    accelerator.print(f"{desc}: {plan}")
    loader, set_position = train_loader(train_set, plan, cfg, accelerator.process_index, progress.sampler_seed,
                                        sampler)
    main = accelerator.is_main_process
    prefix = f"{run_name}/" if run_name else ""
    health = start_health(desc, getattr(core, "chance_losses", dict)(), cfg, plan, accelerator.print)
    log = StepLog(run_dir / "loss_log.jsonl" if cfg.loss_log and main else None, progress.step, accelerator, desc,
                  prefix, observer=health.observe)
    eval_log = run_dir / "eval_log.jsonl"
    if main and eval_fn is not None and cfg.eval_every > 0:
        trim_jsonl(eval_log, progress.step)
    step, epoch, batch = progress.step, progress.epoch, progress.batch_in_epoch
    last = float(info.get("last_loss", float("nan")))
    changes = tuple(info.get("config_changes", ()))
    history = list(info.get("config_history", [])) + ([{"step": progress.step, "changes": list(changes)}]
                                                       if changes else [])
    bar = tqdm(total=plan.total_steps, initial=step, desc=desc, dynamic_ncols=True, mininterval=1.0,
               disable=not accelerator.is_local_main_process)
    start, steps_run, evaluations = time.perf_counter(), 0, []
    micro_loss = torch.zeros((), device=accelerator.device)
    cast = input_dtype(accelerator, core)
    trained_params = [p for p in core.parameters() if p.requires_grad]  # registered: encoder (+ replicated head)

    def train_mode() -> None:
        trainable.train()
        if sharded_head is not None:
            sharded_head.train()

    train_mode()
    metric_sums: dict[str, Tensor] = {}
    stopped = bool(info.get("stopped_early", False))  # resumed from an early stop: train no further

    def save() -> None:
        save_checkpoint(run_dir / "checkpoints", Progress(step, epoch, batch, progress.sampler_seed), state,
                        accelerator, cfg.keep_last, extras,
                        info={"plan": asdict(plan), "last_loss": last, "desc": desc, "engine": engine,
                              "run_config": identity, "config_history": history, "stopped_early": stopped})

    while step < plan.total_steps and not stopped:
        set_position(epoch, batch)
        if hasattr(train_set, "set_epoch"):  # per-epoch augmentation seeds (reach persistent workers)
            train_set.set_epoch(epoch)
        for inputs, targets in loader:
            inputs, targets = send_to_device((inputs, targets), accelerator.device)  # nested inputs too
            inputs = cast_floating(inputs, cast)
            with accelerator.accumulate(trainable):
                loss, metrics = trainable(inputs, targets)
                accelerator.backward(loss)
                if cfg.sam_rho is not None:  # SAM: the step uses the gradient at w + e (engine/sam.py)
                    moved = perturb(trained_params, cfg.sam_rho)
                    optimizer.zero_grad(set_to_none=True)
                    with frozen_bn_statistics(core):
                        accelerator.backward(trainable(inputs, targets)[0])
                    restore(moved)
            micro_loss += loss.detach().float()
            for key, value in metrics.items():
                value = value.detach().float().to(micro_loss.device)
                metric_sums[key] = metric_sums[key] + value if key in metric_sums else value
            if not accelerator.sync_gradients:
                continue
            if cfg.clip_grad_norm is None:
                grad_norm = None
            elif head is not None:
                grad_norm = head.clip_(accelerator, trained_params, cfg.clip_grad_norm)
            else:  # under DeepSpeed the engine clipped already (gradient_clipping); this reads its norm
                grad_norm = grad_norm_tensor(accelerator.clip_grad_norm_(trainable.parameters(), cfg.clip_grad_norm))
            lr = float(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if not optimizer.step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if head is not None:
                head.step()
            if ema is not None:
                ema.update()
            step, batch, steps_run = step + 1, batch + 1, steps_run + 1
            log.add(micro_loss / plan.grad_accum_steps, grad_norm, {"step": step, "epoch": epoch, "lr": lr},
                    {k: v / plan.grad_accum_steps for k, v in metric_sums.items()})
            micro_loss, metric_sums = torch.zeros((), device=accelerator.device), {}
            core.after_optimizer_step(step)
            if batch == plan.steps_per_epoch:
                epoch, batch = epoch + 1, 0
            saving = cfg.save_every > 0 and (step % cfg.save_every == 0 or step == plan.total_steps)
            if step % cfg.log_every == 0 or step == plan.total_steps or saving:
                last = log.flush()  # before a save: never checkpoint NaN weights
                rate = steps_run * plan.global_batch / (time.perf_counter() - start)
                accelerator.log({f"{prefix}train/samples_per_s": rate}, step=step)
                bar.set_postfix(loss=f"{last:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:,.0f}")
            if saving:
                save()
            if eval_fn is not None and cfg.eval_every > 0 and step % cfg.eval_every == 0:
                metrics = eval_fn(ema)
                evaluations.append((step, metrics))
                accelerator.log({f"{prefix}eval/{k}": v for k, v in metrics.items()}, step=step)
                if main:
                    with open(eval_log, "a") as f:
                        f.write(json.dumps({"step": step, **metrics}) + "\n")
                train_mode()
                if stop_fn is not None and stop_fn(step, metrics):
                    stopped = True
                    if log.losses:  # the last steps' losses reach loss_log.jsonl (and NaN is caught) first
                        last = log.flush()
                    if cfg.save_every > 0:  # again if saved above: this one carries the stop mark
                        save()
            bar.update(1)
            if step_callback is not None:
                step_callback(step)
            if step >= plan.total_steps or stopped:
                break
    bar.close()
    seconds = time.perf_counter() - start
    if ema is not None:  # SWA on a BN encoder: BN statistics of the averaged weights (ema.py); else a no-op
        set_position(0, 0)
        refresh_fit_average_bn(ema, weights, core, loader, accelerator, cast)
    return FitResult(steps_run, seconds, steps_run * plan.global_batch / max(seconds, 1e-9), last, resumed, ema,
                     tuple(evaluations), changes, stopped)
