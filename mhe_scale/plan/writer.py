"""Write a chosen Setup as the files a run launches from: DeepSpeed JSON, accelerate YAML, config overrides.

    files = write_setup(setup, out_dir, cfg, config_path, user_overrides, gpus_per_node=8, nodes=2)
    print(files.command)

The DeepSpeed JSON leaves to the engine what it fills from the config ("auto": micro-batch, accumulation,
bf16) and writes gradient_clipping explicitly (DeepSpeed's silent default is 1.0; engine/accelerator.py
checks it equals train.clip_grad_norm). The overrides carry batch size, accumulation, precision, DeepSpeed file,
checkpointing and head, so `mhe_scale.train CONFIG <overrides>` trains exactly the planned set-up.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mhe_scale.engine.serialize import atomic_write_text
from mhe_scale.plan.candidates import Setup
from mhe_scale.plan.memory import EngineSpec, HeadSpec


PRECISION_VALUE = {"fp32": "'no'", "bf16": "bf16", "fp16": "fp16"}
"""Quoted 'no': YAML (and OmegaConf overrides) read a bare no as the boolean False."""


@dataclass(frozen=True)
class WrittenFiles:
    deepspeed: Path | None
    accelerate: Path
    overrides: Path
    override_list: list[str]
    command: str


def deepspeed_json(setup: Setup, clip: float, engine: EngineSpec | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of a ZeRO set-up ("auto" where the engine fills it)."""
    if setup.zero_stage is None:
        raise ValueError("a set-up without ZeRO has no DeepSpeed config")
    engine = engine or EngineSpec(zero_stage=setup.zero_stage)
    zero: dict[str, Any] = {"stage": setup.zero_stage, "contiguous_gradients": True, "overlap_comm": engine.overlap,
                            "reduce_bucket_size": int(engine.reduce_bucket_size)}
    if setup.zero_stage in (1, 2):
        zero["allgather_bucket_size"] = int(engine.allgather_bucket_size)
    if setup.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(engine.prefetch_bucket_size),
                    stage3_max_live_parameters=int(engine.max_live_parameters),
                    stage3_gather_16bit_weights_on_model_save=True)
    if setup.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if setup.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": float(clip), "bf16": {"enabled": "auto"}, "zero_optimization": zero,
            "zero_force_ds_cpu_optimizer": False}


def accelerate_yaml(setup: Setup, deepspeed_file: Path | None, gpus_per_node: int, nodes: int) -> str:
    """accelerate config for the set-up's world (num_processes counts all machines' processes)."""
    lines = ["# written by `mhe-scale plan`", "compute_environment: LOCAL_MACHINE"]
    if deepspeed_file is not None:
        lines += ["distributed_type: DEEPSPEED", "deepspeed_config:", f"  deepspeed_config_file: {deepspeed_file}"]
    else:
        lines.append(f"distributed_type: {'MULTI_GPU' if setup.world > 1 else repr('NO')}")
    lines += [f"num_machines: {nodes}", "machine_rank: 0", f"num_processes: {setup.world}"]
    if deepspeed_file is None:  # with a DeepSpeed file accelerate refuses it: dist.mixed_precision says it
        lines.append(f"mixed_precision: {PRECISION_VALUE[setup.precision]}")
    if nodes > 1:
        lines += ["main_process_ip: MAIN_NODE_IP  # set on every node, with machine_rank", "main_process_port: 29500",
                  "same_network: true"]
    return "\n".join(lines) + "\n"


def head_override(spec: HeadSpec) -> str:
    """head={...} replacing the whole head section (config.py: a section given as a mapping replaces it)."""
    items = [f"name:{spec.name}"]
    if spec.sizes and spec.name in ("mhp", "mhs", "mhc"):
        items.append("sizes:[" + ",".join(str(c) for c in spec.sizes) + "]")
    if spec.name == "partial_fc":
        items.append(f"sample_rate:{spec.sample_rate}")
    if spec.name == "mhs":
        items += [f"mode:{spec.mode}", f"num_sampled_groups:{spec.num_sampled_groups}"]
    if spec.cosine and spec.name in ("fc", "mhs"):
        items.append("cosine:true")
    return "head={" + ",".join(items) + "}"


def setup_overrides(setup: Setup, base: Setup, deepspeed_file: Path | None, has_checkpointing: bool) -> list[str]:
    out = [f"train.batch_size={setup.micro_batch}", f"train.grad_accum_steps={setup.accum}",
           f"dist.mixed_precision={PRECISION_VALUE[setup.precision]}",
           f"dist.deepspeed_config={deepspeed_file if deepspeed_file is not None else 'null'}",
           f"dist.zero_stage={setup.zero_stage if setup.zero_stage is not None else 'null'}",
           f"dist.shard_head={'true' if setup.head.sharded else 'false'}"]
    if has_checkpointing:
        out.append(f"model.grad_checkpointing={'true' if setup.checkpointing else 'false'}")
    if setup.head_label != base.head_label:
        out.append(head_override(setup.head))
    return out


def check_out_dir(out_dir: str | Path) -> Path:
    """The --out folder as a Path; ValueError naming it when it (or a parent) is a file, so nothing is
    written there (the three files go INTO the folder, created if missing)."""
    out = Path(out_dir)
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {out_dir}: {folder} is a file, not a folder; give a folder for deepspeed.json, "
                             "accelerate.yaml and overrides.txt (created if missing)")
    return out


def write_setup(setup: Setup, base: Setup, out_dir: str | Path, config_path: str, user_overrides: list[str],
                clip: float, engine: EngineSpec | None, gpus_per_node: int, nodes: int,
                has_checkpointing: bool) -> WrittenFiles:
    """Write deepspeed.json (ZeRO set-ups), accelerate.yaml and overrides.txt under out_dir (each atomically)."""
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds_path = None
    if setup.zero_stage is not None:
        ds_path = out / "deepspeed.json"
        atomic_write_text(ds_path, json.dumps(deepspeed_json(setup, clip, engine), indent=2) + "\n")
    acc_path = out / "accelerate.yaml"
    atomic_write_text(acc_path, accelerate_yaml(setup, ds_path, gpus_per_node, nodes))
    ours = setup_overrides(setup, base, ds_path, has_checkpointing)
    keys = {o.split("=", 1)[0] for o in ours}
    overrides = [o for o in user_overrides if o.split("=", 1)[0] not in keys] + ours
    ov_path = out / "overrides.txt"
    atomic_write_text(ov_path, "\n".join(overrides) + "\n")
    command = " ".join(["accelerate", "launch", "--config_file", shlex.quote(str(acc_path)), "-m", "mhe_scale.train",
                        shlex.quote(config_path), *(shlex.quote(o) for o in overrides)])
    return WrittenFiles(ds_path, acc_path, ov_path, overrides, command)
