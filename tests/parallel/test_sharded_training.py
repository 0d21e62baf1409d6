"""UltraMem trained with value tables sharded over the memory-parallel group (P=2) inside TP=2 x DP=2: the same
losses and clipping grad norm as the unsharded single-process model; 1/P of the table and its Adam state per rank;
overlapping the memory layer with the blocks it skips changes nothing."""

from __future__ import annotations

import pytest

from tests.distributed import tiny_config, train_on_ranks
from umtrain.model.build import unwrap

MEMORY = {"placements": ["1:2", "3:4"], "num_values": 1024, "value_dim": 32, "key_dim": 16, "topk": 4,
          "lookup_impl": "reference"}


def sharded_config(tp: int, ep: int, pp: int = 1, group: str = "data", sp: bool = False, **memory) -> dict:
    config = tiny_config(parallel={"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                                   "pipeline_model_parallel_size": pp, "memory_parallel_group": group,
                                   "sequence_parallel": sp},
                         training={"global_batch_size": 8, "micro_batch_size": 2})
    config["model"].update(family="ultramem", memory={**MEMORY, **memory})
    config["logging"]["memory_stats"] = True          # looked_up_tokens reads them
    return config


def table_footprint(trainer) -> dict:
    """Elements of value-table shards and of the optimizer state (main params, Adam moments) over them."""
    tables = sum(layer.memory.values.numel() for chunk in trainer.model
                 for layer in unwrap(chunk).decoder.layers if getattr(layer, "memory", None) is not None)
    state = sum(param.numel() for group in trainer.optimizer.param_groups if group["is_expert_parallel"]
                for param in group["params"])
    moments = 0
    for inner in trainer.optimizer.chained_optimizers:
        for group in inner.optimizer.param_groups:
            if group["is_expert_parallel"]:
                for param in group["params"]:
                    moments += sum(v.numel() for k, v in inner.optimizer.state.get(param, {}).items()
                                   if k in ("exp_avg", "exp_avg_sq"))
    return {"loss": trainer.history.loss, "grad_norm": trainer.history.grad_norm, "tables": tables,
            "main_params": state, "moments": moments}


@pytest.fixture(scope="module")
def unsharded():
    return train_on_ranks(sharded_config(tp=1, ep=1), 1, collect=looked_up_tokens)[0]


@pytest.mark.slow
@pytest.mark.parametrize("memory", [{"sharding_mode": "number"},
                                    {"sharding_mode": "number", "sharding_capacity_factor": 2.0},
                                    {"sharding_mode": "number", "sharding_dedup": True},
                                    {"sharding_mode": "dimension", "overlap": True},
                                    {"sharding_mode": "dimension", "lookup_impl": "fused"}],
                         ids=["number", "number-capacity", "number-dedup", "dimension-overlap", "dimension-fused"])
