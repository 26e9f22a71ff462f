"""The one place that builds the HF Accelerator: processes, mixed precision, DeepSpeed ZeRO, trackers.

    accelerator = build_accelerator(cfg.dist, cfg.train)

The launcher decides how many processes run (`accelerate launch`, `torchrun`, `deepspeed`);
`DistConfig` decides how they train. Traps handled here (measured, see ENVIRONMENT.md):
  * CPU runs use gloo; DeepSpeed on CPU needs `InitProcessGroupKwargs(backend="gloo")`, or every
    process believes it is alone, and must NOT see ACCELERATE_USE_CPU=1, which silently drops the
    DeepSpeed plugin: both are checked after construction, not trusted.
  * The DeepSpeed JSON's "auto" entries are filled from our config (micro batch, accumulation,
    clipping, bf16/fp16) so the YAML stays the single source of truth; `gradient_clipping` is
    always written (DeepSpeed's default is 1.0, accelerate's "auto" fill is 1.0 too).
  * DeepSpeed's shared-memory all-reduce op is JIT-compiled on first use: TORCH_EXTENSIONS_DIR
    defaults to ~/.cache/mhe_scale/torch_extensions/<key> so that happens once per machine.
  * Every process group waits dist.timeout_s in a collective (apply_process_group_timeout: accelerate
    would silently drop 600 s for gloo, DeepSpeed's own groups would keep torch's 30 min);
    `explain_timeout` turns the timeout into an error naming the rank that did not answer, and gloo's
    raw "Connection reset by peer" (a killed rank) into one naming the rank that stopped.
DeepSpeed checkpoints keep DeepSpeed's layout but are written and read without pickle
(deepspeed_files.py; docs/engine.md, "DeepSpeed").
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mhe_scale.config import DistConfig, TrainConfig

PRECISIONS = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard",)
TRACKER_RUN = "tensorboard"
"""Sub-folder of train.output_dir that holds the TensorBoard event files."""
EXTENSIONS_DIR = Path.home() / ".cache" / "mhe_scale" / "torch_extensions"
DEEPSPEED_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
                   "bf16.enabled", "fp16.enabled")
"""DeepSpeed keys whose value comes from our config ("auto" is filled; a number must agree)."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def deepspeed_requested(dist: DistConfig) -> bool:
    """DeepSpeed asked for by the config (deepspeed_config / zero_stage) or by the launcher's environment."""
    return dist.deepspeed_config is not None or dist.zero_stage is not None or _env_true("ACCELERATE_USE_DEEPSPEED")


def resolve_mixed_precision(dist: DistConfig, cuda: bool) -> str:
    """dist.mixed_precision, else the launcher's ACCELERATE_MIXED_PRECISION, else "no"; errors name the key."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    value = dist.mixed_precision or launcher or "no"
    if value not in PRECISIONS:
        raise ValueError(f"dist.mixed_precision={value!r} must be one of {PRECISIONS}")
    if dist.mixed_precision and launcher not in (None, "no", dist.mixed_precision):
        raise ValueError(f"dist.mixed_precision={dist.mixed_precision} but the launcher asked for {launcher} "
                         "(accelerate launch --mixed_precision); choose one")
    if value == "fp16" and not cuda:
        raise ValueError("dist.mixed_precision=fp16 needs a GPU (on CPU it would silently train in fp32); use bf16")
    return value


# ---------------------------------------------------------------- DeepSpeed config
def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(cfg: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    cfg[leaf] = value


def owned_values(train: TrainConfig, mixed_precision: str) -> dict[str, Any]:
    """The DEEPSPEED_OWNED keys' values according to our config."""
    return {"train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum_steps,
            "gradient_clipping": float(train.clip_grad_norm or 0.0),
            "bf16.enabled": mixed_precision == "bf16", "fp16.enabled": mixed_precision == "fp16"}


