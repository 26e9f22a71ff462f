"""engine/run_folder.py: which step folder a run path names (newest verified, skipped ones named),
on hand-made step folders with real manifests."""

from pathlib import Path

import pytest

from mhe_scale.engine.checkpoint import checkpoint_name, write_manifest
from mhe_scale.engine.run_folder import find_checkpoint, find_config


def make_steps(checkpoints: Path, steps: list[int]) -> None:
    for step in steps:
        folder = checkpoints / checkpoint_name(step)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"weights %d" % step)
        write_manifest(folder, step, 1)


def test_newest_verified_step_and_what_was_skipped(tmp_path):
    out = tmp_path / "out"
    make_steps(out / "run" / "checkpoints", [3, 12, 9, 10])
    (out / "config.yaml").write_text("task: multigrain\n")
    (out / "run" / "checkpoints" / checkpoint_name(12) / "model.safetensors").write_bytes(b"changed!!!")
    (out / "run" / "checkpoints" / checkpoint_name(10) / "manifest.json").unlink()
    for path in (out, out / "run", out / "run" / "checkpoints"):
        found = find_checkpoint(path)
        assert found.folder.name == "step-00000009", path  # not the oldest (3), not the unverifiable 12 / 10
        assert [(p.name, why.split(" ")[0]) for p, why in found.skipped] == \
            [("step-00000012", "model.safetensors"), ("step-00000010", "no")]
        assert "skipped newer step-00000012: model.safetensors does not match its SHA-256" in found.describe()
    assert find_checkpoint(out / "run" / "checkpoints" / "step-00000003").folder.name == "step-00000003"
    with pytest.raises(ValueError, match="step-00000012: checkpoint is unusable"):
        find_checkpoint(out / "run" / "checkpoints" / "step-00000012")
    assert find_config(found.folder) == out / "config.yaml"


def test_refusals_name_the_path(tmp_path):
    make_steps(tmp_path / "a" / "checkpoints", [1])
    make_steps(tmp_path / "b" / "checkpoints", [2])
    with pytest.raises(ValueError, match=r"holds several runs \(a, b\); name one"):
        find_checkpoint(tmp_path)
    (tmp_path / "b" / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="none of its 1 step folders verifies"):
        find_checkpoint(tmp_path / "b")
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="no step-\\* checkpoint folder"):
        find_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="no config.yaml in or above"):
        find_config(tmp_path / "a")
