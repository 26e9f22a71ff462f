"""Training-health warnings: a run that diverged or collapsed is named, with what to try.

`fit` builds one TrainingHealth per call and hands it every logged step (StepLog's observer). Each
warning is one line, printed once per fit call by the main process (accelerator.print); none stops
training (a NaN / inf loss does: step_log.NonFiniteLossError):
  * warm-up longer than the run: the warm-up asked for (train.warmup_steps, or warmup_epochs x steps
    per epoch) is at least the run's optimizer steps, so the lr rises until the last step;
  * loss growing early: within the first EARLY_STEPS steps a step's loss exceeds GROWTH x the first
    step's loss (lr too high for the batch);
  * loss at the chance level: the module's chance_losses() ({"loss" or a metric name: its value when
    the model predicts no better than uniform, e.g. ln C for a C-way softmax}) and the logged values:
    the mean of the last CHANCE_WINDOW steps back within CHANCE_TOLERANCE of it after a mean of at
    most LEARNED_FRACTION of it (collapsed), never below it by step max(STUCK_MIN_STEPS, total / 10)
    (not learning), or above ABOVE_CHANCE x it (worse than guessing: diverged).
Embeddings are checked at evaluation by the tasks that make them (EmbeddingCheck): dimensions that
are exactly 0, or constant, over an evaluation batch.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

EARLY_STEPS = 100
"""The loss-growth check looks at the first this many optimizer steps of a run."""
GROWTH = 3.0
"""A step's loss above GROWTH x the first step's loss within EARLY_STEPS is reported."""
CHANCE_TOLERANCE = 0.05
"""A value within CHANCE_TOLERANCE x chance of it counts as 'at the chance level'."""
ABOVE_CHANCE = 2.0
"""A value above ABOVE_CHANCE x chance for CHANCE_WINDOW steps is worse than guessing: diverged."""
CHANCE_WINDOW = 10
"""The chance-level checks read the mean of the last CHANCE_WINDOW logged steps."""
LEARNED_FRACTION = 0.8
"""A run whose value was at most LEARNED_FRACTION x chance had learned something."""
STUCK_MIN_STEPS = 100
"""A run still at the chance level at step max(STUCK_MIN_STEPS, total_steps // 10) is not learning."""
DEAD_FRACTION = 0.9
"""EmbeddingCheck: report when at least this fraction of the dimensions is exactly 0 or constant (narrow nets
keep many dead units and still classify perfectly: 40 of 64 GeM dimensions constant at top-1 1.0 was seen)."""

Printer = Callable[[str], None]


def requested_warmup(warmup_steps: int, warmup_epochs: float | None, steps_per_epoch: int) -> tuple[int, str]:
    """(warm-up steps asked for before TrainPlan clamps them to the run, how it was given)."""
    if warmup_epochs is not None:
        return round(warmup_epochs * steps_per_epoch), f"train.warmup_epochs={warmup_epochs:g}"
    return int(warmup_steps), f"train.warmup_steps={warmup_steps}"


def warmup_warning(requested: int, given: str, total_steps: int, steps_per_epoch: int) -> str | None:
    """The warning for a warm-up of `requested` steps in a run of `total_steps`, or None when it is shorter."""
    if requested <= 0 or requested < total_steps:
        return None
    suggestion = max(1, total_steps // 10)
    epochs = f"{total_steps / steps_per_epoch:.3g} epoch{'' if total_steps == steps_per_epoch else 's'}"
    return (f"the warm-up ({given}: {requested} optimizer steps) is not shorter than the run ({total_steps} "
            f"steps, {epochs}): the lr rises until the last step and never reaches its peak or decay; shorten it "
            f"(e.g. train.warmup_steps={suggestion}, a tenth of the run) or train longer")


class TrainingHealth:
    """Watches the logged per-step values of one fit call and prints each kind of warning once.

    chance: {"loss" or a logged metric name: its chance-level value}. Steps are the run's optimizer steps,
    so a run resumed past EARLY_STEPS skips the early-growth check."""

    def __init__(self, desc: str, chance: Mapping[str, float], total_steps: int, printer: Printer) -> None:
        self.desc, self.total_steps, self.printer = desc, total_steps, printer
        self.chance = {k: float(v) for k, v in chance.items() if v is not None and math.isfinite(v) and v > 0}
        self.said: set[str] = set()
        self.first: tuple[int, float] | None = None
        self.lowest = {k: math.inf for k in self.chance}
        self.recent = {k: deque(maxlen=CHANCE_WINDOW) for k in self.chance}
        self.stuck_step = max(STUCK_MIN_STEPS, total_steps // 10)

    def say(self, kind: str, text: str) -> None:
        if kind not in self.said:
            self.said.add(kind)
            self.printer(text)

    def observe(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """rows: the logged optimizer steps, oldest first ({"step", "lr", "loss", metrics...}, finite)."""
        for row in rows:
            self._growth(row)
            for key, chance in self.chance.items():
                if key in row:
                    self._chance(key, chance, int(row["step"]), float(row[key]))

    def _growth(self, row: Mapping[str, Any]) -> None:
        step, loss = int(row["step"]), float(row["loss"])
        if self.first is None:
            self.first = (step, loss) if step <= EARLY_STEPS else (step, math.nan)
            return
        first_step, first = self.first
        if not (first > 0) or step > EARLY_STEPS or loss <= GROWTH * first:
            return
        self.say("growth", f"warning: {self.desc}: the loss grew from {first:.4g} at step {first_step} to {loss:.4g} "
                           f"at step {step} ({loss / first:.1f}x) within the first {EARLY_STEPS} steps: the updates are "
                           f"too large for this batch (lr {float(row.get('lr', math.nan)):.3g} at that step); try a "
                           "lower optim.lr, a warm-up (train.warmup_steps / warmup_epochs) or train.clip_grad_norm")

    def _chance(self, key: str, chance: float, step: int, value: float) -> None:
        window = self.recent[key]
        window.append(value)
        if len(window) < CHANCE_WINDOW:
            return
        mean = sum(window) / len(window)  # over CHANCE_WINDOW steps: one batch's noise decides nothing
        learned = self.lowest[key] <= LEARNED_FRACTION * chance
        self.lowest[key] = min(self.lowest[key], mean)
        name = "the loss" if key == "loss" else f"the logged {key!r}"
        level = f"the chance level {chance:.4g} of this task (what predicting uniformly scores)"
        advice = ("try a lower optim.lr, a longer warm-up or train.clip_grad_norm, and check that the labels match "
                  "the inputs")
        where = f"{mean:.4g} over the {CHANCE_WINDOW} steps to step {step}"
        if mean > ABOVE_CHANCE * chance:
            self.say(f"above:{key}", f"warning: {self.desc}: {name} is {where}, above {ABOVE_CHANCE:g}x {level}: "
                                     f"worse than guessing, the training diverged; {advice}")
        elif abs(mean - chance) > CHANCE_TOLERANCE * chance:
            return
        elif learned:
            self.say(f"chance:{key}", f"warning: {self.desc}: {name} went back up to {where}, {level}, after "
                                      f"reaching {self.lowest[key]:.4g}: the training collapsed (dead or constant "
                                      f"features?); {advice}")
        elif step >= self.stuck_step and self.lowest[key] >= (1.0 - CHANCE_TOLERANCE) * chance:
            self.say(f"chance:{key}", f"warning: {self.desc}: {name} is {where}, still at {level}: the model has "
                                      f"learned nothing yet; {advice}")


def embedding_problem(embeddings: Tensor) -> str | None:
    """What is wrong with embeddings [N, D] of an evaluation batch (None: nothing seen): at least DEAD_FRACTION
    of the D dimensions exactly 0 for every row, or constant over the rows (std ~ 0)."""
    e = embeddings.detach().float().reshape(embeddings.shape[0], -1)
    n, d = e.shape
    if n < 2 or d < 1:
        return None
    dead = (e == 0).all(dim=0)
    scale = float(e.abs().max())
    constant = (e.std(dim=0) <= 1e-6 * max(scale, 1e-30)) & ~dead
    if int(dead.sum()) >= DEAD_FRACTION * d:
        return f"{int(dead.sum())} of {d} dimensions are exactly 0 over {n} inputs"
    if int((dead | constant).sum()) >= DEAD_FRACTION * d:
        return (f"{int((dead | constant).sum())} of {d} dimensions are the same for all {n} inputs "
                f"({int(dead.sum())} of them exactly 0)")
    return None


class EmbeddingCheck:
    """`check(embeddings [N, D], step)`: one warning line (printed once) when embedding_problem sees one.
    Tasks that make embeddings call it at evaluation on one batch (cheap: a reduction over [N, D])."""

    def __init__(self, what: str, printer: Printer) -> None:
        self.what, self.printer, self.said = what, printer, False

    def __call__(self, embeddings: Tensor, step: int | None = None) -> str | None:
        problem = embedding_problem(embeddings)
        if problem is not None and not self.said:
            self.said = True
            when = "" if step is None else f" at step {step}"
            self.printer(f"warning: {self.what}{when}: {problem}: the features collapsed (dead ReLUs after too "
                         "large updates?); retrieval and classification from them are near chance; try a lower "
                         "optim.lr, a longer warm-up or train.clip_grad_norm")
        return problem

