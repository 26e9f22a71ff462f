"""engine/host_memory.py: freed host memory goes back to the OS at a phase boundary (glibc's malloc_trim)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mhe_scale.engine.host_memory import release_freed_memory


def _rss() -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc (Linux)")
def test_freed_small_tensors_leave_the_resident_set_after_release() -> None:
    """4,000 tensors of 32 KiB (below glibc's mmap threshold: heap blocks), a small tensor allocated after them
    pins the heap's top, then all 4,000 are freed: glibc keeps their ~125 MiB resident (the situation after a
    training step) until release_freed_memory() returns them."""
    if not release_freed_memory():
        pytest.skip("not glibc: nothing to release")
    blocks = [torch.ones(8192) for _ in range(4000)]  # 32 KiB each, touched
    pin = torch.ones(16)
    del blocks
    before = _rss()
    assert release_freed_memory()
    after = _rss()
    assert before - after > 100 * 2**20, (before, after)
    assert pin.sum() == 16
