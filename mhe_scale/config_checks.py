"""Shape and range checks of a config tree that OmegaConf reports badly or not at all (used by config.py).

  * a section given a list or a scalar (`head: [1, 2]`, `train: 5`): OmegaConf raises a bare TypeError
    ("Cannot merge incompatible container types") or names the key '?';
  * a value below a field's lower bound (`data.num_train=-5`): a field declares it in its metadata,
        num_train: int = field(default=60_000, metadata={"min": 1})
    and every loaded config is checked against it.
Each function returns the problem as text naming the dotted key (None / [] when there is none);
config.py turns it into a ConfigError with the file or override it came from.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig


def _kind(node: Any) -> str:
    if isinstance(node, (DictConfig, dict)):
        return "a mapping"
    if isinstance(node, (ListConfig, list, tuple)):
        return "a list"
    return "a value"


def _show(node: Any) -> str:
    if isinstance(node, (DictConfig, ListConfig)):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=False)
    text = repr(node)
    return text if len(text) <= 60 else text[:57] + "..."


def merge_conflict(base: Any, delta: Any, prefix: str = "") -> str | None:
    """The first key that is a mapping on one side and a list / value on the other (what OmegaConf
    cannot merge), as 'key: ... is a mapping, ... gives a list [1, 2]'; None when the trees merge."""
    if not (isinstance(base, DictConfig) and isinstance(delta, DictConfig)):
        return None
    for key in delta.keys():
        if key not in base:
            continue
        old, new = base._get_node(key), delta._get_node(key)
        dotted = f"{prefix}{key}"
        old_map, new_map = isinstance(old, DictConfig), isinstance(new, DictConfig)
        if old_map and new_map:
            found = merge_conflict(old, new, dotted + ".")
            if found:
                return found
        elif (old_map or new_map) and not (old._is_none() or new._is_none()):
            fix = f"set one of its keys ({dotted}.<key>=...)" if old_map else f"give '{dotted}' as {_kind(old)}"
            return (f"'{dotted}' is {_kind(old)} ({_show(old)}) where it is given {_kind(new)} ({_show(new)}); "
                    f"{fix}")
    return None


def _dataclass_of(hint: Any) -> tuple[type | None, bool]:
    """(the dataclass inside `hint`, whether None is allowed) for X, Optional[X]; (None, _) otherwise."""
    args = typing.get_args(hint)
    optional = type(None) in args
    for arg in (args or (hint,)):
        if dataclasses.is_dataclass(arg):
            return arg, optional  # type: ignore[return-value]
    return None, optional


def section_shape_errors(raw: Any, schema: Any, prefix: str = "") -> list[str]:
    """Every section of the raw tree that the dataclass `schema` types as a section (a dataclass) but that
    is given as a list or a value, e.g. "'train' is a section of keys (train.epochs, ...); got a value 5"."""
    if not isinstance(raw, DictConfig) or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema if isinstance(schema, type) else type(schema))
    problems = []
    for key in raw.keys():
        section, optional = _dataclass_of(hints.get(str(key)))
        if section is None:
            continue
        node = raw._get_node(key)
        dotted = f"{prefix}{key}"
        if isinstance(node, DictConfig):
            problems += section_shape_errors(node, section, dotted + ".")
        elif not (optional and node._is_none()):
            names = [f.name for f in dataclasses.fields(section)][:3]
            example = ", ".join(f"{dotted}.{n}" for n in names)
            problems.append(f"'{dotted}' is a section of keys ({example}, ...); got {_kind(node)} {_show(node)}: "
                            f"write it as '{dotted}:' followed by indented 'key: value' lines, or override "
                            f"one key as {dotted}.{names[0]}=...")
    return problems


def bound_errors(cfg: Any, schema: Any, prefix: str = "") -> list[str]:
    """Every field whose metadata declares {"min": m} and whose value in the loaded config is below m."""
    if cfg is None or not dataclasses.is_dataclass(schema):
        return []
    hints = typing.get_type_hints(schema if isinstance(schema, type) else type(schema))
    problems = []
    for f in dataclasses.fields(schema):
        value = getattr(cfg, f.name, None)
        dotted = f"{prefix}{f.name}"
        low = f.metadata.get("min")
        if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            problems.append(f"{dotted}={value} must be >= {low}")
        section, _ = _dataclass_of(hints.get(f.name))
        if section is not None and isinstance(value, DictConfig):
            problems += bound_errors(value, section, dotted + ".")
    return problems
