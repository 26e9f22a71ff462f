"""DeepSpeed ZeRO-1/2/3 through accelerate on CPU, 2 gloo processes under torchrun: the loss curve
equals a single-process run with the same global batch, DeepSpeed's clipping is the configured one
(not its silent default 1.0), a checkpoint saved at step 3 resumes to the same curve and weights,
bf16 keeps the head's loss fp32, DeepSpeed's files are written and read without pickle, and the
config errors name the key. The first run on a machine JIT-compiles DeepSpeed's shared-memory
op (cached under ~/.cache/mhe_scale/torch_extensions afterwards)."""

import json
import os
import re
from dataclasses import replace
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

from accelerate import Accelerator  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mhe_scale.config import DistConfig, OptimConfig, TrainConfig  # noqa: E402
from mhe_scale.data.synthetic import SyntheticSplit  # noqa: E402
from mhe_scale.engine import Classifier, build_optimizer, fit  # noqa: E402
from mhe_scale.engine.accelerator import build_accelerator, resolve_deepspeed_config  # noqa: E402
from mhe_scale.heads import create_head  # noqa: E402
from mhe_scale.models import MLPEncoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
C, DIM, MICRO, PROCS = 30, 12, 8, 2
BASE = dict(epochs=1.0, batch_size=MICRO, log_every=1, seed=1, output_dir="unused", keep_last=0)
OPTIM = OptimConfig(lr=2e-2, head_lr=5e-2)


