"""How every task reports a run: print the tables, save the resolved config and the results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mhe_scale.config import ExperimentConfig, HeadConfig, to_yaml
from mhe_scale.engine.accelerator import is_deepspeed
from mhe_scale.engine.model import optimizer_state_numel
from mhe_scale.eval.xmc import format_table


def write_results(cfg: ExperimentConfig, results: dict[str, dict[str, Any]], accelerator, note: str = "") -> str:
    """results {run name: {"metrics": {...}, "costs": {...}}} -> a metric table (percent) and a cost
    table (and `note` under them), printed; config.yaml, results.json and results.md saved by the main process.

    config.yaml is the config this run used; a run that resumed checkpoints written with other
    values (train.resume_changed=true; a result's "config_changes") says so in a comment on top.
    Without that key such a resume is refused in fit, before anything here is written."""
    tables = []
    if any(v["metrics"] for v in results.values()):
        tables.append(format_table({k: v["metrics"] for k, v in results.items()}))
    costs = {k: v["costs"] for k, v in results.items() if v["costs"]}
    if costs:
        tables.append(format_table(costs, percent=False, digits=3))
    text = "\n\n".join(tables + ([note] if note else []))
    accelerator.print("\n" + text)
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_resume_note(results) + to_yaml(cfg))
        (out / "results.json").write_text(json.dumps(results, indent=2))
        (out / "results.md").write_text(text + "\n")
        accelerator.print(f"\nresolved config and results written to {out}/")
    return text


def resume_record(result) -> dict[str, Any]:
    """The entries of a run's results that say it resumed a checkpoint of another config (else {})."""
    if not result.config_changes:
        return {}
    return {"resumed_from": result.resumed_from, "config_changes": list(result.config_changes)}


def _resume_note(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"#   {name} (resumed at step {v['resumed_from']}): {change}"
             for name, v in results.items() for change in v.get("config_changes", ())]
    if not lines:
        return ""
    return ("# Resumed with train.resume_changed=true from checkpoints written with other values; up to the\n"
            "# resumed step the run trained with the old value of each key below (old -> new):\n"
            + "\n".join(lines) + "\n")


def training_costs(result, head: nn.Module, optimizer: torch.optim.Optimizer,
                   head_optimizer: torch.optim.Optimizer | None, accelerator, **sizes: float) -> dict[str, float]:
    """The cost columns of a run: time, throughput, the given sizes, the head's optimizer state
    (in millions of elements) and the last logged loss."""
    costs = {"train s": result.seconds, "samples/s": result.samples_per_second, **sizes}
    if not is_deepspeed(accelerator):  # ZeRO keeps the optimizer state in flat partitions, not per parameter
        costs["head optim state (M)"] = optimizer_state_numel(head_optimizer or optimizer, list(head.parameters())) / 1e6
    costs["final loss"] = result.last_loss
    return costs


def head_label(cfg: HeadConfig) -> str:
    return cfg.name if cfg.sizes is None else f"{cfg.name} {list(cfg.sizes)}"


def run_folder(cfg: HeadConfig, baseline: bool = False) -> str:
    """Sub-folder of output_dir for one head's checkpoints and loss log, e.g. 'mhp-317x316'; the
    baseline's ends in '-baseline', so a baseline with the head's name and sizes has its own."""
    folder = cfg.name if cfg.sizes is None else f"{cfg.name}-{'x'.join(str(c) for c in cfg.sizes)}"
    return folder + ("-baseline" if baseline else "")


def train_each_head(cfg: ExperimentConfig, train: Callable[[HeadConfig, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """train(head_cfg, folder) for cfg.head and then cfg.eval.baseline (when set) -> {row label: result};
    the baseline trains in its own folder (run_folder(..., baseline=True)) and, when its label equals
    the head's, gets the row "<label> (baseline)"."""
    runs = [cfg.head] + ([cfg.eval.baseline] if cfg.eval.baseline is not None else [])
    results: dict[str, dict[str, Any]] = {}
    for i, head_cfg in enumerate(runs):
        name = head_label(head_cfg)
        results[name if name not in results else f"{name} (baseline)"] = train(head_cfg, run_folder(head_cfg, i > 0))
    return results
