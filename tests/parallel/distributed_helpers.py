"""Run a test function on N local gloo processes (127.0.0.1, a free port) and collect what each rank returns.

    results = run_on_ranks(worker, 2, arg)      # worker(rank, world_size, arg), a module-level function

A failing rank's traceback is raised in the test process, with every failed rank's traceback.
"""

from __future__ import annotations

from umtrain.parallel.comm import run_local_group as run_on_ranks

__all__ = ["run_on_ranks"]