def test_sharded_tables_train_like_unsharded(unsharded, memory):
    results = train_on_ranks(sharded_config(tp=2, ep=2, **memory), 4, collect=table_footprint)
    full_elements = 2 * MEMORY["num_values"] * MEMORY["value_dim"]
    assert unsharded["tables"] == full_elements
    for result in results:
        assert result["loss"] == pytest.approx(unsharded["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(unsharded["grad_norm"], rel=1e-5)
        assert result["tables"] == full_elements // 2
        assert result["main_params"] == full_elements // 2
        assert result["moments"] == 2 * full_elements // 2


@pytest.mark.slow
def test_overlapped_memory_under_the_pipeline_schedule_trains_like_unsharded(unsharded):
    """PP=2 x DP=2 with P=2 and overlap on: 1F1B interleaves micro-batches' forwards and backwards, so the worker
    thread sees forward and backward memory computations of different micro-batches in the same order on every rank
    of the memory-parallel group."""
    results = train_on_ranks(sharded_config(tp=1, ep=2, pp=2, sharding_mode="number", overlap=True), 4,
                             collect=table_footprint)
    last_stage = results[2:]                 # ranks 2, 3 hold the second pipeline stage and see the loss
    for result in last_stage:
        assert result["loss"] == pytest.approx(unsharded["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(unsharded["grad_norm"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("ep,sp,memory", [(2, False, {"sharding_mode": "number"}),
                                          (2, True, {"sharding_mode": "dimension", "overlap": True}),
                                          (4, False, {"sharding_mode": "number", "sharding_capacity_factor": 2.0}),
                                          (2, False, {"sharding_mode": "dimension", "lookup_impl": "fused"})])
def test_memory_group_over_tensor_parallel_ranks_trains_like_unsharded(unsharded, ep, sp, memory):
    """memory_parallel_group: tensor_data with TP=2 x DP=2 (and sequence parallel): P=2 is the TP group, P=4 the
    TP x DP product. TP ranks hold different shards (1/P of the table each, no TP replica) and look up the same
    tokens (or, under sequence parallelism, their own slice): the losses and the clipping norm still equal the
    unsharded model's."""
    config = sharded_config(tp=2, ep=ep, group="tensor_data", sp=sp, **memory)
    results = train_on_ranks(config, 4, collect=table_footprint)
    full_elements = 2 * MEMORY["num_values"] * MEMORY["value_dim"]
    for result in results:
        assert result["loss"] == pytest.approx(unsharded["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(unsharded["grad_norm"], rel=1e-5)
        assert result["tables"] == full_elements // ep
    # The distributed optimizer splits each shard's state over its expert-data-parallel group (4 / P ranks).
    assert sum(r["main_params"] for r in results) == full_elements


def looked_up_tokens(trainer) -> dict:
    """table_footprint, the tokens each memory layer looked up in its last forward, and the memory health the
    trainer logs (merged over all ranks)."""
    tokens = [layer.memory.last_stats["rows"].shape[0] for chunk in trainer.model
              for layer in unwrap(chunk).decoder.layers if getattr(layer, "memory", None) is not None]
    return {**table_footprint(trainer), "tokens": tokens, "health": trainer._memory_health()}


@pytest.mark.slow
@pytest.mark.parametrize("ep,memory", [(1, {}), (2, {"sharding_mode": "number", "overlap": True})])
def test_sequence_parallel_memory_layers_look_up_their_slice_and_train_like_unsharded(unsharded, ep, memory):
    """TP=2 x DP=2 under sequence parallelism, memory_parallel_group data: each TP rank runs the memory layers on its
    half of the sequence (query conv across the border included), and the gradients of the memory parameters and of
    the table replicas are summed over TP. The losses and the clipping norm equal the unsharded model's, and so do
    the logged fraction of values hit and mean top-1 score, merged over the ranks' slices."""
    results = train_on_ranks(sharded_config(tp=2, ep=ep, sp=True, **memory), 4, collect=looked_up_tokens)
    config = sharded_config(tp=2, ep=ep)
    half_micro_batch = config["training"]["micro_batch_size"] * config["data"]["seq_length"] // 2
    for result in results:
        assert result["loss"] == pytest.approx(unsharded["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(unsharded["grad_norm"], rel=1e-5)
        assert result["tokens"] == [half_micro_batch, half_micro_batch]
        for key, value in unsharded["health"].items():
            if not key.endswith("output_std"):                  # a std over half the tokens is another statistic
                assert result["health"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_tensor_data_group_smaller_than_tp_under_sequence_parallelism_trains_like_without_it():
    """TP=4 with P=2 tensor_data groups: TP ranks 0, 2 (and 1, 3) hold replicas of one shard, as expert-data-parallel
    peers, and under SP they fill them from different quarters of the sequence. Against the same layout without
    SP (TP=4 pads the vocabulary differently from TP=1): the same losses and clipping norm."""
    replicated, split = (train_on_ranks(sharded_config(tp=4, ep=2, group="tensor_data", sp=sp, sharding_mode="number"),
                                        4, collect=looked_up_tokens) for sp in (False, True))
    quarter = 2 * 32 // 4
    for reference, result in zip(replicated, split):
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        assert result["tokens"] == [quarter, quarter] and reference["tokens"] == [4 * quarter, 4 * quarter]


@pytest.mark.slow
def test_a_capacity_overflow_stops_every_rank_before_anything_is_saved(tmp_path):
    """capacity = exactly the balanced T*K/P ids per owner overflows at the first step; logging only every 100
    steps, the check before the first save must still catch it, on every rank (not only the one that overflowed)."""
    config = sharded_config(tp=1, ep=2, sharding_mode="number", sharding_capacity_factor=1.0)
    config["checkpoint"] = {"save": str(tmp_path / "ckpt"), "save_interval": 1}
    config["logging"] = {"log_interval": 100, "progress_bar": False, "memory_stats": False}
    with pytest.raises(RuntimeError) as failure:
        train_on_ranks(config, 2)
    assert str(failure.value).count("raise model.memory.sharding_capacity_factor") == 2, str(failure.value)
    assert not list((tmp_path / "ckpt").glob("iter_*"))
