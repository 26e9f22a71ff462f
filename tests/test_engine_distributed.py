"""Multi-process training through the engine on CPU (gloo, 2 processes):
  * the demo under `accelerate launch --multi_gpu --num_processes 2` reproduces the loss curve of one
    process with the same global batch, evaluates across ranks (one result for the whole test set),
    runs the periodic evaluation and writes TensorBoard event files;
  * `evaluate` with 2 processes equals the single-process evaluation of the same weights exactly
    (uneven split, batch size not dividing it);
  * a class-sharded fc head beside a DDP encoder (head outside DDP, own optimizer and schedule,
    accumulation 2, global-norm clipping) equals one process training the full head, in losses and
    final weights, and a run killed after its step-3 checkpoint resumes to the same curve and weights;
  * under bf16 autocast the head computes fp32 logits (its loss equals the fp32 head on the same features).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file

from mhe_scale.config import DistConfig, OptimConfig, TrainConfig
from mhe_scale.data.xc_format import read_predictions
from mhe_scale.data.synthetic import SyntheticSplit
from mhe_scale.engine import Classifier, build_optimizer, fit
from mhe_scale.tasks.xmc_evaluate import evaluate
from mhe_scale.engine.accelerator import TRACKER_RUN, build_accelerator
from mhe_scale.heads import create_head
from mhe_scale.models import MLPEncoder
from mhe_scale.parallel.testing import finish_ranks

REPO = Path(__file__).resolve().parents[1]
C, DIM, FEAT, MICRO, ACCUM, PROCS = 11, 12, 16, 4, 2, 2
STEPS = 8
SHARDED_CFG = dict(epochs=1.0, batch_size=MICRO, grad_accum_steps=ACCUM, log_every=1, seed=1, keep_last=0,
                   schedule="cosine", warmup_steps=2, clip_grad_norm=1.0, output_dir="unused")
OPTIM = OptimConfig(lr=2e-2, head_lr=5e-2)


def port(offset: int) -> str:
    return str(29100 + (os.getpid() * 7 + offset) % 800)


def run(cmd: list[str], env_extra: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env | env_extra, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def close(a: list[float], b: list[float], rtol: float, atol: float) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the demo through accelerate launch
DEMO = ["configs/demo/mhp_synthetic.yaml", "data.num_classes=200", "data.num_train=2048", "data.num_test=301",
        "model.hidden=64", "model.num_features=32", "train.epochs=1", "eval.baseline=null", "train.eval_every=16",
        "train.eval_batch_size=64", "train.log_every=8", "train.threads=1"]


def test_demo_on_two_processes_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "mhe_scale.train", *DEMO, "train.batch_size=64", f"train.output_dir={one}"], {})
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port(1),
         "-m", "mhe_scale.train", *DEMO, "train.batch_size=32", "dist.log_with=tensorboard",
         f"train.output_dir={two}"], {"ACCELERATE_USE_CPU": "1"})
    log1, log2 = read_log(one / "mhp" / "loss_log.jsonl"), read_log(two / "mhp" / "loss_log.jsonl")
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, 33))
    assert [r["lr"] for r in log2] == [r["lr"] for r in log1]
    close([r["loss"] for r in log2], [r["loss"] for r in log1], rtol=1e-4, atol=1e-5)
    assert log1[-1]["loss"] < log1[0]["loss"] - 0.5  # it learns
    evals1, evals2 = read_log(one / "mhp" / "eval_log.jsonl"), read_log(two / "mhp" / "eval_log.jsonl")
    assert [e["step"] for e in evals2] == [e["step"] for e in evals1] == [16, 32]
    res1 = json.loads((one / "results.json").read_text())["mhp"]["metrics"]
    res2 = json.loads((two / "results.json").read_text())["mhp"]["metrics"]
    assert res2 == pytest.approx(res1, abs=2 / 301)  # same weights up to fp noise: at most a tie flips
    assert res2 == pytest.approx({k: v for k, v in evals2[-1].items() if k != "step"}, abs=1e-12)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((two / TRACKER_RUN).rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event files"
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"mhp/train/loss", "mhp/train/lr", "mhp/train/samples_per_s", "mhp/eval/P@1", "mhp/eval/nDCG@5"} <= tags


def test_demo_with_a_class_sharded_head_matches_one_process(tmp_path):
    """dist.shard_head=true through the task wiring: the fc head split over 2 processes (kept out of
    DDP, its own optimizer) trains the same curve as one process holding the whole shard."""
    one, two = tmp_path / "one", tmp_path / "two"
    sharded = [*DEMO, "head.name=fc", "head.num_heads=null", "dist.shard_head=true", "train.eval_every=32"]
    run([sys.executable, "-m", "mhe_scale.train", *sharded, "train.batch_size=64", f"train.output_dir={one}"], {})
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port(2),
         "-m", "mhe_scale.train", *sharded, "train.batch_size=32", f"train.output_dir={two}"],
        {"ACCELERATE_USE_CPU": "1"})
    log1, log2 = read_log(one / "fc" / "loss_log.jsonl"), read_log(two / "fc" / "loss_log.jsonl")
    assert [r["step"] for r in log2] == [r["step"] for r in log1] == list(range(1, 33))
    close([r["loss"] for r in log2], [r["loss"] for r in log1], rtol=1e-4, atol=1e-5)
    assert log1[-1]["loss"] < log1[0]["loss"] - 0.5  # it learns
    res1 = json.loads((one / "results.json").read_text())["fc"]
    res2 = json.loads((two / "results.json").read_text())["fc"]
    assert res2["metrics"] == pytest.approx(res1["metrics"], abs=2 / 301)
    # each rank holds half of the 200 classes: the reported head size is the local shard's
    assert res2["costs"]["head params (M)"] == pytest.approx(res1["costs"]["head params (M)"] / 2)


# ---------------------------------------------------------------- children under torchrun
def sharded_model(group):
    """Encoder + class-sharded fc head holding the rows of the single-process reference's head."""
    from mhe_scale.parallel import ShardedFullyConnectedHead

    reference = reference_model()
    head = ShardedFullyConnectedHead(FEAT, C, group=group)
    head.load_single_process_state_(reference.head.state_dict())
    return Classifier(reference.encoder, head)


