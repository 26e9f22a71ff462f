"""Tasks by name: each registers its config schema (typed data / model sections) and its run function.

    @register_task("xmc", XmcConfig, "XMC on sparse BoW / TF-IDF files", data_names=("xc",))
    def run_xmc(cfg: XmcConfig, accelerator) -> dict: ...

`train.py` looks the config's task up here (`task:` in the file, else by data.name) and calls its
run function; `mhe-scale tasks` prints every task with its schema. Adding a task is a new module
in mhe_scale/tasks/ that calls register_task: modules of this package are imported on first lookup.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mhe_scale.config import ConfigError, ExperimentConfig

RunFn = Callable[[Any, Any], dict]


@dataclass(frozen=True)
class Task:
    name: str
    schema: type
    """ExperimentConfig subclass with the task's own data / model sections."""
    run: RunFn
    """run(cfg, accelerator) -> {run name: {"metrics": ..., "costs": ...}}."""
    summary: str
    data_names: tuple[str, ...] = ()
    """Values of data.name that select this task in files without `task:`."""


_TASKS: dict[str, Task] = {}
_NOT_TASKS = {"registry", "report", "paths"}


def register_task(name: str, schema: type, summary: str, data_names: tuple[str, ...] = ()) -> Callable[[RunFn], RunFn]:
    if not (isinstance(schema, type) and issubclass(schema, ExperimentConfig)):
        raise TypeError(f"task {name!r}: schema must subclass ExperimentConfig")

    def wrap(run: RunFn) -> RunFn:
        if name in _TASKS and _TASKS[name].run is not run:
            raise ValueError(f"task {name!r} is registered twice")
        _TASKS[name] = Task(name, schema, run, summary, tuple(data_names))
        return run

    return wrap


def _import_tasks() -> None:
    import mhe_scale.tasks as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_TASKS and not info.name.startswith("_"):
            importlib.import_module(f"mhe_scale.tasks.{info.name}")


def list_tasks() -> list[Task]:
    _import_tasks()
    return [_TASKS[name] for name in sorted(_TASKS)]


def get_task(name: str) -> Task:
    if name not in _TASKS:
        _import_tasks()
    if name not in _TASKS:
        raise ConfigError(f"task={name!r} is not registered; known: {', '.join(sorted(_TASKS))} (mhe-scale tasks)")
    return _TASKS[name]


def resolve_task(raw: Any, source: str) -> Task:
    """The task of a raw config tree: its `task` key, else the task whose data_names hold data.name."""
    name = raw.get("task") if hasattr(raw, "get") else None
    if name is not None:
        return get_task(str(name))
    data = raw.get("data") if hasattr(raw, "get") else None
    data_name = str(data.get("name", "synthetic")) if hasattr(data, "get") else "synthetic"
    matches = [t for t in list_tasks() if data_name in t.data_names]
    if len(matches) != 1:
        known = sorted(n for t in list_tasks() for n in t.data_names)
        raise ConfigError(f"{source}: no `task:` given and data.name={data_name!r} selects no single task "
                          f"(known data names: {', '.join(known)}); set task: NAME (mhe-scale tasks)")
    return matches[0]


def describe_schema(schema: Any, prefix: str = "") -> list[str]:
    """One line per key: `section.key: type = default`."""
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        inner = next((a for a in (typing.get_args(kind) or (kind,)) if dataclasses.is_dataclass(a)), None)
        if inner is not None and f.default is dataclasses.MISSING:  # a section (eval.baseline: an optional value)
            lines += describe_schema(inner, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "?")  # type: ignore[misc]
        type_name = getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
        lines.append(f"{prefix}{f.name}: {type_name} = {default!r}")
    return lines
