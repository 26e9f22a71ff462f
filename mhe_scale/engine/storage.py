"""Checkpoints need an output folder that every process sees: check it once at the start.

Only the main process creates checkpoint folders and fsyncs and publishes the files that the
other processes write into them, and every process reads the checkpoint it resumes from, so
`train.output_dir` must be on a filesystem every node shares (NFS, Lustre, GPFS, ...). On
node-local disks the first save used to crash unclearly on the other nodes; `check_shared_folder`
turns that into one error at the start that names the processes and hosts that cannot see it.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from pathlib import Path

import torch


def _can_read(token: Path, nonce: str, tries: int = 3, wait_s: float = 0.2) -> bool:
    for attempt in range(tries):
        try:
            if token.read_text() == nonce:
                return True
        except OSError:
            pass
        if attempt + 1 < tries:
            time.sleep(wait_s)  # network filesystems may show a new file a moment later
    return False


def check_shared_folder(folder: str | Path, accelerator) -> None:
    """Main process writes a token with a random nonce into `folder`; every process must read it back.

    Collective (every process calls it with its own view of the folder); raises RuntimeError on
    every process, naming the ranks and hosts that cannot read the token, when some cannot."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast, gather_object

    folder = Path(folder)
    main = accelerator.is_main_process
    drawn = torch.tensor([secrets.randbits(62) if main else 0], dtype=torch.int64, device=accelerator.device)
    nonce = str(int(broadcast(drawn, from_process=0).item()))
    token = folder / f".shared-folder-check-{nonce}"
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        token.write_text(nonce)
        fd = os.open(token, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    accelerator.wait_for_everyone()
    seen = gather_object([(accelerator.process_index, socket.gethostname(), _can_read(token, nonce))])
    accelerator.wait_for_everyone()
    if main:
        token.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in seen if not ok]
    if blind:
        raise RuntimeError(
            f"{folder} is not one folder shared by all processes: {', '.join(blind)} cannot read the file "
            f"{token.name} that rank 0 on {seen[0][1]} wrote there. Checkpoints are written by every process into "
            "folders that rank 0 creates and publishes: put train.output_dir on a filesystem every node mounts "
            "at the same path (NFS, Lustre, ...), or set train.save_every=0 (no checkpoints)")
