"""Hostile inputs for the fault tests: pickles that run code when unpickled, and flipped bits."""

from pathlib import Path

import torch


class WritesMarker:
    """Unpickling this calls `Path.touch(marker)`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_evil_pickle(path: Path, marker: Path, payload: dict) -> None:
    """A torch.save file whose unpickling creates `marker` (the payload's tensors beside it)."""
    torch.save({**payload, "note": WritesMarker(marker)}, path)
    assert not marker.exists()


def flip_bit(path: Path, offset: int | None = None) -> None:
    """Flip one bit of a file (in its middle by default): silent corruption, size unchanged."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))
