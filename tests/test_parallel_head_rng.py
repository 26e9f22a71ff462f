"""A sampling head's own generator goes into the checkpoint (mhe_scale.parallel.head_rng
save_head_rng / load_head_rng), so a resumed run keeps drawing where it stopped:
  * unit: the state written after some draws is restored exactly (the next draws equal the
    uninterrupted head's), for sharded MHS (batch_union, per_sample) and sharded Partial FC;
    per_sample (one stream shared by all ranks) crosses a world-size change through rank 0's
    file; a per-rank stream on another world size, and a checkpoint without head-rng files,
    restart from the seed with a warning;
  * end to end: 2 gloo processes `fit` an encoder + sharded MHS head (batch_union draws every
    step); a run stopped after its step-3 checkpoint and resumed equals the uninterrupted run in
    per-step losses and final weights, bit for bit.
"""

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mhe_scale.heads.mhs import sample_groups_per_row
from mhe_scale.parallel import ShardedFullyConnectedHead
from mhe_scale.parallel.head_rng import load_head_rng, save_head_rng
from mhe_scale.parallel.shard import ShardPlan
from mhe_scale.parallel.sharded_fc import ShardedPartialFCHead
from mhe_scale.parallel.sharded_heads import block_seed
from mhe_scale.parallel.sharded_mhs import ShardedMultiHeadSamplingHead
from mhe_scale.parallel.testing import run_in_processes

C, SIZES, D, SEED = 64, [16, 4], 8, 7
CPU = torch.device("cpu")
LOGGER = "mhe_scale.parallel.head_rng"


def mhs(mode: str, group=None) -> ShardedMultiHeadSamplingHead:
    return ShardedMultiHeadSamplingHead(D, C, sizes=SIZES, mode=mode, num_sampled_groups=8, group=group,
                                        sample_seed=SEED)


def partial_fc() -> ShardedPartialFCHead:
    return ShardedPartialFCHead(D, C, sample_rate=0.25, sample_seed=SEED)


def labels(seed: int) -> torch.Tensor:
    return torch.randint(0, C, (6,), generator=torch.Generator().manual_seed(seed))


def draw(head) -> torch.Tensor:
    """One training-time draw of the head's own sampler (what forward would use)."""
    if isinstance(head, ShardedPartialFCHead):
        return head.kept_classes(labels(1))
    if head.mode == "batch_union":
        return head.kept_groups(labels(1))
    group = head.codec.encode(labels(1))[:, 0]
    return sample_groups_per_row(group, head.num_valid_groups, head.num_sampled_groups, head._generator(CPU))


def as_rank(head, rank: int, world: int):
    """The head as rank `rank` of `world` for the generator's purposes (its seed, the file names)."""
    head.plan = ShardPlan.for_rank(head.plan.num_items, rank, world)
    return head


