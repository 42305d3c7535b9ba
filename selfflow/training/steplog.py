"""What a run writes about its steps: `metrics.jsonl` (one row per step, rank 0) and the window
means that MLflow gets every `log_every` steps."""

import json
import math
from pathlib import Path

from selfflow.files import atomic_write


def append_jsonl(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (a resumed run writes the later ones again); drop torn lines."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a process killed while writing it
        if isinstance(row, dict) and row.get("step", math.inf) <= step:
            rows.append(line)
    atomic_write(path, "".join(line + "\n" for line in rows))


class LogWindow:
    """What MLflow gets every `log_every` steps: each metric's mean over the steps of the window that
    had it (a modality's loss appears on that modality's steps only; a skipped step's NaN is left out),
    and the last value of the schedules and counters."""

    LAST = ("lr", "skipped")

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            if math.isfinite(value) or key in self.LAST:
                self.values.setdefault(key, []).append(float(value))

    def flush(self) -> dict[str, float]:
        out = {k: v[-1] if k in self.LAST else sum(v) / len(v) for k, v in self.values.items() if v}
        self.values = {}
        return out
