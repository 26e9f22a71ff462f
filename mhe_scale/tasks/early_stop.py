"""Early stopping on an evaluation metric, as a `stop_fn` for engine.fit (docs/engine.md, early stopping).

`EarlyStopping(key, patience, min_delta)(step, metrics)` is True once `patience` evaluations in a row
have not raised metrics[key] above the best so far by more than min_delta (a NaN counts as no
improvement). Its state (best, best_step, evaluations without improvement) is saved with every
checkpoint through `extra_state()`, so a run resumed from any checkpoint applies the same rule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mhe_scale.engine.checkpoint import ExtraState

FILE = "early_stop.json"


class EarlyStopping:
    def __init__(self, key: str, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1 or min_delta < 0:
            raise ValueError(f"early stopping needs patience >= 1 and min_delta >= 0, got {patience}, {min_delta}")
        self.key, self.patience, self.min_delta = key, int(patience), float(min_delta)
        self.best, self.best_step, self.bad = -math.inf, None, 0

    def __call__(self, step: int, metrics: dict[str, float]) -> bool:
        if self.key not in metrics:
            raise KeyError(f"early stopping watches {self.key!r} but the evaluation returned {sorted(metrics)}")
        value = float(metrics[self.key])
        if not math.isnan(value) and value > self.best + self.min_delta:
            self.best, self.best_step, self.bad = value, int(step), 0
        else:
            self.bad += 1
        return self.bad >= self.patience

    def state(self) -> dict:
        return {"key": self.key, "best": None if self.best == -math.inf else self.best, "best_step": self.best_step,
                "bad": self.bad}

    def extra_state(self, is_main: bool) -> ExtraState:
        """Saved by the main process as early_stop.json in each checkpoint; loaded by every process."""

        def save(folder: Path) -> None:
            if is_main:
                (Path(folder) / FILE).write_text(json.dumps(self.state()))

        def load(folder: Path) -> None:
            path = Path(folder) / FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: this checkpoint was written without early stopping; "
                                        "resume it without the early-stopping key, or start another output_dir")
            raw = json.loads(path.read_text())
            if raw.get("key") != self.key:
                raise ValueError(f"{path}: early stopping watched {raw.get('key')!r}, this run watches {self.key!r}")
            self.best = -math.inf if raw["best"] is None else float(raw["best"])
            self.best_step, self.bad = raw["best_step"], int(raw["bad"])

        return ExtraState("early stopping", save, load)
