"""What a face run prints (issue 24 item 4): the head update optim.head_update resolved to, in its first
lines, and a progress bar for the verification pass (it showed nothing for minutes)."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from mhe_scale.config import OptimConfig, load_config
from mhe_scale.data.face_bin import write_face_bin
from mhe_scale.engine.model import describe_head_update
from mhe_scale.heads import create_head
from mhe_scale.parallel.sharded_fc import ShardedPartialFCHead


def _overrides(tmp_path, *extra: str) -> list[str]:
    return ["data.name=face_synthetic", "data.num_train=32", "data.num_classes=10", "data.image_size=16",
            "data.dali=false", "model.name=mobilefacenet", "model.num_features=16", "model.width_mult=0.25",
            "head.name=partial_fc", "head.sample_rate=0.5", "train.batch_size=16", "train.epochs=1",
            "train.log_every=1", "train.resume=false", "train.save_every=0", "train.eval_batch_size=8",
            f"train.output_dir={tmp_path / 'run'}", "optim.name=sgd", "optim.lr=0.1", *extra]


@pytest.mark.parametrize("update,expected", [
    ("auto", "head update: sparse (optim.head_update=auto: a class-sharded sampled head), catch-up closed_form"),
    ("dense", "head update: dense (optim.head_update=dense)")])
def test_a_face_run_says_its_head_update_first_and_shows_verification_progress(tmp_path, capsys, update: str,
                                                                               expected: str) -> None:
    from mhe_scale.tasks.face import run_face

    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8)
    write_face_bin(tmp_path / "pairs.bin", images, torch.arange(12) % 2 == 0)
    cfg = load_config(None, _overrides(tmp_path, "dist.shard_head=true", f"optim.head_update={update}",
                                       f"eval.verification=[{tmp_path / 'pairs.bin'}]"))
    run_face(cfg, Accelerator(cpu=True))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    said = [i for i, line in enumerate(lines) if expected in line]
    plan = [i for i, line in enumerate(lines) if "TrainPlan(" in line]
    assert said and plan and said[0] < plan[0], out  # before training starts
    assert "verify pairs.bin" in err and "/24 [" in err  # a bar over the .bin's 24 images


def test_describe_head_update_says_why() -> None:
    sharded = ShardedPartialFCHead(8, 10, sample_rate=0.5, group=None)
    replicated = create_head("partial_fc", in_features=8, num_classes=10)
    assert describe_head_update(OptimConfig(head_catch_up="replay"), sharded) == \
        "head update: sparse (optim.head_update=auto: a class-sharded sampled head), catch-up replay " \
        "(optim.head_catch_up)"
    assert describe_head_update(OptimConfig(), replicated) == \
        "head update: dense (optim.head_update=auto: the head is replicated (dist.shard_head=false))"