def reference_model() -> Classifier:
    torch.manual_seed(0)
    encoder = MLPEncoder(DIM, hidden=24, num_features=FEAT, depth=1)
    return Classifier(encoder, create_head("fc", in_features=FEAT, num_classes=C))


def data(n: int = MICRO * ACCUM * PROCS * STEPS, seed: int = 0) -> SyntheticSplit:
    gen = torch.Generator().manual_seed(seed)
    return SyntheticSplit(torch.randn(n, DIM, generator=gen) * 2, torch.randint(0, C, (n,), generator=gen))


def sharded_run(acc, out: str, resume: bool, kill_at: int | None = None) -> None:
    import torch.distributed as dist

    model = sharded_model(dist.group.WORLD)
    optimizer = torch.optim.AdamW([{"params": list(model.encoder.parameters()), "lr": OPTIM.lr}], lr=OPTIM.lr,
                                  weight_decay=0.0)
    head_optimizer = torch.optim.AdamW([{"params": list(model.head.parameters()), "lr": OPTIM.head_lr}],
                                       lr=OPTIM.lr, weight_decay=0.0)

    def stop(step: int) -> None:
        if step == kill_at:
            os._exit(3)  # like a crash: no cleanup, no further checkpoint

    cfg = TrainConfig(**SHARDED_CFG, save_every=3, resume=resume)
    fit(model, optimizer, data(), cfg, acc, out_dir=out, head_optimizer=head_optimizer, step_callback=stop)
    weights = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    weights |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    save_file(weights, f"{out}/weights-rank{acc.process_index}.safetensors")


