import importlib.util
import os
import tarfile
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests use tiny tensors: one thread avoids OpenMP waits that make them many times slower on a
# loaded 2-core machine
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Subprocesses (torchrun, accelerate launch, python -c) must import THIS checkout: the cached venv
# (scripts/install.sh) is shared by every checkout on the machine, and its editable install points
# at whichever one ran install.sh last.
_inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *_inherited])


@pytest.fixture
def shared_data() -> Path:
    """../shared/data beside the repo; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    return SHARED_DATA


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def coco_mini(tmp_path_factory) -> Path:
    """../shared/data/coco-mini/coco-mini.tar extracted once per session (annotations/, train2017/,
    val2017/); skips when absent. Read-only for tests: write outputs elsewhere."""
    tar = SHARED_DATA / "coco-mini" / "coco-mini.tar"
    if not tar.is_file():
        pytest.skip(f"{tar} not present")
    root = tmp_path_factory.mktemp("coco-mini")
    with tarfile.open(tar) as f:
        f.extractall(root, filter="data")
    return root
