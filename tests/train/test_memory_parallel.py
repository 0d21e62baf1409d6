"""UltraMem inside the Megatron trainer: TP (with and without sequence parallelism) and PP give the single-process
losses and memory gradients, and the value tables follow their own LR schedule (spec section 2.7)."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core import parallel_state

from tests.distributed import tiny_config, train_on_ranks
from umtrain.config import config_from_dict
from umtrain.model.build import unwrap
from umtrain.ops.host_sync import record_host_syncs
from umtrain.parallel.comm import run_local_group

MEMORY = {"placements": ["1:2", "3:4"], "num_values": 1024, "value_dim": 32, "key_dim": 16, "topk": 4,
          "value_lr_multiplier": 10.0, "lookup_impl": "reference"}


def ultramem_config(tp: int = 1, pp: int = 1, sp: bool = False, **extra) -> dict:
    config = tiny_config(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                   "sequence_parallel": sp}, **extra)
    config["model"].update(family="ultramem", memory=dict(MEMORY))
    return config


def memory_grads(trainer) -> dict:
    """Gradients of the last step's memory parameters, keyed by (writer layer, parameter name), and the TDQKR
    factors the memory layers hold after training (the final evaluation ran a refresh left pending)."""
    grads, factors, in_main_grad = {}, {}, []
    for chunk in trainer.model:
        for layer in unwrap(chunk).decoder.layers:
            if getattr(layer, "memory", None) is not None:
                for name, param in layer.memory.named_parameters():
                    grads[(layer.layer_number, name)] = param.main_grad.detach().clone()
                factors[layer.layer_number] = layer.memory.tdqkr_row_factor.clone()
                in_main_grad.append(layer.memory.values.grad_added_to_main_grad)
    return {"loss": trainer.history.loss, "grad_norm": trainer.history.grad_norm, "grads": grads,
            "factors": factors, "table_grads_added_to_main_grad": in_main_grad}


@pytest.fixture(scope="module")
def reference():
    return train_on_ranks(ultramem_config(), 1, collect=memory_grads)[0]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (2, 1, True), (1, 2, False)])
def test_memory_model_matches_single_process(reference, tp, pp, sp):
    results = train_on_ranks(ultramem_config(tp, pp, sp), tp * pp, collect=memory_grads)
    seen = {}
    for result in results:
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        seen.update(result["grads"])
    assert seen.keys() == reference["grads"].keys()
    for key, grad in reference["grads"].items():
        torch.testing.assert_close(seen[key], grad, rtol=1e-5, atol=1e-7, msg=f"gradient of {key}")


def host_syncs_of_a_micro_batch(trainer) -> list[str]:
    """Host-synchronising operators and host reads (umtrain.ops.host_sync) of one training micro-batch's forward and
    backward through the model, its batch fetched before recording (the dataset works on the host)."""
    batch = trainer.train_batches.global_batch(0)[0]
    with record_host_syncs() as found:
        losses = trainer.model[0](batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        losses.float().mean().backward()
    return found


@pytest.mark.slow
def test_a_training_micro_batch_never_synchronises_the_host():
    """On a GPU a host synchronisation inside a memory layer stops the host from queueing the blocks the layer skips
    (the SVD behind the TDQKR auxiliary loss was one per layer)."""
    config = ultramem_config(training={"train_iters": 1})
    assert train_on_ranks(config, 1, collect=host_syncs_of_a_micro_batch) == [[]]


def aux_loss_after_one_more_step(trainer) -> dict:
    """Every rank logs the auxiliary losses of one more step (the trainer's logging path)."""
    trainer.train_step()
    return trainer._aux_losses(steps=1)


def aux_losses_logged_each_step_and_once(trainer) -> tuple[list[float], float]:
    """Two fresh trainers from the same seed run the same two steps; one logs after each step, one after both."""
    from umtrain.train.trainer import Trainer

    each, once = Trainer(trainer.config), Trainer(trainer.config)
    per_step = []
    for _ in range(2):
        each.train_step()
        per_step.append(each._aux_losses(steps=1)["aux_loss"])
    once.train_step()
    once.train_step()
    return per_step, once._aux_losses(steps=2)["aux_loss"]


@pytest.mark.slow
def test_a_logged_aux_loss_is_one_step_s_value_whatever_the_interval():
    (per_step, over_window), = train_on_ranks(ultramem_config(training={"train_iters": 1}), 1,
                                               collect=aux_losses_logged_each_step_and_once)
    assert per_step[0] > 0
    assert over_window == pytest.approx(sum(per_step) / 2, rel=1e-6)


@pytest.mark.slow
def test_aux_loss_is_logged_when_a_pipeline_stage_has_no_memory_layer():
    """PP=2 with the only memory layer on stage 0: stage 1 tracks no auxiliary loss but must still join Megatron's
    sum over the pipeline group (it hung there before), and every rank logs the single-process value."""
    config = ultramem_config(pp=1)
    config["model"]["memory"]["placements"] = ["1:2"]
    reference = train_on_ranks(config, 1, collect=aux_loss_after_one_more_step)[0]
    pipelined = dict(config, parallel={**config["parallel"], "pipeline_model_parallel_size": 2})
    results = train_on_ranks(pipelined, 2, collect=aux_loss_after_one_more_step)
    assert reference["aux_loss"] > 0
    for result in results:
        assert result["aux_loss"] == pytest.approx(reference["aux_loss"], rel=1e-5)


def _value_lrs_per_step(rank, world_size, config_dict):
    from umtrain.train.trainer import Trainer

    trainer = Trainer(config_from_dict(config_dict, world_size=world_size))
    observed = []
    try:
        for _ in range(config_dict["training"]["train_iters"]):
            trainer.train_step()
            groups = trainer.optimizer.param_groups
            observed.append(([g["lr"] for g in groups if g.get("umtrain_value_lr")],
                             [g["lr"] for g in groups if not g.get("umtrain_value_lr")]))
            trainer.iteration += 1
            trainer.consumed_samples += config_dict["training"]["global_batch_size"]
        return observed
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_value_lr_follows_the_formula_at_every_step():
    config = ultramem_config(schedule={"lr_warmup_iters": 2, "lr_decay_style": "cosine"},
                             training={"train_iters": 6})
    observed = run_local_group(_value_lrs_per_step, 1, config)[0]
    lr0, min_lr, total, lam, warmup = 1e-3, 1e-4, 6, 10.0, 2
    for step, (value_lrs, other_lrs) in enumerate(observed):
        if step < warmup:
            base = lr0 * (step + 1) / warmup
        else:
            base = min_lr + 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (lr0 - min_lr)
        assert value_lrs and other_lrs
        assert other_lrs == pytest.approx([base] * len(other_lrs))
        assert value_lrs == pytest.approx([base * (1 + (lam - 1) * max(0.0, 1 - step / total))] * len(value_lrs))


@pytest.mark.slow
def test_distributed_optimizer_with_overlapped_param_gather_matches_single_process(reference):
    """With `overlap_param_gather` the updated parameters reach a rank only in the next forward (Megatron's pre-hooks
    all-gather them): the TDQKR factors must be refreshed from the gathered cores, not from the shard-only update
    right after the optimizer step."""
    config = ultramem_config()
    config["parallel"].update(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
    for result in train_on_ranks(config, 2, collect=memory_grads):      # DP = 2
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        for layer, factor in reference["factors"].items():
            torch.testing.assert_close(result["factors"][layer], factor, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ranks,overlap_grad_reduce", [(1, False), (2, True)])
def test_fused_lookup_adding_into_main_grad_trains_like_the_reference_lookup(reference, ranks, overlap_grad_reduce):
    """The fused lookup adds each table's gradient straight into Megatron's main_grad (4 micro-batches per step) and
    marks it, so that DDP's hook does not add it again; the reference lookup's gradient takes DDP's usual path. With
    DP = 2 and overlapped gradient reduction the hook must still find a gradient and mark the table ready (the
    gradients are then compared through their norm: the distributed optimizer's reduce-scatter leaves each rank the
    sum of its own shard of the buffer only)."""
    config = ultramem_config()
    config["model"]["memory"]["lookup_impl"] = "fused"
    config["parallel"].update(use_distributed_optimizer=True, overlap_grad_reduce=overlap_grad_reduce)
    assert reference["table_grads_added_to_main_grad"] == [False, False]
    for result in train_on_ranks(config, ranks, collect=memory_grads):
        assert result["table_grads_added_to_main_grad"] == [True, True]
        assert result["loss"] == pytest.approx(reference["loss"], rel=1e-5)
        assert result["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-5)
        for key, grad in reference["grads"].items() if ranks == 1 else ():
            torch.testing.assert_close(result["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {key}")
