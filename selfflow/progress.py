"""Progress bars that suit where the output goes: tqdm's in-place bar on a terminal; on a pipe or a
log file (a SLURM job's output, CI, `| tee`) whole lines, at most one every `LOG_INTERVAL` seconds,
instead of `\\r` updates that pile up into one unreadable line.

    for step in progress(range(steps), desc="train"):
        ...
"""

import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between progress lines in a log; unknown, chosen as a readable log rate


class _Lines:
    """A stream for tqdm that turns each `\\r` refresh into one line."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(*args: Any, **kwargs: Any) -> tqdm:
    """`tqdm(*args, **kwargs)`, writing lines every LOG_INTERVAL seconds when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs["file"] = _Lines(stream)
        kwargs.setdefault("mininterval", LOG_INTERVAL)
        kwargs.setdefault("maxinterval", LOG_INTERVAL)
    return tqdm(*args, **kwargs)