def tiny_model(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(MLPEncoder(DIM, hidden=24, num_features=16, depth=1),
                      create_head("mhp", in_features=16, num_classes=C, num_heads=2))


def tiny_data(n: int = MICRO * PROCS * 6) -> SyntheticSplit:
    gen = torch.Generator().manual_seed(0)
    return SyntheticSplit(torch.randn(n, DIM, generator=gen) * 3, torch.randint(0, C, (n,), generator=gen))


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole (gathered from the ZeRO-3 partitions if needed), as fp32."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- child: 2 processes under torchrun
def sharded_config(**kw) -> TrainConfig:
    from test_engine_distributed import SHARDED_CFG

    return TrainConfig(**(SHARDED_CFG | {"batch_size": MICRO, "grad_accum_steps": 1, "clip_grad_norm": None} | kw))


def sharded_child_run(acc, out: str) -> None:
    """A class-sharded fc head (uneven 6 + 5 classes) outside the engine, beside the encoder's engine."""
    import torch.distributed as dist
    from test_engine_distributed import data, sharded_model

    model = sharded_model(dist.group.WORLD)
    optimizer = torch.optim.AdamW(list(model.encoder.parameters()), lr=OPTIM.lr, weight_decay=0.0)
    head_optimizer = torch.optim.AdamW(list(model.head.parameters()), lr=OPTIM.head_lr, weight_decay=0.0)
    fit(model, optimizer, data(), sharded_config(save_every=4, resume=False), acc, out_dir=f"{out}/s",
        head_optimizer=head_optimizer)
    weights = {f"encoder.{k}": v for k, v in full_weights(model.encoder).items()}
    weights |= {f"head.{k}": v.clone() for k, v in model.head.state_dict().items()}
    save_file(weights, f"{out}/s/weights-rank{acc.process_index}.safetensors")


def ds_child(out: str, stage: int, precision: str, clip: float | None, config_file: str | None,
             sharded_too: bool = False) -> None:
    """Run A: 6 steps saving at 3 and 6. Run B: a differently initialised model resumes A's step 3.
    sharded_too: then a run with a class-sharded head outside the engine (sharded_child_run)."""
    torch.set_num_threads(1)
    cfg = TrainConfig(**BASE, save_every=3, clip_grad_norm=clip, resume=False)
    dist = DistConfig(zero_stage=None if config_file else stage, deepspeed_config=config_file,
                      mixed_precision=precision)
    acc = build_accelerator(dist, cfg, project_dir=out)
    loss_dtypes: set[torch.dtype] = set()
    for run, seed in (("a", 0), ("b", 7)):
        model = tiny_model(seed)
        model.head.register_forward_hook(lambda m, args, output: loss_dtypes.add(output.loss.dtype))
        if run == "b" and acc.is_main_process:
            shutil.copytree(f"{out}/a/checkpoints/step-00000003", f"{out}/b/checkpoints/step-00000003")
        acc.wait_for_everyone()
        result = fit(model, build_optimizer(OPTIM, model), tiny_data(), replace(cfg, resume=run == "b"), acc,
                     out_dir=f"{out}/{run}")
        assert result.resumed_from == (3 if run == "b" else None), result
        weights = full_weights(model)
        if acc.is_main_process:
            save_file(weights, f"{out}/weights-{run}.safetensors")
    assert loss_dtypes == {torch.float32}, loss_dtypes
    if sharded_too:
        sharded_child_run(acc, out)
    if acc.is_main_process:
        engine_param = next(model.encoder.parameters())
        Path(f"{out}/facts.json").write_text(json.dumps({"dtype": str(engine_param.dtype),
                                                         "processes": acc.num_processes}))
    acc.end_training()


def launch(tmp: Path, stage: int, precision: str = "no", clip: float | None = None,
           config_file: str | None = None, sharded_too: bool = False) -> None:
    script = tmp / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      "from test_engine_deepspeed import ds_child\n"
                      f"ds_child({str(tmp)!r}, {stage}, {precision!r}, {clip!r}, {config_file!r}, {sharded_too})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}  # ACCELERATE_USE_CPU drops DS
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCS),
                           "--master_port", str(29600 + (os.getpid() + stage) % 900), str(script)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, global batch 16, no DeepSpeed: the loss curves to match (clip off / 0.5), with a
    huge clip to log the unclipped gradient norms."""
    acc = Accelerator(cpu=True)
    out = tmp_path_factory.mktemp("reference")
    curves = {}
    for name, clip in (("plain", None), ("clip", 0.5), ("norms", 1e9)):
        model = tiny_model()
        cfg = TrainConfig(**(BASE | {"batch_size": MICRO * PROCS}), clip_grad_norm=clip, resume=False)
        fit(model, build_optimizer(OPTIM, model), tiny_data(), cfg, acc, out_dir=out / name)
        curves[name] = read_log(out / name / "loss_log.jsonl")
        curves[name + "_weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert max(r["grad_norm"] for r in curves["norms"]) > 2.0  # DeepSpeed's silent clip at 1.0 would show
    from test_engine_distributed import data, reference_model

    model = reference_model()  # the full fc head that the sharded runs must reproduce
    fit(model, build_optimizer(OPTIM, model), data(), sharded_config(batch_size=MICRO * PROCS, resume=False), acc,
        out_dir=out / "fc")
    curves["fc"] = read_log(out / "fc" / "loss_log.jsonl")
    curves["fc_weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return curves


def check_sharded_run(tmp: Path, reference: dict) -> None:
    log = read_log(tmp / "s" / "loss_log.jsonl")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log]),
                               torch.tensor([r["loss"] for r in reference["fc"]]), rtol=2e-5, atol=2e-6)
    shards = [load_file(str(tmp / "s" / f"weights-rank{r}.safetensors")) for r in range(PROCS)]
    for name, value in reference["fc_weights"].items():
        got = torch.cat([s[name] for s in shards]) if name.startswith("head.") else shards[0][name]
        torch.testing.assert_close(got, value, rtol=2e-4, atol=2e-5, msg=name)
    files = json.loads((tmp / "s" / "checkpoints" / "step-00000004" / "manifest.json").read_text())["files"]
    assert {"head-shard-0-of-2.safetensors", "head-shard-1-of-2.safetensors"} <= set(files)


def check_run(tmp: Path, ref_log: list[dict], ref_weights: dict, rtol: float, atol: float) -> None:
    log_a, log_b = read_log(tmp / "a" / "loss_log.jsonl"), read_log(tmp / "b" / "loss_log.jsonl")
    assert [r["step"] for r in log_a] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log_a]), torch.tensor([r["loss"] for r in ref_log]),
                               rtol=rtol, atol=atol)
    assert [r["lr"] for r in log_a] == [r["lr"] for r in ref_log]
    assert log_b == log_a[3:]  # resumed from step 3: the same losses, bit for bit
    weights_a, weights_b = load_file(str(tmp / "weights-a.safetensors")), load_file(str(tmp / "weights-b.safetensors"))
    for name, ref in ref_weights.items():
        torch.testing.assert_close(weights_a[name], ref.float(), rtol=rtol * 10, atol=atol * 10, msg=name)
        assert torch.equal(weights_a[name], weights_b[name]), name
    files = json.loads((tmp / "a" / "checkpoints" / "step-00000003" / "manifest.json").read_text())["files"]
    assert any(f.startswith("deepspeed/engine/") for f in files)  # the partitions are covered by the manifest
    with open(next((tmp / "a" / "checkpoints" / "step-00000003" / "deepspeed" / "engine").glob("*optim_states.pt")),
              "rb") as f:
        assert f.read(1) != b"\x80"  # not a pickle: a safetensors header length


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_single_process_and_resumes_exactly(tmp_path, reference, stage):
    if stage == 3:  # the shipped JSON with its "auto" fields, partitioning even tiny parameters
        spec = json.loads((REPO / "launch" / "deepspeed" / "zero3.json").read_text())
        spec["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        config = tmp_path / "zero3.json"
        config.write_text(json.dumps(spec))
        launch(tmp_path, 3, config_file=str(config), sharded_too=True)
    else:
        launch(tmp_path, stage, clip=0.5 if stage == 2 else None, sharded_too=stage == 1)
    name = "clip" if stage == 2 else "plain"
    check_run(tmp_path, reference[name], reference[name + "_weights"], rtol=2e-5, atol=2e-6)
    if stage in (1, 3):
        check_sharded_run(tmp_path, reference)
    assert json.loads((tmp_path / "facts.json").read_text()) == {"dtype": "torch.float32", "processes": 2}


def test_bf16_zero2_trains_close_to_fp32_with_fp32_head_loss(tmp_path, reference):
    launch(tmp_path, 2, precision="bf16", config_file=str(REPO / "launch" / "deepspeed" / "zero2.json"))
    log = read_log(tmp_path / "a" / "loss_log.jsonl")
    torch.testing.assert_close(torch.tensor([r["loss"] for r in log]),
                               torch.tensor([r["loss"] for r in reference["plain"]]), rtol=3e-2, atol=3e-2)
    assert read_log(tmp_path / "b" / "loss_log.jsonl") == log[3:]
    assert json.loads((tmp_path / "facts.json").read_text())["dtype"] == "torch.bfloat16"


# ---------------------------------------------------------------- planted pickles never run
class Planted:
    """Unpickling this runs code: it appends a line to `marker` (what a tampered checkpoint file could do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'a').write('unpickled\\n')",)


