"""Which step folder of a finished run a tool or a later stage reads (the probe's backbone, the
ONNX export): the NEWEST `checkpoints/step-*` folder whose manifest verifies (engine/checkpoint.py),
newer ones that fail named with why; a step folder named directly must verify.
"""

from __future__ import annotations

from pathlib import Path

from mhe_scale.engine.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint


def newest_verified_step(root: str | Path, needs: str = "model.safetensors") -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest step folder under root that verifies and holds `needs`, or None; [(newer folder, why
    skipped)], newest first)."""
    skipped: list[tuple[Path, str]] = []
    for _, step in list_checkpoints(root):
        problem = verify_checkpoint(step)
        if problem is None and not (step / needs).is_file():
            problem = f"no {needs}"
        if problem is None:
            return step, skipped
        skipped.append((step, problem))
    return None, skipped


def check_step_folder(folder: str | Path, key: str) -> Path:
    """folder itself when it has no manifest or its manifest verifies; ValueError naming `key` otherwise."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise ValueError(f"{key}={str(folder)!r} fails verification against its manifest: {problem}; "
                             "name the run folder (its newest verified step is taken) or another step")
    return folder


def run_step_folder(path: str | Path, key: str) -> tuple[Path, list[tuple[Path, str]]]:
    """The step folder a run folder (its `checkpoints/`, or a folder of step-* itself) stands for, and the
    newer folders skipped; ValueError / FileNotFoundError naming `key` when there is none."""
    path = Path(path)
    for root in (path / "checkpoints", path):
        step, skipped = newest_verified_step(root)
        if step is not None:
            return step, skipped
        if skipped:
            raise ValueError(f"{key}={str(path)!r}: none of its {len(skipped)} step folders verifies (newest "
                             f"{skipped[0][0].name}: {skipped[0][1]}); point it at a finished run")
    raise FileNotFoundError(f"{key}={str(path)!r}: no model.safetensors there, in it, or in its checkpoints/step-* "
                            "folders; point it at a training run's folder")
