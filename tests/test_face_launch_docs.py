"""The face configs' documented launch commands are ones the engine accepts: every face config trains
a class-sharded head (dist.shard_head), which fit refuses under fp16, so every mixed precision its
comments (and its _base_ files', and the docs') tell the launcher to use must pass the engine's gate."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from mhe_scale.config import DistConfig, load_config
from mhe_scale.engine.accelerator import resolve_mixed_precision
from mhe_scale.engine.loop import _refuse_unsupported

REPO = Path(__file__).resolve().parents[1]
FACE_CONFIGS = sorted((REPO / "configs" / "face").glob("*.yaml"))
PRECISION = re.compile(r"(?:--mixed_precision[ =]|dist\.mixed_precision[ =:]+|mixed_precision:\s*)([a-z0-9|]+)")
DOCS = [REPO / "README.md", REPO / "launch" / "README.md", REPO / "mhe_scale" / "tasks" / "face.py",
        *sorted((REPO / "docs").glob("*.md"))]


def chain(path: Path) -> list[Path]:
    """The config file and the files it includes through _base_."""
    files = [path]
    while (base := re.search(r"^_base_:\s*(\S+)", files[-1].read_text(), re.MULTILINE)) is not None:
        files.append(files[-1].parent / base.group(1))
    return files


def documented(text: str) -> list[str]:
    """Every precision named in a launch command or a mixed_precision setting ("a|b" counts both)."""
    return [p for m in PRECISION.finditer(text) for p in m.group(1).split("|")]


def engine_accepts(precision: str, train) -> None:
    """Raises as build_accelerator (on a GPU) and fit (class-sharded head) would."""
    resolve_mixed_precision(DistConfig(mixed_precision=precision), cuda=True)
    accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, mixed_precision=precision)
    _refuse_unsupported(train, accelerator, sharded=True)


@pytest.mark.parametrize("path", FACE_CONFIGS, ids=lambda p: p.stem)
def test_documented_face_launch_is_accepted(path):
    cfg = load_config(path)
    assert cfg.dist.shard_head
    precisions = [p for f in chain(path) for p in documented(f.read_text())]
    assert precisions, f"{path} documents no launch precision (its base should)"
    for precision in precisions:
        engine_accepts(precision, cfg.train)


def test_docs_never_launch_a_face_config_in_fp16():
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            if "face" in line and "fp16" in documented(line):
                pytest.fail(f"{doc.relative_to(REPO)}: {line.strip()} (face configs shard the head: use bf16)")
    with pytest.raises(NotImplementedError, match="fp16 with a class-sharded head"):  # what fp16 would meet
        engine_accepts("fp16", load_config(FACE_CONFIGS[0]).train)