def fresh_stream(head, n: int = 5) -> torch.Tensor:
    """n uniform numbers from a generator seeded as `_generator` seeds this head's."""
    seed = SEED if head.mode == "per_sample" else block_seed(SEED, head.plan.rank)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def test_save_then_load_continues_the_stream_exactly(tmp_path):
    for i, build in enumerate([lambda: mhs("batch_union"), lambda: mhs("per_sample"), partial_fc]):
        folder = tmp_path / str(i)
        head = build()
        for _ in range(3):
            draw(head)
        path = save_head_rng(folder, head)
        assert path is not None and path.name == "head-rng-rank0-of-1.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            assert f.get_tensor("state").dtype == torch.uint8
        assert meta["sample_seed"] == str(SEED) and (meta["rank"], meta["world"]) == ("0", "1")
        expected = [draw(head) for _ in range(3)]  # the uninterrupted head's next draws

        resumed, fresh = build(), build()
        assert load_head_rng(folder, resumed) is True
        got = [draw(resumed) for _ in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (i, got, expected)
        from_seed = [draw(fresh) for _ in range(3)]  # what a resume without the file would draw
        assert not all(torch.equal(a, b) for a, b in zip(from_seed, expected)), i
        assert torch.equal(resumed.generator.get_state(), head.generator.get_state())


def test_a_head_that_never_drew_saves_its_seeded_state_and_one_that_does_not_sample_saves_nothing(tmp_path):
    head = mhs("batch_union")
    assert head.generator is None
    save_head_rng(tmp_path, head)
    resumed = mhs("batch_union")
    assert load_head_rng(tmp_path, resumed)
    assert torch.equal(draw(resumed), draw(mhs("batch_union")))
    fc = ShardedFullyConnectedHead(D, C)
    assert save_head_rng(tmp_path / "fc", fc) is None and not (tmp_path / "fc").exists()
    assert load_head_rng(tmp_path, fc) is False


def test_per_sample_stream_crosses_a_world_size_change_through_rank_0(tmp_path, caplog):
    saved = [as_rank(mhs("per_sample"), r, 2) for r in range(2)]
    for head in saved:  # the same stream on every rank: each rank makes the same draws
        for _ in range(2):
            torch.rand(3, generator=head._generator(CPU))
        save_head_rng(tmp_path, head)
    expected = torch.rand(5, generator=saved[0].generator)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for rank in range(3):
            head = as_rank(mhs("per_sample"), rank, 3)
            assert load_head_rng(tmp_path, head) is True
            assert torch.equal(torch.rand(5, generator=head.generator), expected)
    assert not caplog.records


def test_per_rank_stream_on_another_world_size_restarts_from_the_seed_with_a_warning(tmp_path, caplog):
    for r in range(2):
        head = as_rank(mhs("batch_union"), r, 2)
        torch.rand(4, generator=head._generator(CPU))
        save_head_rng(tmp_path, head)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for rank in range(3):
            head = as_rank(mhs("batch_union"), rank, 3)
            assert load_head_rng(tmp_path, head) is False
            assert torch.equal(torch.rand(5, generator=head.generator), fresh_stream(head))
    assert len(caplog.records) == 1  # one warning (rank 0), not one per rank
    assert "sampling restarts from the seed" in caplog.text and "world size changed (2 -> 3)" in caplog.text


def test_a_checkpoint_without_head_rng_files_loads_with_a_warning(tmp_path, caplog):
    head = mhs("batch_union")
    torch.rand(4, generator=head._generator(CPU))  # a used generator: loading must reset it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_head_rng(tmp_path, head) is False
    assert "holds no head-rng-rank*-of-*.safetensors" in caplog.text and "restarts from the seed" in caplog.text
    assert torch.equal(torch.rand(5, generator=head.generator), fresh_stream(head))


def test_another_sample_seed_restarts_from_the_new_seed(tmp_path, caplog):
    save_head_rng(tmp_path, mhs("batch_union"))
    head = ShardedMultiHeadSamplingHead(D, C, sizes=SIZES, mode="batch_union", sample_seed=SEED + 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_head_rng(tmp_path, head) is False
    assert "sample_seed=7" in caplog.text and "sample_seed=8" in caplog.text
    assert torch.equal(torch.rand(3, generator=head.generator),
                       torch.rand(3, generator=torch.Generator().manual_seed(block_seed(SEED + 1, 0))))


# ---------------------------------------------------------------- 2 processes: fit, stop, resume
STEPS, STOP, MICRO, DIM = 6, 3, 4, 10


class Stop(Exception):
    pass


def train(group, out: Path, resume: bool, stop_at: int | None) -> dict[str, torch.Tensor]:
    """fit an encoder + sharded MHS head (batch_union) to STEPS, checkpointing every STOP steps;
    raises Stop right after step stop_at (after its checkpoint). Returns this rank's final weights."""
    from accelerate import Accelerator

    from mhe_scale.config import TrainConfig
    from mhe_scale.data.synthetic import SyntheticSplit
    from mhe_scale.engine import Classifier, fit
    from mhe_scale.models import MLPEncoder

    torch.manual_seed(0)
    model = Classifier(MLPEncoder(DIM, hidden=12, num_features=D, depth=1), mhs("batch_union", group))
    optimizer = torch.optim.AdamW(model.encoder.parameters(), lr=2e-2)
    head_optimizer = torch.optim.AdamW(model.head.parameters(), lr=5e-2)
    gen = torch.Generator().manual_seed(0)
    n = MICRO * 2 * STEPS
    data = SyntheticSplit(torch.randn(n, DIM, generator=gen), torch.randint(0, C, (n,), generator=gen))
    cfg = TrainConfig(epochs=1.0, batch_size=MICRO, log_every=1, seed=1, save_every=STOP, keep_last=0,
                      resume=resume, output_dir=str(out))

    def stop(step: int) -> None:
        if step == stop_at:
            raise Stop

    try:
        fit(model, optimizer, data, cfg, Accelerator(cpu=True), head_optimizer=head_optimizer, step_callback=stop)
    except Stop:
        pass
    return {f"encoder.{k}": v.clone() for k, v in model.encoder.state_dict().items()} | \
        {f"head.{k}": v.clone() for k, v in model.head.state_dict().items()}


def stop_and_resume(group, root: str) -> dict[str, dict[str, torch.Tensor]]:
    import torch.distributed as dist

    rank = dist.get_rank()
    # what `accelerate launch` / torchrun would export; the gloo group already exists, accelerate reuses it
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    root_path = Path(root)
    whole = train(group, root_path / "a", resume=False, stop_at=None)
    train(group, root_path / "b", resume=False, stop_at=STOP)
    resumed = train(group, root_path / "b", resume=True, stop_at=None)
    return {"whole": whole, "resumed": resumed}


def test_stopped_and_resumed_sampling_run_equals_the_uninterrupted_one(tmp_path):
    results = run_in_processes(stop_and_resume, 2, str(tmp_path), timeout_s=240)
    log_a = [json.loads(line) for line in (tmp_path / "a" / "loss_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(line) for line in (tmp_path / "b" / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_a] == list(range(1, STEPS + 1))
    assert log_b == log_a  # the stopped run's 3 steps + the resumed 3, bit for bit
    for rank, result in enumerate(results):
        whole, resumed = result["whole"], result["resumed"]
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (rank, name)
    manifest = json.loads((tmp_path / "b" / "checkpoints" / f"step-{STOP:08d}" / "manifest.json").read_text())
    assert {"head-rng-rank0-of-2.safetensors", "head-rng-rank1-of-2.safetensors"} <= set(manifest["files"])
