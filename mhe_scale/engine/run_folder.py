"""Which checkpoint a path names, for whatever reads a saved run (eval_retrieval.py, export_onnx.py,
pstar.py, the probe's probe.checkpoint): the one home of "newest verified step folder".

    found = find_checkpoint("runs/mg")       # an output_dir, a run folder, its checkpoints/, or a step folder
    found.folder   -> runs/mg/multigrain-lam0.5-p3/checkpoints/step-00000054   (newest that verifies)
    found.skipped  -> [(step folder, why)]: newer step folders whose manifest did not verify
    find_config(found.folder) -> runs/mg/config.yaml                           (the nearest above)

Layout (engine/loop.py, tasks/report.py): {output_dir}/config.yaml (written when the run finishes),
{output_dir}/<run>/checkpoints/step-XXXXXXXX/{model.safetensors, ..., manifest.json}. A step folder
is used only when every file of its manifest is present with its size and SHA-256
(checkpoint.verify_checkpoint); errors are one line naming the path and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mhe_scale.engine.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint


class NoCheckpointError(FileNotFoundError, ValueError):
    """A path that names no checkpoint (no model.safetensors in it, no step folders under it)."""


@dataclass(frozen=True)
class FoundCheckpoint:
    """A verified step folder and the newer step folders passed over (folder, why not)."""

    folder: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        """One line: which folder, and what was passed over to reach it."""
        text = f"{self.folder} (manifest verified)"
        if self.skipped:
            text += "; skipped newer " + "; ".join(f"{p.name}: {why}" for p, why in self.skipped)
        return text


def newest_verified(checkpoints: Path) -> FoundCheckpoint:
    """The newest step-* folder under `checkpoints` whose manifest verifies; ValueError if none does."""
    skipped: list[tuple[Path, str]] = []
    steps = list_checkpoints(checkpoints)
    for _, folder in steps:
        problem = verify_checkpoint(folder)
        if problem is None:
            return FoundCheckpoint(folder, skipped)
        skipped.append((folder, problem))
    if not steps:
        raise ValueError(f"{checkpoints}: no step-* checkpoint folder (train.save_every > 0 writes them)")
    raise ValueError(f"{checkpoints}: none of its {len(steps)} step folders verifies (newest {skipped[0][0].name}: "
                     f"{skipped[0][1]}); point it at a finished run")


def find_checkpoint(path: str | Path) -> FoundCheckpoint:
    """A step folder, a run folder (<run>/checkpoints/step-*), a checkpoints/ folder, or an output_dir
    holding one run -> its newest verified step folder. A step folder named directly must verify against
    its manifest when it has one (a folder holding only model.safetensors is taken as it is)."""
    path = Path(path)
    if not path.is_dir():
        raise NoCheckpointError(f"{path}: no such folder (give a run folder, an output_dir or a step-* checkpoint "
                                "folder)")
    if (path / "model.safetensors").is_file():
        if not (path / MANIFEST).is_file():  # weights put in a folder by hand: nothing to verify against
            return FoundCheckpoint(path)
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ValueError(f"{path}: checkpoint is unusable (fails verification against its manifest: {problem}); "
                             "name an older step folder or the run folder")
        return FoundCheckpoint(path)
    if (path / "checkpoints").is_dir():
        return newest_verified(path / "checkpoints")
    if list_checkpoints(path):
        return newest_verified(path)
    runs = sorted(p for p in path.iterdir() if (p / "checkpoints").is_dir())
    if len(runs) == 1:
        return find_checkpoint(runs[0])
    if runs:
        raise ValueError(f"{path} holds several runs ({', '.join(p.name for p in runs)}); name one of them")
    raise NoCheckpointError(f"{path}: no model.safetensors there and no run folder with checkpoints/ "
                            "(train.save_every > 0 writes them)")


def find_config(start: str | Path) -> Path:
    """The nearest config.yaml in `start` or above it (the run's resolved config); ValueError if none."""
    start = Path(start)
    for folder in (start, *start.parents):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    raise ValueError(f"no config.yaml in or above {start} (a run writes it when it finishes); "
                     "pass --config with the run's YAML")
