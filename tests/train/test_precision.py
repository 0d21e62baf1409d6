"""bf16 training (Megatron's Float16Module, fp32 main params in the distributed optimizer) tracks fp32."""

from __future__ import annotations

import pytest

from tests.distributed import tiny_config, train_on_ranks

MEMORY = {"placements": ["1:2"], "num_values": 1024, "value_dim": 32, "key_dim": 16, "topk": 4}


@pytest.mark.slow
def test_bf16_losses_track_fp32():
    losses = {}
    for precision in ("fp32", "bf16"):
        config = tiny_config(training={"precision": precision})
        config["model"].update(family="ultramem", memory=MEMORY)
        losses[precision] = train_on_ranks(config, 1)[0].loss
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=0.05)
