"""LR schedules against hand-computed values."""

from __future__ import annotations

import math

import pytest

from umtrain.config import load_config
from umtrain.train.schedule import apply_lr, base_lr, value_lr_multiplier, warmup_iters, warmup_overrun


def config(**overrides):
    items = ["data.mock=true", "optimizer.lr=1.0", "optimizer.min_lr=0.1", "training.train_iters=100",
             "schedule.lr_warmup_iters=10"] + [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, items)


def test_warmup_is_linear_from_lr_over_warmup():
    c = config()
    assert [base_lr(c, s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert base_lr(c, 9) == pytest.approx(1.0)


def test_cosine_decays_to_min_lr():
    c = config()
    assert base_lr(c, 10) == pytest.approx(1.0)
    assert base_lr(c, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert base_lr(c, 100) == pytest.approx(0.1)
    assert base_lr(c, 500) == pytest.approx(0.1)


def test_linear_and_constant():
    linear = config(**{"schedule.lr_decay_style": "linear"})
    assert base_lr(linear, 55) == pytest.approx(0.1 + 0.9 * 0.5)
    constant = config(**{"schedule.lr_decay_style": "constant"})
    assert base_lr(constant, 80) == pytest.approx(1.0)


@pytest.mark.parametrize("fraction,train_iters,expected", [(0.01, 50, 1), (0.01, 150, 2), (0.01, 250, 3),
                                                            (0.01, 350, 4), (0.01, 1000, 10), (0.29, 50, 15)])
def test_warmup_fraction_rounds_half_up(fraction, train_iters, expected):
    c = load_config(None, ["data.mock=true", f"training.train_iters={train_iters}",
                           f"schedule.lr_warmup_fraction={fraction}"])
    assert warmup_iters(c) == expected


def test_a_decay_horizon_shorter_than_training_ends_at_min_lr():
    """Megatron-LM's reading: the warmup fraction is of lr_decay_iters, and past the horizon the LR is min_lr."""
    c = config(**{"schedule.lr_warmup_iters": "null", "schedule.lr_warmup_fraction": 0.1,
                  "schedule.lr_decay_iters": 20})
    assert warmup_iters(c) == 2
    assert base_lr(c, 11) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert [base_lr(c, s) for s in (20, 99)] == pytest.approx([0.1, 0.1])
    longer_warmup = config(**{"schedule.lr_warmup_iters": 30, "schedule.lr_decay_iters": 20})
    assert [base_lr(longer_warmup, s) for s in (29, 30, 99)] == pytest.approx([1.0, 0.1, 0.1])


def test_value_lr_multiplier_decays_linearly_to_one():
    c = load_config(None, ["data.mock=true", "model.family=ultramem", "model.memory.value_lr_multiplier=10",
                           "training.train_iters=100"])
    assert value_lr_multiplier(c, 0) == pytest.approx(10.0)
    assert value_lr_multiplier(c, 50) == pytest.approx(5.5)
    assert value_lr_multiplier(c, 100) == pytest.approx(1.0)
    assert value_lr_multiplier(config(), 0) == 1.0


def test_apply_lr_sets_groups_by_kind():
    c = load_config(None, ["data.mock=true", "model.family=ultramem", "model.memory.topk=4", "optimizer.lr=1.0",
                           "optimizer.min_lr=0.1",
                           "optimizer.weight_decay=0.1", "schedule.lr_warmup_iters=0", "training.train_iters=10",
                           "schedule.lr_decay_style=constant"])
    groups = [{"wd_mult": 0.0}, {"umtrain_value_lr": True, "wd_mult": 1.0}, {"lr_mult": 0.5, "wd_mult": 1.0}]
    assert apply_lr(c, groups, step=0) == pytest.approx((1.0, 10.0))
    assert [g["lr"] for g in groups] == pytest.approx([1.0, 10.0, 0.5])
    assert [g["weight_decay"] for g in groups] == pytest.approx([0.0, 0.1, 0.1])


@pytest.mark.parametrize("overrides, key", [
    (["training.train_iters=10", "schedule.lr_warmup_iters=10"], "schedule.lr_warmup_iters"),
    (["training.train_iters=5", "schedule.lr_warmup_iters=20"], "schedule.lr_warmup_iters"),
    (["training.train_iters=100", "schedule.lr_decay_iters=20", "schedule.lr_warmup_iters=30"],
     "schedule.lr_warmup_iters"),
    (["training.train_iters=100", "schedule.lr_decay_iters=20", "schedule.lr_warmup_iters=20"],
     "schedule.lr_warmup_iters"),
    (["training.train_iters=10", "schedule.lr_warmup_fraction=1.0"], "schedule.lr_warmup_fraction"),
    (["training.train_iters=1", "schedule.lr_warmup_fraction=0.5"], "schedule.lr_warmup_fraction"),  # rounds to 1
    (["training.train_iters=10", "schedule.lr_warmup_iters=9"], None),
    (["training.train_iters=3", "schedule.lr_warmup_fraction=0.1"], None),                          # rounds to 0
    (["training.train_iters=10", "schedule.lr_warmup_iters=30", "schedule.lr_decay_style=constant"], None),
])
def test_a_warmup_that_does_not_end_before_the_decay_is_reported_as_the_lr_goes(overrides, key):
    """The message tells the schedule the run gets: its peak, and whether the LR then stays or falls to min_lr."""
    config = load_config(None, ["data.mock=true", "optimizer.lr=1.0", "optimizer.min_lr=0.1", *overrides])
    message = warmup_overrun(config)
    if key is None:
        assert message is None
        return
    lrs = [base_lr(config, step) for step in range(config.training.train_iters)]
    assert message.startswith(key) and f"peaks at {max(lrs):.3g} " in message
    if lrs[-1] < max(lrs):
        assert lrs[-1] == 0.1 and "then drops at once to optimizer.min_lr 0.1" in message
    else:
        assert "never decays" in message
