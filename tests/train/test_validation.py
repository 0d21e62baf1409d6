"""When validation runs: never with `training.eval_iters: 0` or a split that leaves no validation data (both used to
crash at the first evaluation, and at the last step that lost the run's final checkpoint)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.distributed import tiny_config, train_on_ranks
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
