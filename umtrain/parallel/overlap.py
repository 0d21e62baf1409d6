"""Running a memory layer `a:b` while blocks a..b run (spec section 5, asynchronous execution).

The skip bus hands the memory computation to a runner when block a's pre-MLP LayerNorm output is ready and asks for
the result at block b. `start(compute, x, main)` returns the tensor the main path continues with (`main`, block a's
own output, or a stand-in for it) and a handle; `finish(handle)` returns the memory output at block b.
- `SyncRunner` computes at b (no overlap).
- `ThreadRunner` (CPU) computes on a worker thread in both directions: the forward (lookup and its collectives on the
  memory-parallel group) while the main thread runs blocks a..b, and the backward while it runs blocks b..a. The
  memory computation is a separate autograd graph on a detached copy of x; two nodes join it to the main graph (see
  `_LaunchMemoryBackward`, `_JoinMemoryGrad`), since autograd would otherwise run the whole backward on the thread
  that called `backward()`.
- `StreamRunner` (GPU) issues it on a side CUDA stream; autograd replays the backward on the same stream.
All three give the same results: the computation and its inputs are the same. Collectives of other groups (TP, SP)
stay on the main thread; only the memory layer's own groups run inside the runner (the memory-parallel group, and
under sequence parallelism the copy of the TP group that carries the query conv's previous tokens), and at most one
memory layer per model chunk is in flight, since placements do not overlap. The threaded backward runs the memory
parameters' gradient hooks on the worker, so it needs `parallel.overlap_grad_reduce: false` (a hook must not start a DP
collective beside the main thread's); with it on, the thread runner overlaps the forward only. Its backward runs
once per forward: `retain_graph`, `torch.autograd.grad` and `create_graph` through it are not supported.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

from umtrain.config.base import ConfigError

Compute = Callable[[torch.Tensor], torch.Tensor]


class SyncRunner:
    def start(self, compute: Compute, x: torch.Tensor, main: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return main, lambda: compute(x)

    def finish(self, pending: Callable[[], torch.Tensor]) -> torch.Tensor:
        return pending()


@dataclass
class _ThreadedMemory:
    """One memory computation in flight on the worker: its forward, then (once block b's backward ran) its backward."""

    executor: ThreadPoolExecutor
    detached_input: torch.Tensor
    forward: Future
    output: Optional[torch.Tensor] = None
    backward: Optional[Future] = field(default=None)

    def launch_backward(self, grad: torch.Tensor) -> None:
        if self.backward is not None:
            raise RuntimeError("a second backward through a memory layer run by ThreadRunner(backward=True): its "
                               "graph is freed after the first (retain_graph, torch.autograd.grad and create_graph "
                               "are not supported with model.memory.overlap on CPU)")

        def run() -> Optional[torch.Tensor]:
            torch.autograd.backward(self.output, grad)
            return self.detached_input.grad

        self.backward = self.executor.submit(run)

    def input_grad(self) -> Optional[torch.Tensor]:
        """x's gradient from the memory layer (None when no gradient reached its output in this backward)."""
        return self.backward.result() if self.backward is not None else None


class _MemoryJoint(torch.autograd.Function):
    """Passes `through` on unchanged; `other` only ties the node into the main graph. Subclasses say what its
    backward does with the worker's computation."""

    @staticmethod
    def forward(ctx, through: torch.Tensor, other: torch.Tensor, memory: _ThreadedMemory) -> torch.Tensor:
        ctx.memory = memory
        return through.view_as(through)     # a view made in a Function: later in-place ops on it would raise


class _LaunchMemoryBackward(_MemoryJoint):
    """At block b, on (memory output detached from the worker's graph, x): the backward hands the output's gradient
    to the worker and returns at once; x gets no gradient here."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.memory.launch_backward(grad)
        return None, None, None


class _JoinMemoryGrad(_MemoryJoint):
    """At block a, on (main path, x): the backward passes the main path's gradient on, waits for the worker's
    backward and adds the memory layer's gradient of x."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, ctx.memory.input_grad(), None


class ThreadRunner:
    """One worker thread; grad mode (thread-local in PyTorch) follows the caller's. `backward=False`: the forward
    only runs on the worker (the memory graph stays part of the main graph, whose backward runs in line)."""

    def __init__(self, backward: bool = True):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="umtrain-memory")
        self._backward = backward

    def start(self, compute: Compute, x: torch.Tensor, main: torch.Tensor) -> tuple[torch.Tensor, Any]:
        grad_enabled = torch.is_grad_enabled()
        if not (self._backward and grad_enabled and x.requires_grad):
            return main, self._submit(compute, x, grad_enabled)
        detached = x.detach().requires_grad_()
        memory = _ThreadedMemory(self._executor, detached, self._submit(compute, detached, grad_enabled))
        return _JoinMemoryGrad.apply(main, x, memory), (memory, x)

    def finish(self, pending: Any) -> torch.Tensor:
        if isinstance(pending, Future):
            return pending.result()
        memory, x = pending
        memory.output = memory.forward.result()
        return _LaunchMemoryBackward.apply(memory.output.detach(), x, memory)

    def _submit(self, compute: Compute, x: torch.Tensor, grad_enabled: bool) -> Future:
        def run() -> torch.Tensor:
            with torch.set_grad_enabled(grad_enabled):
                return compute(x)

        return self._executor.submit(run)


class StreamRunner:
    """A side CUDA stream that waits for block a's output and is joined before the add at block b."""

    def __init__(self):
        self._stream = torch.cuda.Stream()
        self._accumulators: list = []

    def adopt_parameters(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Make the memory parameters' gradient accumulators (autograd's AccumulateGrad nodes) on the side stream,
        and keep them alive; call before Megatron's DDP wraps the model, which would make them on the default
        stream and keep those, and after any dtype cast of the parameters, which discards them. Autograd runs an accumulator on the stream current when it was made, so one made on
        the default stream makes that stream wait, in the backward, until the side stream has produced the
        parameter's gradient (PyTorch warns: "The AccumulateGrad node's stream does not match ...")."""
        with torch.cuda.stream(self._stream):
            self._accumulators += [p.expand_as(p).grad_fn.next_functions[0][0] for p in params if p.requires_grad]

    def start(self, compute: Compute, x: torch.Tensor, main: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            x.record_stream(self._stream)
            return main, compute(x)

    def finish(self, pending: torch.Tensor) -> torch.Tensor:
        current = torch.cuda.current_stream()
        current.wait_stream(self._stream)
        pending.record_stream(current)
        return pending


def memory_runner(overlap: bool, overlap_grad_reduce: bool = False, overlap_param_gather: bool = False):
    if not overlap:
        return SyncRunner()
    if torch.cuda.is_available():
        return StreamRunner()
    if overlap_param_gather:
        raise ConfigError("model.memory.overlap", "on CPU the memory layer's forward runs on a worker thread, where "
                          "the parameter all-gather hooks of parallel.overlap_param_gather would start collectives "
                          "beside the main thread's: turn one of the two off")
    return ThreadRunner(backward=not overlap_grad_reduce)
