"""Value tables checkpointed as shards of the full table: saved over P=4 ranks (number-wise), they load over P=2
(dimension-wise) and P=1, giving the same logits and the same next-step loss."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint.helpers import ULTRAMEM, run_config, train
from umtrain.checkpoint import manager

SAVED_AT, TOTAL = 2, 3


def memory_model(mode: str) -> dict:
    return {**ULTRAMEM, "memory": {**ULTRAMEM["memory"], "sharding_mode": mode}}


def sharded_run(world: int, mode: str, **checkpoint) -> dict:
    config = run_config(TOTAL, model=memory_model(mode), **checkpoint)
    config["parallel"]["expert_model_parallel_size"] = world
    return train(config, world, logits=True)


@pytest.mark.slow
def test_tables_saved_over_four_ranks_load_over_two_and_one(tmp_path):
    root = tmp_path / "ckpt"
    saved = sharded_run(4, "number", save=str(root), save_interval=SAVED_AT)
    checkpoint = root / manager.checkpoint_name(SAVED_AT)
    for world, mode in ((2, "dimension"), (1, "auto")):
        resumed = sharded_run(world, mode, load=str(checkpoint))
        assert resumed["start"] == SAVED_AT
        assert resumed["loss"][SAVED_AT] == pytest.approx(saved["loss"][SAVED_AT], rel=1e-5)
        torch.testing.assert_close(resumed["final_logits"], saved["final_logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_tables_sharded_across_tensor_parallel_ranks_load_unsharded(tmp_path):
    """Saved with TP=2 and the memory-parallel group = the TP group (P=2, each TP rank a different half of every
    table), loaded on one process (P=1): same logits and the same next-step loss."""
    root = tmp_path / "ckpt"
    config = run_config(TOTAL, tp=2, model=memory_model("number"), save=str(root), save_interval=SAVED_AT)
    config["parallel"].update(expert_model_parallel_size=2, memory_parallel_group="tensor_data")
    saved = train(config, 2, logits=True)
    checkpoint = root / manager.checkpoint_name(SAVED_AT)
    resumed = train(run_config(TOTAL, model=memory_model("auto"), load=str(checkpoint)), 1, logits=True)
    assert resumed["start"] == SAVED_AT
    assert resumed["loss"][SAVED_AT] == pytest.approx(saved["loss"][SAVED_AT], rel=1e-5)
    torch.testing.assert_close(resumed["final_logits"], saved["final_logits"], rtol=0, atol=1e-5)
