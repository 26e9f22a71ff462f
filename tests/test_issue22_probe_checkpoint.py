"""Issue 22 item 1: probe.checkpoint=<run folder> takes the NEWEST step folder that verifies against
its manifest (list_checkpoints is newest first; the probe took the last = oldest entry), warns about
each newer one it skips, refuses a named step folder that fails, and resolves a relative path from the
repository root like the other config paths."""

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mhe_scale.engine.checkpoint import checkpoint_name, write_manifest
from mhe_scale.tasks.probe import load_backbone, resolve_checkpoint


def make_run(root: Path, steps: list[int]) -> Path:
    """root/checkpoints/step-N with a model.safetensors (encoder.w = N) and a manifest each."""
    for step in steps:
        folder = root / "checkpoints" / checkpoint_name(step)
        folder.mkdir(parents=True)
        save_file({"encoder.w": torch.full((3,), float(step))}, str(folder / "model.safetensors"))
        write_manifest(folder, step, 1)
    return root


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def test_run_folder_gives_the_newest_step(tmp_path):
    run = make_run(tmp_path / "run", [45, 54, 50])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped: no warning
        assert resolve_checkpoint(run) == run / "checkpoints" / "step-00000054" / "model.safetensors"
    backbone = torch.nn.Module()
    backbone.register_buffer("w", torch.zeros(3))
    load_backbone(backbone, run)
    assert backbone.w.tolist() == [54.0] * 3


def test_newer_unverified_steps_are_skipped_with_a_warning(tmp_path):
    run = make_run(tmp_path / "run", [45, 50, 54, 60])
    truncate(run / "checkpoints" / "step-00000060" / "model.safetensors")
    (run / "checkpoints" / "step-00000054" / "manifest.json").unlink()  # never finished writing
    with pytest.warns(UserWarning) as record:
        assert resolve_checkpoint(run) == run / "checkpoints" / "step-00000050" / "model.safetensors"
    messages = [str(w.message) for w in record]
    assert len(messages) == 2 and all("\n" not in m for m in messages)
    assert "step-00000060" in messages[0] and "truncated" in messages[0]
    assert "step-00000054" in messages[1] and "no manifest.json" in messages[1]


def test_a_named_step_folder_must_verify(tmp_path):
    run = make_run(tmp_path / "run", [45, 54])
    step = run / "checkpoints" / "step-00000054"
    assert resolve_checkpoint(step) == step / "model.safetensors"
    truncate(step / "model.safetensors")
    with pytest.raises(ValueError, match=r"step-00000054.*fails verification.*truncated"):
        resolve_checkpoint(step)
    truncate(run / "checkpoints" / "step-00000045" / "model.safetensors")
    with pytest.raises(ValueError, match=r"none of its 2 step folders verifies \(newest step-00000054"):
        resolve_checkpoint(run)


def test_relative_path_is_found_from_the_repository_root(tmp_path, monkeypatch):
    make_run(tmp_path / "repo" / "runs" / "kcl", [3, 7])
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr("mhe_scale.tasks.paths.REPO_ROOT", tmp_path / "repo")
    found = resolve_checkpoint("runs/kcl")
    assert found == tmp_path / "repo" / "runs" / "kcl" / "checkpoints" / "step-00000007" / "model.safetensors"


def test_an_unreadable_checkpoint_file_is_named(tmp_path):
    run = make_run(tmp_path / "run", [5])
    file = run / "checkpoints" / "step-00000005" / "model.safetensors"
    truncate(file)
    with pytest.raises(ValueError, match=rf"{file}: not a readable safetensors file"):
        load_backbone(torch.nn.Module(), file)


def test_a_backbone_of_another_width_is_one_line(tmp_path):
    """model.width=16 against a width-8 pre-training run died with torch's RuntimeError, one line per tensor."""
    from mhe_scale.models.image import ImageModelConfig, build_image_model

    narrow = build_image_model(ImageModelConfig(name="resnet18", stem="cifar", width=8))
    file = tmp_path / "model.safetensors"
    save_file({f"encoder.{k}": v.contiguous() for k, v in narrow.state_dict().items()}, str(file))
    wide = build_image_model(ImageModelConfig(name="resnet18", stem="cifar", width=16))
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.safetensors: its 'encoder.\*' weights do not fit model.\* \(size "
                       r"mismatch for conv1.weight: \[8, 3, 3, 3\] in the file, \[16, 3, 3, 3\] in the model \(and "
                       r"\d+ more tensors\)\); use the pre-training run's model section") as info:
        load_backbone(wide, file)
    assert "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())  # nothing half-loaded
    assert set(load_backbone(narrow, file)) == set(narrow.state_dict())
