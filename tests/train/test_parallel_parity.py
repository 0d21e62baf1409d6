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
