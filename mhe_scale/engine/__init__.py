"""Training engine: the accelerate loop (one process, DDP, DeepSpeed ZeRO), atomic pickle-free
checkpoints, lr schedules, EMA, class-sharded heads beside the prepared encoder.

    accelerator = build_accelerator(cfg.dist, cfg.train)
    result = fit(module, optimizer, train_set, cfg.train, accelerator, out_dir=run_dir, eval_fn=task_evaluation)

`module` is any TrainingModule ((inputs, targets) -> (loss, metrics), engine/module.py); evaluation
belongs to the tasks (fit calls their eval_fn every train.eval_every steps).

See docs/engine.md.
"""

from mhe_scale.engine.accelerator import build_accelerator
from mhe_scale.engine.checkpoint import (ExtraState, Progress, TrainingState, find_resumable, load_checkpoint,
                                         save_checkpoint, verify_checkpoint)
from mhe_scale.engine.ema import ExponentialMovingAverage
from mhe_scale.engine.loop import FitResult, NonFiniteLossError, TrainPlan, fit
from mhe_scale.engine.model import Classifier, build_optimizer
from mhe_scale.engine.module import TrainingModule
from mhe_scale.engine.schedule import build_scheduler, lr_factor

__all__ = ["Classifier", "ExponentialMovingAverage", "ExtraState", "FitResult", "NonFiniteLossError", "Progress",
           "TrainPlan", "TrainingState", "build_accelerator", "TrainingModule", "build_optimizer", "build_scheduler",
           "find_resumable", "fit", "load_checkpoint", "lr_factor", "save_checkpoint", "verify_checkpoint"]