def plant(step_dir: Path, marker: str, replace_real: bool) -> list[str]:
    """Write Planted pickles where DeepSpeed 0.19 might read one under <step>/deepspeed/engine (universal
    checkpoint layout, expert / layer / ZeRO-3 / bf16 file names, and, with replace_real, DeepSpeed's own
    files of this checkpoint), then rewrite the manifest so that it still verifies. Returns the paths."""
    from mhe_scale.engine.checkpoint import write_manifest

    engine = step_dir / "deepspeed" / "engine"
    targets = [engine / "zero" / "optimizer_state.pt", engine / "expert_0_mp_rank_00_model_states.pt",
               engine / "layer_0_expert_0_mp_rank_00_model_states.pt",
               engine / "zero_pp_rank_0_mp_rank_00_model_states.pt",
               engine / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", step_dir / "deepspeed" / "latest.pt"]
    model = tiny_model()  # the engine prepares the Classifier itself: encoder.*, head.*
    names = [f"encoder.{n}" for n, _ in model.encoder.named_parameters()]
    names += [f"head.{n}" for n, _ in model.head.named_parameters()]
    targets += [engine / "zero" / name / f"{kind}.pt" for name in names for kind in ("fp32", "exp_avg", "exp_avg_sq",
                                                                                     "step")]
    if replace_real:
        targets = sorted(engine.glob("*.pt")) + [engine / "mp_rank_01_model_states.pt"]
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(Planted(marker), path)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    write_manifest(step_dir, manifest["step"], manifest["world_size"])
    return [str(p.relative_to(step_dir)) for p in targets]


def planted_child(out: str, phase: str) -> None:
    """phase "plant": run a (4 steps, saves at 2 and 4); b resumes a's step 2 with pickles planted beside
    DeepSpeed's files, c with DeepSpeed's files replaced by pickles. phase "universal": the same resume as b
    under a DeepSpeed JSON with checkpoint.load_universal=true. One process, ZeRO-2."""
    torch.set_num_threads(1)
    marker = f"{out}/marker"
    config = Path(out) / "universal.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}))
    dist = DistConfig(deepspeed_config=str(config)) if phase == "universal" else DistConfig(zero_stage=2)
    cfg = TrainConfig(**BASE, save_every=2, clip_grad_norm=None, resume=False)
    try:
        acc = build_accelerator(dist, cfg, project_dir=out)
    except ValueError as exc:
        Path(f"{out}/refused-{phase}.txt").write_text(str(exc))
        return

    def run(name: str, resume: bool):
        model = tiny_model(0)
        return fit(model, build_optimizer(OPTIM, model), tiny_data(MICRO * 4), replace(cfg, resume=resume), acc,
                   out_dir=f"{out}/{name}")

    if phase == "universal":
        run("u", True)
        return
    run("a", False)
    for name, replace_real in (("b", False), ("c", True), ("u", False)):
        step = Path(f"{out}/{name}/checkpoints/step-00000002")
        shutil.copytree(f"{out}/a/checkpoints/step-00000002", step)
        Path(f"{out}/planted-{name}.json").write_text(json.dumps(plant(step, marker, replace_real)))
    result = run("b", True)
    Path(f"{out}/resumed-b.json").write_text(json.dumps(result.resumed_from))
    try:
        run("c", True)
    except Exception as exc:  # noqa: BLE001 - the message is what the test checks
        Path(f"{out}/refused-c.txt").write_text(f"{type(exc).__name__}: {exc}")


def launch_one(tmp: Path, phase: str) -> subprocess.CompletedProcess:
    script = tmp / f"{phase}.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      "from test_engine_deepspeed import planted_child\n"
                      f"planted_child({str(tmp)!r}, {phase!r})\n")
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in launcher}
    env |= {"OMP_NUM_THREADS": "1", "MASTER_PORT": str(29600 + (os.getpid() + len(phase)) % 900)}
    return subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_planted_pickles_in_a_deepspeed_checkpoint_never_run(tmp_path):
    probe = tmp_path / "probe.pt"
    torch.save(Planted(str(tmp_path / "probe-ran")), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").is_file()  # the planted file does run code when unpickled
    for phase in ("plant", "universal"):
        proc = launch_one(tmp_path, phase)
        assert not (tmp_path / "marker").exists(), f"{phase}: a planted pickle ran\n" + proc.stderr[-3000:]
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "zero/optimizer_state.pt" in " ".join(json.loads((tmp_path / "planted-b.json").read_text()))
    assert json.loads((tmp_path / "resumed-b.json").read_text()) == 2  # pickles beside: resumed, never read
    assert read_log(tmp_path / "b" / "loss_log.jsonl") == read_log(tmp_path / "a" / "loss_log.jsonl")[2:]
    refused = (tmp_path / "refused-c.txt").read_text()  # pickles instead of DeepSpeed's files: refused
    assert "is not a safetensors file written by mhe_scale's DeepSpeed checkpoint engine" in refused, refused
    assert "refusing to unpickle it" in refused and "\n" not in refused
    universal = (tmp_path / "refused-universal.txt").read_text()
    assert "sets checkpoint.load_universal=true" in universal and "\n" not in universal, universal


def test_settings_that_load_pickles_are_refused_naming_the_key(tmp_path):
    train = TrainConfig(batch_size=8, output_dir="unused")
    for extra, key in (({"checkpoint": {"load_universal": True}}, "checkpoint.load_universal=true"),
                       ({"checkpoint": {"writer": {"type": "fast"}}}, "checkpoint.writer="),
                       ({"checkpoint": {"writer": {}}}, "checkpoint.writer={}"),
                       ({"datastates_ckpt": {}}, "datastates_ckpt={}"),
                       ({"checkpoint": {"reader": 1}}, "checkpoint.reader")):
        path = tmp_path / "ds.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}} | extra))
        with pytest.raises(ValueError, match=re.escape(key)):
            resolve_deepspeed_config(DistConfig(deepspeed_config=str(path)), train, "no")
    safe = {"tag_validation": "Fail", "use_node_local_storage": True, "parallel_write": {"pipeline_stage": False},
            "load_universal": False, "checkpoint_serialization": True}
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "checkpoint": safe}))
    assert resolve_deepspeed_config(DistConfig(deepspeed_config=str(path)), train, "no")["checkpoint"] == safe

    class UniversalEngine:  # built without build_accelerator: the hooks refuse it too
        def load_universal_checkpoint(self) -> bool:
            return True

    from mhe_scale.engine.accelerator import deepspeed_state_hooks

    with pytest.raises(RuntimeError, match="checkpoint.load_universal=true"):
        deepspeed_state_hooks(UniversalEngine())


