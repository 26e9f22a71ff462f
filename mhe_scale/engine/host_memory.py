"""Give the host memory that freed tensors leave behind back to the OS between the phases of a run.

glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB as large blocks are freed) in
its heaps, so after a training step the process keeps its peak resident although no tensor holds it; the
next phase (a verification pass: other block sizes) then allocates on top of it. Measured on a face run
(MobileFaceNet 112 px, batch 64, 1 thread): 2.1 GiB resident after training with 9 MiB of live tensors,
and the verification pass's peak stacked on it (docs/face.md, memory). `release_freed_memory` runs
glibc's malloc_trim(0) at a phase boundary: the resident set drops to what is live (0.33 GiB there).
The planner's numbers (mhe_scale/plan/memory.py) are per phase, so this is what makes them the run's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def release_freed_memory() -> bool:
    """malloc_trim(0): return the heaps' free pages to the OS -> True if glibc did it (False elsewhere)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
