"""Megatron-Core's (distributed) AdamW with umtrain's parameter groups, and a step that refuses NaN/Inf."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as mcore_optimizer
from megatron.core.optimizer.optimizer import ChainedOptimizer
from megatron.core.optimizer.optimizer_config import ParamKey

from umtrain.config import Config

MEGATRON_OPTIMIZERS = {"adamw": dict(optimizer="adam", decoupled_weight_decay=True)}
"""optimizer.optimizer -> Megatron-Core's OptimizerConfig fields (its 'adam' with decoupled weight decay is AdamW)."""


def megatron_optimizer_config(config: Config) -> OptimizerConfig:
    o = config.optimizer
    dtype = config.training.params_dtype()
    return OptimizerConfig(
        **MEGATRON_OPTIMIZERS[o.optimizer], lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16, params_dtype=dtype,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer,
        overlap_param_gather_with_optimizer_step=False,
    )


def param_group_overrides(config: Config, opt_config: OptimizerConfig) -> dict:
    """Megatron's standard groups (no weight decay on biases and norms) plus the memory-value group."""
    from megatron.core.optimizer import get_standard_config_overrides

    overrides = get_standard_config_overrides(opt_config)
    memory = config.model.memory
    if config.model.has_memory:
        overrides[ParamKey(attr="is_memory_value")] = {
            "umtrain_value_lr": True,
            "wd_mult": 1.0 if memory.value_weight_decay else 0.0,
        }
    return overrides


def build_optimizer(config: Config, model_chunks: list) -> ChainedOptimizer:
    """Always a ChainedOptimizer, so dense, expert and memory-table optimizers share one structure."""
    opt_config = megatron_optimizer_config(config)
    optimizer = get_megatron_optimizer(opt_config, model_chunks, config_overrides=param_group_overrides(config, opt_config))
    if not isinstance(optimizer, ChainedOptimizer):
        optimizer = ChainedOptimizer([optimizer])
    use_fused_adamw(optimizer)
    return optimizer


def use_fused_adamw(optimizer: ChainedOptimizer) -> None:
    """torch's AdamW as one fused kernel per device and dtype, not its default `foreach` path. Without TE or apex,
    Megatron-Core builds torch's AdamW with its defaults; on an H200 its `foreach` ops (a pass over the states per
    operation) took 45 ms of UltraMem-151M-x12's 169 ms of GPU time per step, for the 1.9 B table parameters
    (`docs/benchmarks/gpu_training.md`). TE's and apex's FusedAdam are fused already and left alone."""
    for inner in optimizer.chained_optimizers:
        adam = getattr(inner, "optimizer", None)
        if type(adam) is not torch.optim.AdamW:
            continue
        fuse_param_groups(adam)
        adam.register_load_state_dict_post_hook(fuse_param_groups)
        adam.register_step_pre_hook(steps_on_parameter_devices)


def fuse_param_groups(adam: torch.optim.Optimizer) -> None:
    """Also after every load: loading takes each group's settings from the saved state, and a checkpoint of a run
    that stepped unfused (an older umtrain) would otherwise bring back `fused: None` for good."""
    adam.defaults.update(fused=True, foreach=None)
    for group in adam.param_groups:
        group.update(fused=True, foreach=None)


def steps_on_parameter_devices(adam: torch.optim.Optimizer, args, kwargs) -> None:
    """The fused kernel reads each parameter's `step` on the parameter's device, in float32; a checkpoint loads it
    elsewhere (`umtrain.checkpoint.state.load_optimizer_state` gives each parameter its own)."""
    for group in adam.param_groups:
        for param in group["params"]:
            step = adam.state.get(param, {}).get("step")
            if step is not None and (step.device != param.device or step.dtype != torch.float32):
                adam.state[param]["step"] = step.to(device=param.device, dtype=torch.float32)


@dataclass
class StepResult:
    applied: bool
    grad_norm: float


def guarded_step(optimizer: ChainedOptimizer, clip_grad: float) -> StepResult:
    """ChainedOptimizer.step, except that a non-finite gradient norm skips the update instead of applying it."""
    if optimizer.prepare_grads():
        return StepResult(False, math.nan)
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return StepResult(False, grad_norm)
    if clip_grad > 0:
        for inner in optimizer.chained_optimizers:
            parameters = inner.get_parameters()
            if parameters:
                mcore_optimizer.clip_grad_by_total_norm_fp32(parameters, max_norm=clip_grad, total_norm=grad_norm)
    return StepResult(optimizer.step_with_ready_grads(), grad_norm)
