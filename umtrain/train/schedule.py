"""Learning-rate schedules: warmup then cosine / linear / constant decay, and the UltraMem value-LR multiplier."""

from __future__ import annotations

import math
from typing import Optional

from umtrain.config import Config


def decay_iters(config: Config) -> int:
    """The schedule's horizon: `schedule.lr_decay_iters`, by default `training.train_iters`."""
    return config.schedule.lr_decay_iters or config.training.train_iters


def warmup_iters(config: Config) -> int:
    """`lr_warmup_iters`, or `lr_warmup_fraction` of the decay horizon (Megatron-LM's reading), rounded half up
    (Python's `round` halves to even: 1% of 50 steps would be no warmup at all, of 250 steps 2)."""
    s = config.schedule
    if s.lr_warmup_iters is not None:
        return s.lr_warmup_iters
    return math.floor(round(s.lr_warmup_fraction * decay_iters(config), 9) + 0.5)   # 0.29 x 50 = 14.4999...


def warmup_overrun(config: Config) -> Optional[str]:
    """A warning when the warmup does not end before the decay horizon (Megatron-LM refuses it): the LR then never
    decays, nor reaches `optimizer.lr` when training ends inside the warmup; past a horizon set shorter than the warmup
    (`schedule.lr_decay_iters`) it drops at once from its peak to `optimizer.min_lr`. Not an error: a short smoke
    test of a real config (`training.train_iters=5` with its 2000-step warmup) is a reason to run it so. A constant
    schedule has no decay."""
    s = config.schedule
    warmup, horizon, steps = warmup_iters(config), decay_iters(config), config.training.train_iters
    if s.lr_decay_style == "constant" or warmup < horizon:
        return None
    source = "lr_warmup_iters" if s.lr_warmup_iters is not None else "lr_warmup_fraction"
    horizon_source = "schedule.lr_decay_iters" if s.lr_decay_iters else "training.train_iters"
    peak = base_lr(config, min(warmup, steps) - 1)
    then = (f"then drops at once to optimizer.min_lr {config.optimizer.min_lr:.3g} at step {warmup + 1} of {steps}"
            if steps > warmup else "never decays")
    return (f"schedule.{source}: the warmup of {warmup} steps does not end before the {s.lr_decay_style} decay "
            f"horizon of {horizon} steps ({horizon_source}): the LR peaks at {peak:.3g} "
            f"(optimizer.lr {config.optimizer.lr:.3g}) and {then}")


def base_lr(config: Config, step: int) -> float:
    """LR at optimizer step `step` (0-based): linear warmup to `lr`, then decay to `min_lr` at `decay_iters`, and
    `min_lr` after it."""
    o, s = config.optimizer, config.schedule
    warmup, horizon = warmup_iters(config), decay_iters(config)
    if warmup and step < warmup:
        return o.lr * (step + 1) / warmup
    if s.lr_decay_style == "constant":
        return o.lr
    if step >= horizon:
        return o.min_lr
    progress = (step - warmup) / (horizon - warmup)
    if s.lr_decay_style == "linear":
        coeff = 1.0 - progress
    else:
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return o.min_lr + coeff * (o.lr - o.min_lr)


def value_lr_multiplier(config: Config, step: int) -> float:
    """lr_V(s) / lr(s) = 1 + (lambda_LR - 1) * max(0, 1 - s / S_total)  (spec section 2.7), with S_total the
    schedule's decay horizon, so a resumed run with a longer train_iters keeps the value schedule it started with."""
    memory = config.model.memory
    if memory is None:
        return 1.0
    return 1.0 + (memory.value_lr_multiplier - 1.0) * max(0.0, 1.0 - step / decay_iters(config))


def apply_lr(config: Config, param_groups, step: int) -> tuple[float, float]:
    """Set every group's LR and weight decay for `step`; returns the base LR and the value tables' LR."""
    lr = base_lr(config, step)
    value_lr = lr * value_lr_multiplier(config, step)
    for group in param_groups:
        group["lr"] = (value_lr if group.get("umtrain_value_lr") else lr) * group.get("lr_mult", 1.0)
        group["weight_decay"] = config.optimizer.weight_decay * group.get("wd_mult", 1.0)
    return lr, value_lr