def child_train_then_crash(out: str) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    sharded_run(acc, f"{out}/a", resume=False)
    sharded_run(acc, f"{out}/b", resume=False, kill_at=5)


def child_resume_and_evaluate(out: str) -> None:
    torch.set_num_threads(1)
    acc = build_accelerator(DistConfig(), TrainConfig(output_dir=out))
    assert group_timeouts() == {"default": 600.0, "new": 600.0}  # dist.timeout_s, not gloo's silent 30 min
    sharded_run(acc, f"{out}/b", resume=True)
    # evaluation across ranks == one process on the whole set, same weights (101 rows, batch 8)
    torch.manual_seed(3)
    model = Classifier(MLPEncoder(DIM, hidden=24, num_features=FEAT, depth=1),
                       create_head("mhp", in_features=FEAT, num_classes=C, num_heads=2))
    test = data(101, seed=5)
    split = evaluate(model, test, [1, 3], 8, accelerator=acc, predictions_to=f"{out}/predictions.txt", prediction_k=4)
    whole = evaluate(model, test, [1, 3], 1000)
    assert split == pytest.approx(whole, abs=1e-12), (split, whole)
    # a sharded head's predict is collective: every rank must run the same number of batches
    import torch.distributed as dist

    sharded = sharded_model(dist.group.WORLD)
    metrics = evaluate(sharded, test, [1, 3], 8, accelerator=acc)
    Path(f"{out}/sharded-eval-{acc.process_index}.json").write_text(json.dumps(metrics))
    finish_ranks()


def torchrun(tmp: Path, child: str, ok: bool = True) -> subprocess.CompletedProcess:
    script = tmp / f"{child}.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      f"from test_engine_distributed import {child}; {child}({str(tmp)!r})\n")
    return run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCS), "--master_port",
                port(len(child)), str(script)], {"ACCELERATE_USE_CPU": "1"}, ok=ok)


