"""The one wrapper through which memory sharding talks to other ranks; it counts the bytes it moves.

Every collective of `umtrain.parallel.memory_sharding` is an all-to-all of uneven sizes along dim 0
(`torch.distributed.all_to_all_single`, which gloo and NCCL both implement). `Communicator` counts, per rank
and per tag, the payload bytes that leave this rank for another rank and the bytes that arrive from another
rank; a rank's copy to itself is not traffic. The cost model (`umtrain.parallel.cost_model`) predicts the same
counters, tag by tag, so tests can compare them exactly. Tags of backward passes end in `.grad`.

`run_local_group` starts a local process group (spawned processes, 127.0.0.1) for tests, benchmarks and
`umtrain calibrate-comm`.
"""

from __future__ import annotations

import datetime
import faulthandler
import math
import os
import socket
import tempfile
import traceback
import warnings
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

GRAD_SUFFIX = ".grad"
_JOIN_POLL_S = 1.0


class Communicator:
    """All-to-all over a process group (None: one rank, no process group needed), with byte counters."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.size = dist.get_world_size(group) if group is not None else 1
        self.bytes_sent: Counter[str] = Counter()
        self.bytes_received: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def reset_counters(self) -> None:
        self.bytes_sent.clear()
        self.bytes_received.clear()
        self.calls.clear()

    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                   tag: str) -> torch.Tensor:
        """Rows [sum(send_splits), ...] of x go, split by destination rank; returns [sum(recv_splits), ...]."""
        if len(send_splits) != self.size or len(recv_splits) != self.size:
            raise ValueError(f"{tag}: split lists need {self.size} entries, got {len(send_splits)} and "
                             f"{len(recv_splits)}")
        if sum(send_splits) != x.shape[0]:
            raise ValueError(f"{tag}: send splits sum to {sum(send_splits)} but the tensor has {x.shape[0]} rows")
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self._count(tag, send_splits, recv_splits, row_bytes)
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        if self.size == 1:
            out.copy_(x)
            return out
        dist.all_to_all_single(out, x.contiguous(), list(recv_splits), list(send_splits), group=self.group)
        return out

    def exchange_counts(self, counts: torch.Tensor, tag: str = "meta") -> torch.Tensor:
        """counts [P, c] int64, row j meant for rank j -> [P, c], row i from rank i (reading it on the host is the
        sync an uneven all-to-all needs on GPU)."""
        ones = [1] * self.size
        return self.all_to_all(counts, ones, ones, tag)

    def _count(self, tag: str, send_splits: Sequence[int], recv_splits: Sequence[int], row_bytes: int) -> None:
        self.calls[tag] += 1
        self.bytes_sent[tag] += row_bytes * (sum(send_splits) - send_splits[self.rank])
        self.bytes_received[tag] += row_bytes * (sum(recv_splits) - recv_splits[self.rank])


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Communicator, send_splits: list[int], recv_splits: list[int], tag: str):
        ctx.comm, ctx.send_splits, ctx.recv_splits, ctx.tag = comm, send_splits, recv_splits, tag
        return comm.all_to_all(x, send_splits, recv_splits, tag)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = ctx.comm.all_to_all(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.tag + GRAD_SUFFIX)
        return back, None, None, None, None


def all_to_all(comm: Communicator, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
               tag: str) -> torch.Tensor:
    """Differentiable all-to-all: the backward sends the gradient along the reverse path (tag + '.grad')."""
    if not x.requires_grad:
        return comm.all_to_all(x, send_splits, recv_splits, tag)
    return _AllToAll.apply(x, comm, list(send_splits), list(recv_splits), tag)


def _read_report(path: str) -> str:
    return open(path).read() if os.path.exists(path) else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_worker(rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, out_dir: str) -> None:
    """One rank. A native abort (a gloo error raised on one of its threads) leaves every thread's Python stack in
    the rank's report; on success the ranks meet at a barrier before teardown, so that no rank closes its
    connections while a peer is still reading the last collective from them."""
    os.environ["LOCAL_RANK"] = str(rank)   # every rank is local: `local_device_index()` gives rank r GPU r
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as err:
        faulthandler.enable(file=err, all_threads=True)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        timeout = datetime.timedelta(seconds=120)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        try:
            result = fn(rank, world_size, *args)
            path = os.path.join(out_dir, f"rank{rank}.pt")
            torch.save(result, path + ".partial")
            os.replace(path + ".partial", path)
            dist.barrier()
        except BaseException:
            err.write(traceback.format_exc())
            err.flush()   # before teardown, which may abort
            raise
        finally:
            dist.destroy_process_group()
            faulthandler.disable()


def _spawn_detail(err: Exception, reports: list[str]) -> str:
    """What the ranks' own reports cannot say: a process that exited or was killed (exit code, signal), or one
    that failed before it could write its report (its traceback is in the spawn's error)."""
    from torch.multiprocessing.spawn import ProcessExitedException

    if isinstance(err, ProcessExitedException) or not reports:
        return f" ({err})"
    return ""


def _start_and_join(worker_args: tuple, world_size: int) -> None:
    """mp.spawn, but no rank outlives this call: the ranks are not daemons (they may start workers of their own),
    so a rank left running by an exception here (a test's timeout, a Ctrl-C) would keep its parent from exiting.
    The join polls, so that such an exception can come in while the ranks run."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_local_worker, args=worker_args, nprocs=world_size, join=False,
                                 start_method="spawn")
    try:
        while not context.join(timeout=_JOIN_POLL_S):
            pass
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def run_local_group(fn: Callable, world_size: int, *args: Any, backend: str = "gloo") -> list:
    """Run fn(rank, world_size, *args) on world_size spawned processes of one local process group.

    fn must be importable (a module-level function); returns each rank's result, in rank order. Rank r is local
    rank r (`LOCAL_RANK`), on GPU r under NCCL. When a rank fails, the error names every failed rank with its
    traceback (not only the first to exit). A process that dies after every rank has saved its result (gloo can
    abort in teardown) is reported as a warning, not an error. No rank outlives the call, whatever ends it (a
    test's timeout included).
    """
    from torch.multiprocessing.spawn import ProcessException

    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise RuntimeError(f"a {world_size}-process NCCL group needs a GPU per process, this machine has "
                           f"{torch.cuda.device_count()} (NCCL refuses two ranks on one GPU)")
    with tempfile.TemporaryDirectory() as out_dir:
        results = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        # The parent serves the ranks' rendezvous store on a port the OS picks and holds for the whole run: a port
        # merely found free could be taken by another process before rank 0 bound it.
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        try:
            _start_and_join((world_size, store.port, backend, fn, args, out_dir), world_size)
        except ProcessException as err:
            reports = [f"--- rank {r} ---\n" + report for r in range(world_size)
                       if (report := _read_report(os.path.join(out_dir, f"rank{r}.err")))]
            failure = f"{fn.__name__} failed on a {world_size}-process group{_spawn_detail(err, reports)}:\n" + \
                "\n".join(reports)
            if not all(os.path.exists(path) for path in results):
                raise RuntimeError(failure) from err
            warnings.warn(f"every rank returned its result, then a process died in teardown ({err}); {failure}")
        return [torch.load(path, weights_only=False) for path in results]
