"""When validation runs: never with `training.eval_iters: 0` or a split that leaves no validation data (both used to
crash at the first evaluation, and at the last step that lost the run's final checkpoint)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import demo_config
from tests.distributed import tiny_config, train_on_ranks
from umtrain.parallel.comm import run_local_group
from umtrain.train.trainer import Trainer


def trainer_with(eval_iters: int, valid_dataset) -> SimpleNamespace:
    config = SimpleNamespace(training=SimpleNamespace(eval_iters=eval_iters))
    return SimpleNamespace(config=config, datasets=[object(), valid_dataset])


@pytest.mark.parametrize("eval_iters,valid,expected", [(4, object(), True), (0, object(), False), (4, None, False)])
def test_validates_only_with_iterations_and_data(eval_iters, valid, expected):
    assert Trainer.validates.fget(trainer_with(eval_iters, valid)) is expected


@pytest.mark.slow
def test_training_without_validation_runs_to_the_end():
    history = train_on_ranks(tiny_config(training={"train_iters": 2, "eval_iters": 0}), 1)[0]
    assert len(history.loss) == 2 and history.valid_loss == {}



def first_validation_tokens(rank: int, world_size: int, config_dict: dict) -> list[int]:
    """The first validation sample's first tokens, as a trainer built from `config_dict` sees them (no training)."""
    from megatron.core import parallel_state

    from umtrain.config import config_from_dict

    trainer = Trainer(config_from_dict(config_dict, world_size=world_size))
    try:
        return trainer.datasets[1][0]["tokens"][:16].tolist()
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
def test_validation_samples_do_not_depend_on_the_run_length(demo_dataset):
    """The runs of a sweep over train_iters or eval_interval must validate on the same samples to compare."""
    def first_tokens(train_iters: int, eval_interval: int) -> list[int]:
        config = demo_config(demo_dataset, training={"train_iters": train_iters, "eval_interval": eval_interval,
                                                     "eval_iters": 2},
                             parallel={"tensor_model_parallel_size": 1}, data={"seq_length": 64})
        return run_local_group(first_validation_tokens, 1, config)[0]

    assert first_tokens(4, 2) == first_tokens(4000, 1)
