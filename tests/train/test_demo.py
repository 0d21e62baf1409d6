"""The README's demo learns: on the embedded corpus, the loss of its last 20 steps is below that of its first 20;
and each model family (dense, MoE, PKM, UltraMem) trains on the same corpus."""

from __future__ import annotations

import pytest

from tests.conftest import demo_config
from tests.distributed import train_on_ranks


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_demo_loss_falls_with_tp2(demo_dataset):
    config = demo_config(demo_dataset, training={"train_iters": 60, "eval_interval": 60, "eval_iters": 1})
    history = train_on_ranks(config, 2)[0]
    assert len(history.loss) == 60
    assert mean(history.loss[-20:]) < mean(history.loss[:20]) - 0.5
    assert 60 in history.valid_loss


SMALL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
FAMILIES = {
    "dense": {},
    "moe": {"moe": {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 64}},
    "pkm": {"memory": {"placements": ["2:2"], "num_values": 1024, "value_dim": 64, "key_dim": 32, "num_heads": 2,
                       "topk": 8, "softmax": True, "output_projection": False, "share_query": False,
                       "query_key_layernorm": False, "ive_expansion": 1, "tucker_rank": 1, "num_cores": 1,
                       "improved_init": False, "query_conv_kernel": 0, "value_lr_multiplier": 1.0}},
    "ultramem": {"memory": {"placements": ["1:2"], "num_values": 1024, "value_dim": 32, "key_dim": 16, "topk": 8}},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_trains(demo_dataset, family):
    config = demo_config(demo_dataset, training={"train_iters": 50, "eval_interval": 50, "eval_iters": 1,
                                                 "micro_batch_size": 4, "global_batch_size": 8},
                         parallel={"tensor_model_parallel_size": 1}, data={"seq_length": 64})
    config["model"] = {"family": family, **SMALL, **FAMILIES[family]}
    history = train_on_ranks(config, 1)[0]
    assert mean(history.loss[-10:]) < mean(history.loss[:10]) - 0.3, history.loss