def resolve_deepspeed_config(dist: DistConfig, train: TrainConfig, mixed_precision: str,
                             world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config dict to train with: the JSON file (dist.deepspeed_config, else the launcher's
    ACCELERATE_DEEPSPEED_CONFIG_FILE) or a minimal one, with dist.zero_stage applied and every key of
    DEEPSPEED_OWNED set from train.* / mixed_precision. Raises ValueError naming both sides of a conflict."""
    path = dist.deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none":
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"dist.deepspeed_config={path}: cannot read it as JSON ({exc})") from exc
        source = path
    else:
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
        cfg, source = {"zero_optimization": {"stage": stage}}, "the generated DeepSpeed config"
    cfg = copy.deepcopy(cfg)
    if dist.zero_stage is not None:
        if dist.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"dist.zero_stage={dist.zero_stage} must be 0, 1, 2 or 3")
        _set(cfg, "zero_optimization.stage", dist.zero_stage)
    check_no_pickle_settings(cfg, source)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise ValueError(f"{source} has an {section!r} section; the engine builds torch optimizers (optim.*) and "
                             f"its own lr schedule (train.schedule): remove it")
    wanted = owned_values(train, mixed_precision)
    labels = {"train_micro_batch_size_per_gpu": f"train.batch_size={train.batch_size}",
              "gradient_accumulation_steps": f"train.grad_accum_steps={train.grad_accum_steps}",
              "gradient_clipping": f"train.clip_grad_norm={train.clip_grad_norm}",
              "bf16.enabled": f"dist.mixed_precision={mixed_precision}",
              "fp16.enabled": f"dist.mixed_precision={mixed_precision}"}
    for key in DEEPSPEED_OWNED:
        have = _get(cfg, key)
        if have is not None and have != "auto" and have != wanted[key]:
            raise ValueError(f"{source} sets {key}={have!r} but {labels[key]}; set it to \"auto\" (filled from our "
                             "config) or make them agree")
        _set(cfg, key, wanted[key])
    global_batch = train.batch_size * train.grad_accum_steps * world_size
    if cfg.get("train_batch_size", "auto") not in ("auto", global_batch):
        raise ValueError(f"{source} sets train_batch_size={cfg['train_batch_size']} but train.batch_size x "
                         f"grad_accum_steps x {world_size} processes = {global_batch}; set it to \"auto\"")
    cfg["train_batch_size"] = global_batch
    cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # torch optimizers, also when offloading
    if _get(cfg, "zero_optimization.stage") == 3:
        cfg["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return cfg


CHECKPOINT_KEYS_SAFE = ("tag_validation", "use_node_local_storage", "parallel_write", "checkpoint_serialization")
"""Keys of the DeepSpeed JSON's "checkpoint" section that make DeepSpeed 0.19 read no extra file: tag checks,
which ranks write, how the (replaced) torch checkpoint engine would zip its files."""
_PICKLE_SETTINGS = {
    "checkpoint.load_universal": "DeepSpeed would read the universal checkpoint files (zero/optimizer_state.pt, "
                                 "zero/<parameter>/*.pt) with a pickle loader (weights_only=False): a planted file runs "
                                 "code; remove it (a mhe_scale checkpoint resumes on the world size it was written "
                                 "with)",
    "checkpoint.writer": "it selects DeepSpeed's Fast/Decoupled checkpoint engine, which writes and reads pickles "
                         "and would replace the engine's pickle-free one; remove it",
    "datastates_ckpt": "it selects the DataStates checkpoint engine (pickles); remove it",
}


def check_no_pickle_settings(cfg: dict[str, Any], source: str) -> None:
    """Raise ValueError naming the key if the DeepSpeed config would make DeepSpeed unpickle files on
    resume or replace the engine's pickle-free checkpoint engine (deepspeed_files.py): the "checkpoint"
    section may only hold CHECKPOINT_KEYS_SAFE (and load_universal: false); no "datastates_ckpt"."""
    section = cfg.get("checkpoint", {})
    if not isinstance(section, dict):
        raise ValueError(f"{source}: \"checkpoint\" must be an object, got {section!r}")
    for key, why in _PICKLE_SETTINGS.items():
        value = _get(cfg, key)
        if value is not None and value is not False:
            raise ValueError(f"{source} sets {key}={json.dumps(value)}: {why}")
    unknown = sorted(set(section) - set(CHECKPOINT_KEYS_SAFE) - {"load_universal", "writer"})
    if unknown:
        raise ValueError(f"{source} sets checkpoint.{unknown[0]}, which the engine does not know to be free of "
                         f"pickle loading; remove it (allowed: {', '.join(CHECKPOINT_KEYS_SAFE)})")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def extensions_dir() -> Path:
    """EXTENSIONS_DIR/<key of torch's path as Python sees it>: one venv reached through a symlink and
    through its real path (`python -m ...` vs an entry-point script) compiles into different
    command lines, which would otherwise rebuild the op (30 s - minutes) each time they alternate."""
    key = hashlib.sha256(str(Path(torch.__file__).parent).encode()).hexdigest()[:12]
    return EXTENSIONS_DIR / key


def _prepare_deepspeed_environment() -> None:
    if _env_true("ACCELERATE_USE_CPU"):
        raise RuntimeError("DeepSpeed was asked for but ACCELERATE_USE_CPU is set: accelerate would silently drop "
                           "the DeepSpeed plugin and train with plain DDP. Unset it (CPU is detected anyway)")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if "WORLD_SIZE" not in os.environ:  # one process without a launcher: DeepSpeed would look for mpi4py
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))


def build_accelerator(dist: DistConfig, train: TrainConfig, project_dir: str | Path | None = None):
    """Accelerator for this launch; project_dir (default train.output_dir) holds the tracker files.

    DeepSpeed: plugin from `resolve_deepspeed_config`, gloo on CPU, then checked to be really active
    with the launcher's world size. Without DeepSpeed: DDP (gloo on CPU) when launched with several
    processes. dist.log_with="tensorboard": trackers are started (call accelerator.end_training())."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    precision = resolve_mixed_precision(dist, cuda)
    if dist.log_with not in (None, *TRACKERS):
        raise ValueError(f"dist.log_with={dist.log_with!r} is not supported; choose one of {TRACKERS} or null")
    project_dir = str(project_dir if project_dir is not None else train.output_dir)
    common: dict[str, Any] = dict(mixed_precision=precision, log_with=dist.log_with, project_dir=project_dir,
                                  gradient_accumulation_steps=train.grad_accum_steps)
    if deepspeed_requested(dist):
        _prepare_deepspeed_environment()
        world = int(os.environ["WORLD_SIZE"])
        config = resolve_deepspeed_config(dist, train, precision, world)
        plugin = DeepSpeedPlugin(hf_ds_config=config, gradient_accumulation_steps=train.grad_accum_steps,
                                 gradient_clipping=config["gradient_clipping"], zero3_init_flag=False)
        handlers = [InitProcessGroupKwargs(backend=None if cuda else "gloo", timeout=group_timeout(dist))]
        accelerator = Accelerator(cpu=False, deepspeed_plugin=plugin, kwargs_handlers=handlers, **common)
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise RuntimeError(f"DeepSpeed was asked for but accelerate set up {accelerator.distributed_type}; "
                               "check the launcher's environment (ACCELERATE_USE_CPU must be unset)")
        if accelerator.num_processes != world:
            raise RuntimeError(f"the launcher started WORLD_SIZE={world} processes but accelerate sees "
                               f"{accelerator.num_processes}: the process group was not joined (gloo on CPU?)")
    else:
        # backend None: accelerate's choice (gloo on CPU); "gloo" would break a run without a launcher
        handlers = [InitProcessGroupKwargs(backend=None, timeout=group_timeout(dist))]
        accelerator = Accelerator(cpu=not cuda, kwargs_handlers=handlers, **common)
    apply_process_group_timeout(dist.timeout_s)
    if dist.log_with is not None:
        accelerator.init_trackers(TRACKER_RUN)
    return accelerator


# ---------------------------------------------------------------- collective timeouts
TIMEOUT_WAIT_S = 10.0
"""After a timeout, how long a rank waits for the others to report the same timeout (see explain_timeout)."""
_ANSWERED = "mhe_scale/timeout/answered/{}"
_TIMEOUT_TEXT = re.compile(r"timed out|timeout", re.IGNORECASE)
_LOST_TEXT = re.compile(r"connection (reset|closed) by peer|broken pipe|connection refused", re.IGNORECASE)
RESET_WAIT_S = 3.0
"""After a lost connection, how long a rank waits for the others to report it too (a killed rank never does)."""


class PeerTimeoutError(RuntimeError):
    """A collective waited dist.timeout_s for another rank; the message names the rank(s) that did not answer."""


class PeerLostError(RuntimeError):
    """A collective lost its connection to another rank (killed, crashed); the message names the rank(s)."""


def group_timeout(dist: DistConfig) -> timedelta:
    """dist.timeout_s as the timedelta that torch.distributed takes; ValueError naming the key if not > 0."""
    if not dist.timeout_s > 0:
        raise ValueError(f"dist.timeout_s={dist.timeout_s} must be > 0 (seconds a collective waits for the others)")
    return timedelta(seconds=float(dist.timeout_s))


def apply_process_group_timeout(timeout_s: float) -> None:
    """Make `timeout_s` the timeout of the default process group and of groups created later.

    Passing it to InitProcessGroupKwargs is not enough: accelerate drops a value equal to that class's
    default (600 s), and gloo then gets torch's 30 min (measured); DeepSpeed creates its own groups
    (ZeRO clones the world group) with torch's default timeout. So the default group is set directly
    and torch's default for new groups is replaced."""
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d

    delta = timedelta(seconds=float(timeout_s))
    distributed_c10d.default_pg_timeout = delta  # read by new_group(timeout=None)
    distributed_c10d.default_pg_nccl_timeout = delta
    if tdist.is_available() and tdist.is_initialized():
        distributed_c10d._set_pg_timeout(delta)


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _silent_ranks(rank: int, world: int, wait_s: float) -> list[int]:
    """Record in the rendezvous store that this rank met a collective's failure, wait up to wait_s for every
    other rank to record the same, and return those that never did (raises if the store is unreachable)."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=max(wait_s, 1.0)))
    store.set(_ANSWERED.format(rank), "1")
    waiting = [r for r in range(world) if r != rank]
    deadline = time.monotonic() + wait_s
    while waiting:
        waiting = [r for r in waiting if not store.check([_ANSWERED.format(r)])]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    return waiting


def explain_timeout(exc: BaseException, timeout_s: float, wait_s: float | None = None) -> RuntimeError | None:
    """An error naming the rank(s) at fault if `exc` is a collective's failure, else None:
      * a timeout (gloo: RuntimeError "Timed out waiting ...ms"): PeerTimeoutError naming the rank(s) that
        did not answer;
      * a lost connection (gloo: "Read error ...: Connection reset by peer", "Connection closed by peer",
        a broken pipe): PeerLostError naming the rank(s) that stopped (killed, crashed, out of memory).

    Finds them through the rendezvous store: this rank records that it failed, then waits up to
    wait_s (default min(timeout_s, TIMEOUT_WAIT_S), or RESET_WAIT_S for a lost connection) for every
    other rank to record the same; the ones that never do are the stopped / hung / cut-off ones."""
    import torch.distributed as tdist

    if not isinstance(exc, RuntimeError) or isinstance(exc, (PeerTimeoutError, PeerLostError)):
        return None
    lost = bool(_LOST_TEXT.search(str(exc)))
    if not lost and not _TIMEOUT_TEXT.search(str(exc)):
        return None
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() < 2:
        return None
    rank, world = tdist.get_rank(), tdist.get_world_size()
    if wait_s is None:
        wait_s = min(timeout_s, RESET_WAIT_S if lost else TIMEOUT_WAIT_S)
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    if lost:
        advice = (f"(its connection to rank {rank} was reset in a collective): killed, crashed or out of memory? Look "
                  f"at that process's own log / exit status, then resume from the last checkpoint. Rank {rank}: "
                  f"{first}")
    else:
        advice = (f"within {timeout_s:g} s (dist.timeout_s); check that process / node: stopped, hung, out of memory, "
                  "or cut off from the network? (If one rank legitimately works alone that long, e.g. a long save "
                  f"or evaluation, raise dist.timeout_s.) Rank {rank} timed out in a collective: {first}")
    error = PeerLostError if lost else PeerTimeoutError
    try:
        waiting = _silent_ranks(rank, world, wait_s)
    except Exception as store_exc:  # the store lives with rank 0 / the launcher: unreachable too
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        verb = "stopped" if lost else "did not answer"
        return error(f"another rank {verb} {advice}. The rendezvous store at {where} is unreachable as well "
                     f"({type(store_exc).__name__}): is rank 0 stopped, or its node or the network down?")
    if not waiting:
        if lost:
            return error(f"every rank reported a lost connection, so no rank stopped: the network between them "
                         f"failed, or a process closed its process group early. Rank {rank}: {first}")
        return error(f"every rank reported a timeout, so some rank was busy elsewhere for longer than "
                     f"{timeout_s:g} s (dist.timeout_s): raise it, or look for a rank stuck outside "
                     f"collectives. Rank {rank}: {first}")
    return error(f"{_ranks(waiting)} {'stopped' if lost else 'did not answer'} {advice}")


@contextlib.contextmanager
def named_timeouts(timeout_s: float) -> Iterator[None]:
    """Re-raise a collective's timeout (or lost connection) inside the block as a PeerTimeoutError (PeerLostError)
    naming the silent (stopped) rank(s)."""
    try:
        yield
    except RuntimeError as exc:
        explained = explain_timeout(exc, timeout_s)
        if explained is None:
            raise
        raise explained from exc


# ---------------------------------------------------------------- after prepare
def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage under DeepSpeed, None otherwise."""
    if not is_deepspeed(accelerator):
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage"])


def check_prepared(accelerator, prepared: nn.Module) -> None:
    """Raise unless `prepared` (the output of accelerator.prepare) is a DeepSpeedEngine exactly when
    DeepSpeed is configured; catches a plugin dropped on the way (e.g. by ACCELERATE_USE_CPU)."""
    wants = is_deepspeed(accelerator) or _env_true("ACCELERATE_USE_DEEPSPEED")
    is_engine = type(prepared).__name__ == "DeepSpeedEngine"
    if wants != is_engine:
        raise RuntimeError(f"DeepSpeed {'was' if wants else 'was not'} asked for but accelerator.prepare returned "
                           f"a {type(prepared).__name__}; build the accelerator with build_accelerator(cfg.dist, ...)")


def check_deepspeed_agrees(accelerator, train: TrainConfig) -> None:
    """Raise ValueError if the accelerator's DeepSpeed config was resolved from another train config."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = owned_values(train, "no")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        if config.get(key) not in ("auto", ours[key]):
            raise ValueError(f"train.* asks for {key}={ours[key]} but the accelerator's DeepSpeed config says "
                             f"{config.get(key)}; build the accelerator from this train config (build_accelerator)")


def mark_zero3_leaf(module: nn.Module) -> None:
    """ZeRO-3: gather all of `module`'s parameters when its forward starts (heads read sub-modules'
    weights directly, e.g. `self.linear.weight`, which per-module hooks would leave partitioned)."""
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(module, True)


def input_dtype(accelerator, module: nn.Module) -> torch.dtype | None:
    """Under DeepSpeed with bf16/fp16 the engine casts its module, not the inputs: the dtype floating
    inputs must be cast to (None: leave inputs alone; autocast handles the other paths)."""
    if not is_deepspeed(accelerator):
        return None
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def cast_floating(data: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors in a (nested) batch cast to dtype; everything else untouched."""
    if dtype is None:
        return data
    from accelerate.utils import recursively_apply

    return recursively_apply(lambda t: t.to(dtype) if t.is_floating_point() else t, data)