def test_sharded_head_beside_ddp_equals_one_process_and_resumes_after_a_kill(tmp_path):
    ref_dir = tmp_path / "reference"
    model = reference_model()
    cfg = TrainConfig(**(SHARDED_CFG | {"batch_size": MICRO * PROCS}), resume=False)
    fit(model, build_optimizer(OPTIM, model), data(), cfg, Accelerator(cpu=True), out_dir=ref_dir)
    ref_log = read_log(ref_dir / "loss_log.jsonl")
    assert max(r["grad_norm"] for r in ref_log) > 1.0  # clipping is active: the global norm matters

    crashed = torchrun(tmp_path, "child_train_then_crash", ok=False)
    assert crashed.returncode != 0 and (tmp_path / "a" / "weights-rank1.safetensors").is_file(), crashed.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-00000003"]
    manifest = json.loads((tmp_path / "b" / "checkpoints" / "step-00000003" / "manifest.json").read_text())
    assert {"head-shard-0-of-2.safetensors", "head-shard-1-of-2.safetensors"} <= set(manifest["files"])
    torchrun(tmp_path, "child_resume_and_evaluate")

    log_a, log_b = read_log(tmp_path / "a" / "loss_log.jsonl"), read_log(tmp_path / "b" / "loss_log.jsonl")
    assert [r["step"] for r in log_a] == list(range(1, STEPS + 1))
    close([r["loss"] for r in log_a], [r["loss"] for r in ref_log], rtol=1e-5, atol=1e-6)
    close([r["grad_norm"] for r in log_a], [r["grad_norm"] for r in ref_log], rtol=1e-5, atol=1e-6)
    assert [r["lr"] for r in log_a] == [r["lr"] for r in ref_log]
    assert log_b == log_a  # the killed run's first 3 steps + the resumed 5, bit for bit
    shards_a = [load_file(str(tmp_path / "a" / f"weights-rank{r}.safetensors")) for r in range(PROCS)]
    shards_b = [load_file(str(tmp_path / "b" / f"weights-rank{r}.safetensors")) for r in range(PROCS)]
    assert shards_a[0]["head.weight"].shape[0] == 6 and shards_a[1]["head.weight"].shape[0] == 5  # uneven 6 + 5
    for a, b in zip(shards_a, shards_b):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = model.state_dict()
    for name in ("head.weight", "head.bias"):
        torch.testing.assert_close(torch.cat([s[name] for s in shards_a]), final[name], rtol=1e-5, atol=1e-6)
    for name, value in final.items():
        if name.startswith("encoder."):
            for shard in shards_a:
                torch.testing.assert_close(shard[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # the ranks' predictions, joined into one file in test-set order, are the single process's
    torch.manual_seed(3)
    model = Classifier(MLPEncoder(DIM, hidden=24, num_features=FEAT, depth=1),
                       create_head("mhp", in_features=FEAT, num_classes=C, num_heads=2))
    evaluate(model, data(101, seed=5), [1, 3], 1000, predictions_to=tmp_path / "one.txt", prediction_k=4)
    joined, one = read_predictions(tmp_path / "predictions.txt"), read_predictions(tmp_path / "one.txt")
    assert joined[0].shape == (101, 4) and torch.equal(joined[0], one[0])
    torch.testing.assert_close(joined[1], one[1], rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob("predictions.txt.part*"))
    sharded_evals = [json.loads((tmp_path / f"sharded-eval-{r}.json").read_text()) for r in range(PROCS)]
    assert sharded_evals[0] == sharded_evals[1]  # one answer for the whole set, on every rank
    assert sharded_evals[0] == pytest.approx(evaluate(reference_model(), data(101, seed=5), [1, 3], 1000), abs=1e-6)


# ---------------------------------------------------------------- a stopped rank: named, within dist.timeout_s
TIMEOUT_S = 4.0


def group_timeouts() -> dict[str, float]:
    """Timeouts (s) of the default gloo group and of a group created afterwards (as DeepSpeed's are)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    groups = {"default": distributed_c10d._get_default_group(), "new": dist.new_group(list(range(PROCS)))}
    return {k: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for k, g in groups.items()}


def child_stopped_peer(out: str) -> None:
    """mhe_scale.train.main with a task that all-reduces twice; rank 1 SIGSTOPs itself in between."""
    import signal
    import time

    import torch.distributed as dist

    import dataclasses

    from mhe_scale.tasks import registry
    from mhe_scale.train import main

    def task(cfg, accelerator) -> None:
        rank = accelerator.process_index
        Path(f"{out}/timeouts-{rank}.json").write_text(json.dumps(group_timeouts()))
        x = torch.ones(3)
        dist.all_reduce(x)
        if rank == 1:
            Path(f"{out}/stopped").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGSTOP)
        dist.all_reduce(x)

    registry._TASKS["synthetic"] = dataclasses.replace(registry.get_task("synthetic"), run=task)
    code = main(["configs/demo/mhp_synthetic.yaml", f"train.output_dir={out}", f"dist.timeout_s={TIMEOUT_S}"])
    Path(f"{out}/exited-{dist.get_rank() if dist.is_initialized() else 0}").write_text(str(time.time()))
    sys.exit(code)


def launch_child_ranks(tmp_path: Path, child: str, master_port: str) -> list[subprocess.Popen]:
    """PROCS processes (RANK 0..PROCS-1, env rendezvous on master_port) each running this module's `child`(tmp_path)."""
    script = tmp_path / "child.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r})\n"
                      f"from test_engine_distributed import {child}; {child}({str(tmp_path)!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env |= {"OMP_NUM_THREADS": "1", "WORLD_SIZE": str(PROCS), "LOCAL_WORLD_SIZE": str(PROCS),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master_port}
    return [subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(PROCS)]


def test_a_stopped_rank_is_named_within_the_timeout(tmp_path):
    import time

    procs = launch_child_ranks(tmp_path, "child_stopped_peer", port(9))
    try:
        _, err = procs[0].communicate(timeout=240)
        ended = time.time()
    finally:
        procs[1].kill()
        procs[1].wait()
    stopped = float((tmp_path / "stopped").read_text())
    assert procs[0].returncode == 3, err[-3000:]
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert line.startswith(f"error: rank 1 did not answer within {TIMEOUT_S:g} s (dist.timeout_s)"), line
    assert "check that process / node" in line
    assert ended - stopped < TIMEOUT_S + 10.0 + 10.0  # timeout + waiting for the others' reports + exit
    assert json.loads((tmp_path / "timeouts-0.json").read_text()) == {"default": TIMEOUT_S, "new": TIMEOUT_S}


# ---------------------------------------------------------------- a killed rank: named, not gloo's raw reset
def child_killed_peer(out: str) -> None:
    """mhe_scale.train.main with a task that all-reduces twice; rank 1 SIGKILLs itself in between."""
    import dataclasses
    import signal
    import time

    import torch.distributed as dist

    from mhe_scale.tasks import registry
    from mhe_scale.train import main

    def task(cfg, accelerator) -> None:
        x = torch.ones(3)
        dist.all_reduce(x)
        if accelerator.process_index == 1:
            Path(f"{out}/killed").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(x)

    registry._TASKS["synthetic"] = dataclasses.replace(registry.get_task("synthetic"), run=task)
    sys.exit(main(["configs/demo/mhp_synthetic.yaml", f"train.output_dir={out}", "dist.timeout_s=60"]))


def test_a_killed_rank_is_named_instead_of_a_raw_connection_reset(tmp_path):
    """The survivor printed gloo's 'Read error ...: Connection reset by peer' traceback; now one line naming
    rank 1, long before dist.timeout_s (60 s)."""
    import time

    procs = launch_child_ranks(tmp_path, "child_killed_peer", port(11))
    try:
        _, err = procs[0].communicate(timeout=120)
        ended = time.time()
    finally:
        procs[1].kill()
        procs[1].wait()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 3, err[-3000:]
    errors = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert errors[0].startswith("error: rank 1 stopped (its connection to rank 0 was reset in a collective): killed, "
                                "crashed or out of memory?"), errors[0]
    assert ended - float((tmp_path / "killed").read_text()) < 30.0  # RESET_WAIT_S (3 s) + exit, not the 60 s timeout


# ---------------------------------------------------------------- bf16: fp32 logits in the head
@pytest.fixture
def fresh_accelerate_state():
    """A bf16 Accelerator cannot follow an fp32 one in the same process; reset around the test."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_keeps_the_head_in_fp32(tmp_path, fresh_accelerate_state):
    acc = build_accelerator(DistConfig(mixed_precision="bf16"), TrainConfig(output_dir=str(tmp_path)))
    assert acc.mixed_precision == "bf16"
    for head in ("fc", "mhp"):
        torch.manual_seed(0)
        kwargs = {"num_heads": 2} if head == "mhp" else {}
        model = Classifier(MLPEncoder(DIM, hidden=24, num_features=FEAT, depth=1),
                           create_head(head, in_features=FEAT, num_classes=C, **kwargs))
        x, y = data(32).inputs, data(32).targets
        prepared = acc.prepare(model)
        loss, _ = prepared(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = model.encoder.forward_features(x)
            inside = model.head(features, y).loss
        assert features.dtype == torch.bfloat16 and loss.dtype == torch.float32
        assert torch.equal(loss, model.head(features.float(), y).loss)  # the head's math ran in fp32
        assert torch.equal(inside, loss)  # also when the head is called inside autocast (heads/base.py)
    result = fit(model, build_optimizer(OPTIM, model), data(64), TrainConfig(epochs=1.0, batch_size=16, log_every=1,
                                                                            output_dir=str(tmp_path)), acc)
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.last_loss))
