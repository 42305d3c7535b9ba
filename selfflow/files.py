"""File operations every layer shares: the sha256 of a file and atomic, durable text writes.

digest = file_sha256("weights/pt_inception-2015-12-05-6726825d.pth")
atomic_write(Path("runs/x/checkpoints/latest"), "step_00000100\n")
"""

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (the hash recorded for weights, checkpoints and their manifests)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to a temporary name, flush it to the disk, then rename over `path`: a reader sees
    the old file or the new one, never a part, and the rename survives a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
