"""What defines a training run: the config keys that change what is trained, as a flat dict.

A checkpoint records it (trainer_state.json, info.run_config); a resume compares it with the new
run's (engine/resume.py) and refuses a difference, so a changed config never silently continues
an old run. Keys that only change where or how often things are written or logged, how fast
batches are built, or how the run is evaluated are left out (NOT_TRAINING). `train.batch_size`
and `train.grad_accum_steps` are left out too: what matters for the schedule and the data order
is the global batch, which the resume check compares on its own (it may be kept with another
number of processes). `train.epochs` is compared by the resume check with its own rule.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

NOT_TRAINING: tuple[str, ...] = (
    "name", "eval",
    "train.output_dir", "train.resume", "train.resume_changed", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep_last", "train.num_workers", "train.threads", "train.eval_batch_size",
    "train.loss_log", "train.batch_size", "train.grad_accum_steps",
    "dist.log_with",
    "data.num_workers", "data.cache_dir", "data.num_proc", "data.decoded_cache_mb",
    "model.grad_checkpointing",
)
"""Dotted keys (or whole sections) that do not change the trained weights."""


def plain(cfg: Any) -> Any:
    """A dataclass, an OmegaConf node or plain data -> JSON-able nested dicts / lists (tuples -> lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        cfg = dataclasses.asdict(cfg)
    elif OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(cfg))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_training_key(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_TRAINING)


def training_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if is_training_key(k)}


def run_config(cfg: Any, head: Any = None) -> dict[str, Any]:
    """The run-defining config of one `fit` call of an experiment, to pass as fit(run_config=...).

    cfg: the resolved experiment config (OmegaConf node or dataclass); head: the head this fit
    trains when it is not cfg.head (e.g. cfg.eval.baseline). Returns nested plain dicts with the
    NOT_TRAINING keys removed."""
    tree = plain(cfg)
    if head is not None:
        tree["head"] = plain(head)
    return unflatten(training_keys(flatten(tree)))


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def describe(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


_ABSENT = object()

ADDED_KEYS: dict[str, Any] = {
    "optim.head_update": "dense",   # before it existed every head was updated densely
    "optim.head_momentum": None,    # None: the head uses optim.momentum, as before
    "train.max_steps": None,        # None: train.epochs sets the length, as before
    "optim.head_catch_up": "closed_form",  # the only catch-up before the key existed
    "optim.fused": False,           # the foreach AdamW step, as before
    "model.sparse_input": False,    # MLP encoders read dense rows, as before
}
"""Training keys added after runs were saved, each with the value that trains as those runs did. A
checkpoint that lacks the key is the same run as a new one with that value (any other value is a
difference); without this, adding a config key would refuse to resume every older checkpoint."""


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every training key that differs, sorted; absent values are _ABSENT
    (a key of ADDED_KEYS absent on one side counts as its as-before value)."""
    a, b = training_keys(flatten(old)), training_keys(flatten(new))

    def value(side: dict[str, Any], key: str) -> Any:
        return side.get(key, ADDED_KEYS.get(key, _ABSENT))

    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(a.keys() | b.keys())
            if value(a, k) != value(b, k)]