# ---------------------------------------------------------------- config resolution (no processes)
def test_auto_fields_are_filled_from_our_config_and_conflicts_name_the_key(tmp_path):
    train = TrainConfig(batch_size=8, grad_accum_steps=2, clip_grad_norm=None, output_dir="unused")
    cfg = resolve_deepspeed_config(DistConfig(deepspeed_config=str(REPO / "launch/deepspeed/zero2.json")), train,
                                   "bf16", world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 8 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["train_batch_size"] == 64 and cfg["zero_force_ds_cpu_optimizer"] is False
    generated = resolve_deepspeed_config(DistConfig(zero_stage=3), train, "no")
    assert generated["gradient_clipping"] == 0.0  # written even though nothing asked: DeepSpeed's default is 1.0
    assert generated["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4.*train.grad_accum_steps=2"):
        resolve_deepspeed_config(DistConfig(deepspeed_config=str(bad)), train, "no")
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="'optimizer' section"):
        resolve_deepspeed_config(DistConfig(deepspeed_config=str(bad)), train, "no")
    with pytest.raises(ValueError, match="dist.zero_stage=4"):
        resolve_deepspeed_config(DistConfig(zero_stage=4), train, "no")


def test_accelerate_use_cpu_is_refused_for_deepspeed(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        build_accelerator(DistConfig(zero_stage=2), TrainConfig(output_dir="unused"))


def test_deepspeed_files_round_trip_and_refuse_unknown_classes(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from mhe_scale.engine.deepspeed_files import load_object, save_object

    flat = torch.arange(10.0)
    state = {"module": {"w": flat[:4].view(2, 2), "b": flat[4:]}, 0: {"step": torch.tensor(3.0)},
             "betas": (0.9, 0.99), "shape": torch.Size([2, 2]), "stage": ZeroStageEnum.gradients,
             "scaler": DynamicLossScaler(init_scale=2.0 ** 8, scale_window=10, min_scale=1.0, delayed_shift=2,
                                           consecutive_hysteresis=False), "where": fragment_address(4, 2),
             "inf": float("inf"), "none": None, "dtype": torch.bfloat16}
    save_object(state, str(tmp_path / "x.pt"))
    back = load_object(str(tmp_path / "x.pt"))
    assert list(back) == list(state) and back["betas"] == (0.9, 0.99) and back["shape"] == torch.Size([2, 2])
    assert torch.equal(back["module"]["w"], flat[:4].view(2, 2)) and back[0]["step"].item() == 3.0
    assert back["stage"] is ZeroStageEnum.gradients and back["where"] == fragment_address(4, 2)
    assert type(back["scaler"]) is DynamicLossScaler and back["scaler"].cur_scale == 2.0 ** 8
    with pytest.raises(TypeError, match="state.p: cannot store a PosixPath"):
        save_object({"p": tmp_path}, str(tmp_path / "y.pt"))
    torch.save({"x": 1}, tmp_path / "pickled.pt")
    with pytest.raises(Exception, match="header|format|safetensors|deserializ"):
        load_object(str(tmp_path / "pickled.pt"))
    tampered = tmp_path / "tampered.pt"
    save_file({}, str(tampered), metadata={"format": "mhe_scale.deepspeed_state.v1",
                                            "json": json.dumps({"__object__": "Popen", "fields": {"__map__": []}})})
    with pytest.raises(ValueError, match="refusing to rebuild 'Popen'"):
        load_object(str(tampered))
