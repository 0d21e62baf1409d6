"""Run the trainer on N local processes (gloo, or NCCL on a GPU) and return each rank's result (shared by the slow
tests)."""

from __future__ import annotations

from megatron.core import parallel_state

from umtrain.config import config_from_dict
from umtrain.parallel.comm import run_local_group


def _train_worker(rank: int, world_size: int, config_dict: dict, collect):
    from umtrain.train.trainer import Trainer

    config = config_from_dict(config_dict, world_size=world_size)
    trainer = Trainer(config)
    try:
        trainer.train()
        return collect(trainer)
    finally:
        parallel_state.destroy_model_parallel()


def history_of(trainer):
    return trainer.history


def train_on_ranks(config_dict: dict, world_size: int, collect=history_of, backend: str = "gloo") -> list:
    """`collect(trainer)` (a module-level function) runs on every rank after training; results in rank order."""
    return run_local_group(_train_worker, world_size, config_dict, collect, backend=backend)


def tiny_config(**sections) -> dict:
    """A 4-layer, hidden-64 GPT on mock data, 5 steps, no logging noise; sections override per key."""
    config = {
        "model": {"family": "dense", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4},
        "data": {"mock": True, "seq_length": 32, "mock_vocab_size": 256},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 5, "eval_interval": 100,
                     "eval_iters": 1},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4},
        "schedule": {"lr_warmup_iters": 1},
        "logging": {"log_interval": 100, "progress_bar": False, "memory_stats": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
