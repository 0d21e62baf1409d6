"""The same global batch and seed give the same losses with every (TP, PP, DP) layout, virtual pipeline stages
included (float32, gloo)."""

from __future__ import annotations

import pytest

from tests.distributed import tiny_config, train_on_ranks

LAYOUTS = [(2, 1, 1, None), (1, 2, 1, None), (1, 1, 2, None), (2, 2, 1, None), (1, 2, 1, 2)]


def layout_config(tp: int, pp: int, vpp: int | None = None, **extra) -> dict:
    return tiny_config(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                 "virtual_pipeline_model_parallel_size": vpp, "use_distributed_optimizer": True},
                       **extra)


@pytest.fixture(scope="module")
def reference_losses():
    losses = train_on_ranks(layout_config(1, 1), 1)[0].loss
    assert len(losses) == 5 and losses[-1] < losses[0]
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp,vpp", LAYOUTS)
def test_losses_match_single_process(reference_losses, tp, pp, dp, vpp):
    histories = train_on_ranks(layout_config(tp, pp, vpp), tp * pp * dp)
    for history in histories:
        assert history.loss == pytest.approx(reference_losses, rel=1e-5)


@pytest.mark.slow
def test_memory_layers_in_both_virtual_chunks_of_a_rank_train_like_one_process():
    """Layers 1 and 3 of 4 are rank 0's two virtual chunks under PP 2 x VPP 2: each chunk holds a memory layer."""
    model = {"family": "ultramem", "memory": {"placements": ["1:1", "3:3"], "num_values": 1024, "value_dim": 32,
                                              "key_dim": 16, "topk": 4, "lookup_impl": "reference"}}
    reference = train_on_ranks(layout_config(1, 1, model=model), 1)[0].loss
    for history in train_on_ranks(layout_config(1, 2, 2, model=model), 2):
        assert history.loss == pytest.approx(reference, rel=1e-5)
