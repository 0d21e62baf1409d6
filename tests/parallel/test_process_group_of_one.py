"""`process_group_of_one`: in a fresh process it makes a working 1-process group and destroys it on exit; inside
a group that exists (nested here) it uses that group and keeps it."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def _observe_group_of_one() -> dict:
    import torch
    import torch.distributed as dist

    from umtrain.parallel.state import process_group_of_one

    seen = {"before": dist.is_initialized()}
    with process_group_of_one():
        value = torch.tensor([2.0])
        dist.all_reduce(value)
        seen["inside"] = (dist.get_world_size(), dist.get_rank(), float(value))
        with process_group_of_one():
            pass
        seen["after_nested"] = dist.is_initialized()
    seen["after"] = dist.is_initialized()
    return seen


def test_process_group_of_one_is_made_used_and_destroyed():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        seen = pool.submit(_observe_group_of_one).result(timeout=120)
    assert seen == {"before": False, "inside": (1, 0, 2.0), "after_nested": True, "after": False}
