"""Training engine: the accelerate loop (one process, DDP, DeepSpeed ZeRO), atomic pickle-free
checkpoints, lr schedules, EMA, class-sharded heads beside the prepared encoder.

    accelerator = build_accelerator(cfg.dist, cfg.train)
    result = fit(model, optimizer, train_set, cfg.train, accelerator, out_dir=run_dir)
    metrics = evaluate(model, test_set, [1, 3, 5], 1024, ema=result.ema, accelerator=accelerator)

See docs/engine.md.
"""

from mhe_scale.engine.accelerator import build_accelerator
from mhe_scale.engine.checkpoint import (ExtraState, Progress, TrainingState, find_resumable, load_checkpoint,
                                         save_checkpoint, verify_checkpoint)
from mhe_scale.engine.ema import ExponentialMovingAverage
from mhe_scale.engine.evaluate import evaluate
from mhe_scale.engine.loop import FitResult, NonFiniteLossError, TrainPlan, fit
from mhe_scale.engine.model import Classifier, build_optimizer
from mhe_scale.engine.schedule import build_scheduler, lr_factor

__all__ = ["Classifier", "ExponentialMovingAverage", "ExtraState", "FitResult", "NonFiniteLossError", "Progress",
           "TrainPlan", "TrainingState", "build_accelerator", "build_optimizer", "build_scheduler", "evaluate",
           "find_resumable", "fit", "load_checkpoint", "lr_factor", "save_checkpoint", "verify_checkpoint"]