@contextlib.contextmanager
def full_parameters(accelerator, module: nn.Module) -> Iterator[None]:
    """Under ZeRO-3: every parameter of module gathered whole on every rank within the block (for
    evaluation, whose predict is not a forward the engine hooks); elsewhere a no-op. Collective."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


# ---------------------------------------------------------------- DeepSpeed checkpoints
DEEPSPEED_TAG = "engine"


def deepspeed_state_hooks(engine: Any) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    """(save, load) for an ExtraState: the engine's weights and ZeRO partitions under `<folder>/deepspeed/`
    in DeepSpeed's layout, every process writing its partition (collective). The engine's checkpoint
    engine is replaced by deepspeed_files.SafetensorsCheckpointEngine: no pickle either way."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from mhe_scale.engine.deepspeed_files import SafetensorsCheckpointEngine

    if engine.load_universal_checkpoint():
        raise RuntimeError("DeepSpeed is set up with checkpoint.load_universal=true, which unpickles the universal "
                           "checkpoint files on resume; build the accelerator with build_accelerator(cfg.dist, ...)")
    if not isinstance(engine.checkpoint_engine, (TorchCheckpointEngine, SafetensorsCheckpointEngine)):
        raise RuntimeError(f"DeepSpeed is set up with {type(engine.checkpoint_engine).__name__}; the engine replaces "
                           "only the default torch checkpoint engine: remove checkpoint engine options from the config")
    engine.checkpoint_engine = SafetensorsCheckpointEngine()

    def save(folder: Path) -> None:
        engine.save_checkpoint(str(folder / "deepspeed"), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)

    def load(folder: Path) -> None:
        where = folder / "deepspeed"
        if not (where / DEEPSPEED_TAG).is_dir():
            raise FileNotFoundError(f"{folder} holds no DeepSpeed state ({where}/{DEEPSPEED_TAG}); it was written "
                                    "without DeepSpeed: resume it without DeepSpeed, or start a new run")
        path, _ = engine.load_checkpoint(str(where), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {where}/{DEEPSPEED_TAG}")

    return save, load


class NoState(nn.Module):
    """Stands in for the model in a DeepSpeed checkpoint: `model.safetensors` is empty, the engine's
    own files hold the weights (and their ZeRO partitions)."""


class NoOptimizerState:
    """Optimizer-shaped placeholder with an empty state (see NoState)."""

    def state_dict(self) -> dict[str, Any]:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("state") or state.get("param_groups"):
            raise ValueError("this checkpoint holds a plain optimizer state (written without DeepSpeed); resume it "
                             "without DeepSpeed")


def grad_norm_tensor(value: float | Tensor | None) -> Tensor | None:
    """accelerate returns DeepSpeed's global grad norm as a float: a tensor for the loss log."""
    if value is None or torch.is_tensor(value):
        return value
    return torch.tensor(float(value))
