"""Checkpoint state helpers that need no process group."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from umtrain.checkpoint.state import sync_params_before_save
from umtrain.config.schema import MemoryConfig
from umtrain.model.memory import MemoryLayer


def test_save_with_overlapped_param_gather_runs_the_deferred_tdqkr_refresh():
    """The trainer defers the refresh to the next forward under overlap_param_gather; a checkpoint written before
    that forward must still hold the factors of the cores it saves."""
    config = MemoryConfig(num_values=64, value_dim=8, key_dim=8, num_heads=2, topk=4)
    layer = MemoryLayer(config, 16, num_layers=4, seed=0, layer_index=0, lookup=lambda *args: None)
    with torch.no_grad():
        layer.cores.copy_(torch.randn(layer.cores.shape, generator=torch.Generator().manual_seed(0)))
    layer.refresh_tdqkr_factors(at_next_forward=True)
    expected = MemoryLayer(config, 16, num_layers=4, seed=0, layer_index=0, lookup=lambda *args: None)
    expected.load_state_dict(layer.state_dict())
    expected.refresh_tdqkr_factors()
    assert not torch.equal(layer.tdqkr_row_factor, expected.tdqkr_row_factor)

    chunk = SimpleNamespace(start_param_sync=lambda force_sync: None)
    trainer = SimpleNamespace(config=SimpleNamespace(parallel=SimpleNamespace(overlap_param_gather=True)),
                              model=[chunk], memory_layers=[layer])
    sync_params_before_save(trainer)
    assert not layer.tdqkr_refresh_pending
    assert torch.equal(layer.tdqkr_row_factor, expected.tdqkr_row_factor)
    assert torch.equal(layer.tdqkr_col_factor, expected.tdqkr_col_factor)


def test_the_chain_step_is_read_where_adam_keeps_it():
    """torch's AdamW keeps `step` per parameter, TE/apex FusedAdam in the param group: an empty memory-table
    optimizer states the step of the others, read from either."""
    from umtrain.checkpoint.state import chain_step

    param = torch.nn.Parameter(torch.zeros(2))
    empty = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"params": []}], state={}))
    per_param = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"params": [param]}],
                                                          state={param: {"step": torch.tensor(7.0)}}))
    fused = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"params": [param], "step": 5}], state={}))
    resumed = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[{"params": [param], "step": 4}],   # as loaded
                                                        state={param: {"step": torch.tensor(7.0)}}))
    assert chain_step(SimpleNamespace(chained_optimizers=[empty, per_param])) == 7.0
    assert chain_step(SimpleNamespace(chained_optimizers=[empty, resumed])) == 7.0
    assert chain_step(SimpleNamespace(chained_optimizers=[empty, fused])) == 5.0
    assert chain_step(SimpleNamespace(chained_optimizers=[empty])) == 0.0
