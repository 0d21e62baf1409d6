"""Running a memory layer `a:b` while blocks a..b run (spec section 5, asynchronous execution).

The skip bus hands the memory computation to a runner when block a's pre-MLP LayerNorm output is ready and asks for
the result at block b. `SyncRunner` computes at b (no overlap). `ThreadRunner` (CPU) computes the forward on a
worker thread, so the lookup and its collectives on the memory-parallel group proceed while the main thread runs
blocks a..b (the CPU backward runs on the thread that calls backward, so it is not overlapped);
`StreamRunner` (GPU) issues it on a side CUDA stream; autograd then replays the backward on the same stream, which
overlaps it with blocks b..a. All three give identical results: the computation and its inputs are the same.
Collectives of other groups (TP, SP) stay on the main thread; only the memory-parallel group's are issued here,
and at most one memory layer per model chunk is in flight, since placements do not overlap.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

Compute = Callable[[torch.Tensor], torch.Tensor]


class SyncRunner:
    def start(self, compute: Compute, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: compute(x)

    def finish(self, pending: Callable[[], torch.Tensor]) -> torch.Tensor:
        return pending()


class ThreadRunner:
    """One worker thread; grad mode (thread-local in PyTorch) follows the caller's."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umtrain-memory")

    def start(self, compute: Compute, x: torch.Tensor) -> Future:
        grad_enabled = torch.is_grad_enabled()

        def run() -> torch.Tensor:
            with torch.set_grad_enabled(grad_enabled):
                return compute(x)

        return self._executor.submit(run)

    def finish(self, pending: Future) -> torch.Tensor:
        return pending.result()


class StreamRunner:
    """A side CUDA stream that waits for block a's output and is joined before the add at block b."""

    def __init__(self):
        self._stream = torch.cuda.Stream()

    def start(self, compute: Compute, x: torch.Tensor) -> torch.Tensor:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            x.record_stream(self._stream)
            return compute(x)

    def finish(self, pending: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream()
        current.wait_stream(self._stream)
        pending.record_stream(current)
        return pending


def memory_runner(overlap: bool):
    if not overlap:
        return SyncRunner()
    return StreamRunner() if torch.cuda.is_available() else ThreadRunner()
