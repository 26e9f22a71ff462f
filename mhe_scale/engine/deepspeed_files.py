"""DeepSpeed checkpoints without pickle: a CheckpointEngine that writes safetensors + JSON.

DeepSpeed saves nested objects (module weights, ZeRO partitions, the base optimizer's state, its
config, a loss-scaler object, enums) with torch.save and reads them back by unpickling
(weights_only=False), which can run arbitrary code from a tampered file.
`SafetensorsCheckpointEngine` keeps DeepSpeed's file names and layout but writes each object as a
safetensors file: every tensor is an entry `t<i>` (a private copy, so views of DeepSpeed's flat
buffers do not share storage), and the structure is JSON in the header's metadata, with tags for
what JSON lacks:
    {"__tensor__": i}  {"__tuple__": [...]}  {"__map__": [[key, value], ...]} (any key type, order kept)
    {"__size__": [...]} (torch.Size)  {"__dtype__": "torch.float32"}
    {"__enum__": name, "value": v} / {"__object__": name, "fields": {...}} for the classes in ALLOWED
Loading reads safetensors and JSON only; a name outside ALLOWED is an error, so no code runs.
The settings that would make DeepSpeed read files by other means (the JSON's checkpoint.load_universal,
checkpoint.writer, datastates_ckpt) are refused by accelerator.check_no_pickle_settings.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

FORMAT = "mhe_scale.deepspeed_state.v1"
ALLOWED: dict[str, type] = {cls.__name__: cls for cls in (LossScaler, DynamicLossScaler, ZeroStageEnum,
                                                          fragment_address)}
"""Classes DeepSpeed 0.19 stores beside tensors and builtins (found with
torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 1/2/3 fp32 + bf16 checkpoints);
plain data holders rebuilt from their fields."""
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool)}


def encode(obj: Any, tensors: list[Tensor], where: str = "state") -> Any:
    """obj -> JSON-able structure; tensors are appended to `tensors` and referenced by index."""
    if torch.is_tensor(obj):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, enum.Enum):  # before int: ZeroStageEnum is an int
        if type(obj).__name__ not in ALLOWED:
            raise TypeError(f"{where}: enum {type(obj).__qualname__} is not in deepspeed_files.ALLOWED")
        return {"__enum__": type(obj).__name__, "value": obj.value}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Size):
        return {"__size__": list(obj)}
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj)}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return {"__map__": [[encode(k, tensors, where), encode(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if type(obj).__name__ in ALLOWED and ALLOWED[type(obj).__name__] is type(obj):
        fields = ({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj)
                  else dict(vars(obj)))
        return {"__object__": type(obj).__name__, "fields": encode(fields, tensors, where)}
    raise TypeError(f"{where}: cannot store a {type(obj).__qualname__} in a DeepSpeed checkpoint without pickle; "
                    "add its class to deepspeed_files.ALLOWED if it is plain data")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of `encode`; raises ValueError on an unknown tag or class name."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[f"t{obj['__tensor__']}"]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__map__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__map__"]}
    if "__size__" in obj:
        return torch.Size(obj["__size__"])
    if "__dtype__" in obj:
        return _DTYPES[obj["__dtype__"]]
    name = obj.get("__enum__", obj.get("__object__"))
    if name not in ALLOWED:
        raise ValueError(f"refusing to rebuild {name!r}: not in deepspeed_files.ALLOWED {sorted(ALLOWED)}")
    cls = ALLOWED[name]
    if "__enum__" in obj:
        return cls(obj["value"])
    fields = decode(obj["fields"], tensors)
    if dataclasses.is_dataclass(cls):
        return cls(**fields)
    rebuilt = cls.__new__(cls)
    rebuilt.__dict__.update(fields)
    return rebuilt


def save_object(obj: Any, path: str) -> None:
    """Write obj (nested dicts / lists / tensors / ALLOWED objects) to one safetensors file."""
    tensors: list[Tensor] = []
    structure = encode(obj, tensors)
    entries = {f"t{i}": t.detach().to("cpu", copy=True).contiguous() for i, t in enumerate(tensors)}
    save_file(entries, path, metadata={"format": FORMAT, "json": json.dumps(structure)})


def load_object(path: str) -> Any:
    """Read a file written by `save_object` (tensors on CPU); never unpickles."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if meta.get("format") == FORMAT else {}
    except Exception as exc:  # a pickle (DeepSpeed's own format) or a damaged file: no safetensors header
        raise ValueError(f"{path} is not a safetensors file written by mhe_scale's DeepSpeed checkpoint engine "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); refusing to "
                         "unpickle it") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by mhe_scale's DeepSpeed checkpoint engine (format "
                         f"{meta.get('format')!r}); refusing to unpickle it")
    return decode(json.loads(meta["json"]), tensors)


class SafetensorsCheckpointEngine(CheckpointEngine):
    """DeepSpeed CheckpointEngine over save_object / load_object (same file names as DeepSpeed's)."""

    def __init__(self, config_params: Any = None) -> None:
        super().__init__(config_params)
        self.name = "SafetensorsCheckpointEngine"

    def create(self, info: CheckpointCommitInfo) -> None:
        pass

    def save(self, state_dict: Any, path: str) -> None:
        save_object(state_dict, path)

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_object(path)

    def commit(self, info: CheckpointCommitInfo) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False
