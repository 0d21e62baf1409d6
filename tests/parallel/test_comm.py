"""The local process-group runner: results in rank order, and a failed rank's report (a Python exception's
traceback, or the stack of a native abort) in the error raised to the test."""

from __future__ import annotations

import _thread
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from umtrain.parallel.comm import Communicator, run_local_group


def _exchange_ranks(rank: int, world: int) -> tuple[list[int], str]:
    comm = Communicator(dist.group.WORLD)
    received = comm.all_to_all(torch.full((world, 1), rank), [1] * world, [1] * world, "test")
    return received.flatten().tolist(), os.environ["LOCAL_RANK"]


def _rank_one_raises(rank: int, world: int) -> None:
    if rank == 1:
        raise ValueError("rank one's own error")


def _rank_one_aborts(rank: int, world: int) -> None:
    if rank == 1:
        os.abort()


@pytest.mark.slow
def test_results_come_back_in_rank_order_and_each_rank_is_its_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")     # the caller's own (a torchrun worker's) is not the ranks'
    assert run_local_group(_exchange_ranks, 2) == [([0, 1], "0"), ([0, 1], "1")]


def test_an_nccl_group_larger_than_the_gpu_count_is_refused_before_any_process_starts():
    world = torch.cuda.device_count() + 1
    with pytest.raises(RuntimeError, match=f"{world}-process NCCL group needs a GPU per process"):
        run_local_group(_rank_one_raises, world, backend="nccl")


@pytest.mark.slow
def test_a_raising_rank_is_named_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)2-process group.*--- rank 1 ---.*ValueError: rank one's own error"):
        run_local_group(_rank_one_raises, 2)


@pytest.mark.slow
def test_a_native_abort_leaves_the_python_stack():
    with pytest.raises(RuntimeError, match=r"(?s)--- rank 1 ---.*Fatal Python error: Aborted.*_rank_one_aborts"):
        run_local_group(_rank_one_aborts, 2)


def _exits_without_a_word(rank: int, world: int) -> None:
    os._exit(3)


def test_a_process_that_exits_without_a_report_is_named_with_its_exit_code():
    with pytest.raises(RuntimeError, match=r"failed on a 1-process group \(process 0 terminated with exit code 3\)"):
        run_local_group(_exits_without_a_word, 1)


def _rank_one_aborts_after_returning(rank: int, world: int) -> int:
    if rank == 1:
        import atexit
        atexit.register(os.abort)
    return rank


@pytest.mark.slow
def test_an_abort_after_every_result_is_saved_is_a_warning():
    with pytest.warns(UserWarning, match="every rank returned its result, then a process died in teardown"):
        assert run_local_group(_rank_one_aborts_after_returning, 2) == [0, 1]


def _sleep_forever_after_writing_pid(rank: int, world: int, pid_dir: str) -> None:
    (Path(pid_dir) / f"{os.getpid()}.pid").touch()
    time.sleep(10_000)   # a hang outside any gloo call: nothing times it out but the caller


def _interrupt_main_once_ranks_run(pid_dir: Path, world: int, stop: threading.Event) -> None:
    while not stop.wait(0.05):
        if len(list(pid_dir.glob("*.pid"))) == world:
            _thread.interrupt_main()   # as pytest-timeout's SIGALRM (or a Ctrl-C): an exception in the caller
            return


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_no_rank_outlives_an_interrupted_call(tmp_path):
    stop = threading.Event()
    interrupter = threading.Thread(target=_interrupt_main_once_ranks_run, args=(tmp_path, 2, stop))
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_local_group(_sleep_forever_after_writing_pid, 2, str(tmp_path))
    finally:
        stop.set()
        interrupter.join()
    ranks = [int(path.stem) for path in tmp_path.glob("*.pid")]
    assert len(ranks) == 2
    assert not [pid for pid in ranks if psutil.pid_exists(pid)]
