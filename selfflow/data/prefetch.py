"""Reading ahead: the next micro-batch is read (and pinned) in a background thread while this one trains.

A training job knows the order in which it takes micro-batches (the modality of optimizer step k is a
function of `(seed, k)`, and every micro-batch of a step is of that modality), so while micro-batch i
trains, one thread reads micro-batch i + 1 from its stream: decoding, collation and (on a GPU) copying
into pinned memory leave the step's critical path, and the step's host-to-device copy can be
asynchronous (`non_blocking`). A stream is only ever used by one thread at a time. `positions` counts
the batches handed out, not the one read ahead, so a checkpoint resumes exactly where training was;
a read that fails raises when its micro-batch is taken, at the step that needed it.

    ahead = ReadAhead(streams, order=lambda i: draw_modality(cfg, i // grad_accum), pin=True)
    batch = ahead.take(i)      # micro-batch i; blocks only if it has not been read yet
    ahead.positions()          # {name: batches handed out}
"""

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from selfflow.data.batch import LatentBatch


def pinned(batch: LatentBatch) -> LatentBatch:
    """The batch's tensors in page-locked memory (so copies to the GPU can run asynchronously)."""
    return LatentBatch(*(x.pin_memory() if isinstance(x, torch.Tensor) else x for x in batch))


class ReadAhead:
    """Micro-batches in a known order from per-modality streams, each read one micro-batch early."""

    def __init__(self, streams: dict[str, Iterator], order: Callable[[int], str], pin: bool = False):
        self.streams, self.order, self.pin = streams, order, pin
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="selfflow-read-ahead")
        self.ahead: tuple[int, str, Future] | None = None

    def _read(self, name: str) -> Any:
        batch = next(self.streams[name])
        return pinned(batch) if self.pin else batch

    def take(self, index: int) -> Any:
        """Micro-batch `index` (taken in order: 0, 1, 2, ... from where the streams stand)."""
        if self.ahead is not None and self.ahead[0] != index:
            raise RuntimeError(f"micro-batch {index} asked for, but {self.ahead[0]} was read ahead")
        if self.ahead is None:
            batch = self._read(self.order(index))
        else:
            batch, self.ahead = self.ahead[2].result(), None
        name = self.order(index + 1)
        self.ahead = (index + 1, name, self.pool.submit(self._read, name))
        return batch

    def positions(self) -> dict[str, int]:
        """Batches each stream handed out: its position, less the batch read ahead (waited for)."""
        out = {name: stream.position for name, stream in self.streams.items()}
        if self.ahead is not None:
            _, name, future = self.ahead
            if future.exception() is None:  # a failed read did not move its stream
                out[name] = self.streams[name].position - 1
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
