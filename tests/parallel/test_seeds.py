"""Dropout streams: distinct per pipeline stage (each stage's layers draw their own masks), the first stage's
the same as a single process's."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state, tensor_parallel

from tests.distributed import tiny_config
from umtrain.config import config_from_dict
from umtrain.parallel.comm import run_local_group


def dropout_draws_worker(rank: int, world_size: int, pp: int) -> dict:
    from umtrain.parallel.state import initialize_distributed, seed_everything

    config = config_from_dict(tiny_config(parallel={"pipeline_model_parallel_size": pp}), world_size=world_size)
    initialize_distributed(config)
    try:
        seed_everything(config.training.seed)
        default = torch.rand(8)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(8)
        return {"stage": parallel_state.get_pipeline_model_parallel_rank(), "default": default, "tracked": tracked}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_pipeline_stages_draw_different_dropout_masks():
    single = run_local_group(dropout_draws_worker, 1, 1)[0]
    first, second = sorted(run_local_group(dropout_draws_worker, 2, 2), key=lambda r: r["stage"])
    for stream in ("default", "tracked"):
        assert torch.equal(first[stream], single[stream])
        assert not torch.equal(first[stream], second[stream])
