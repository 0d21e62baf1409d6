"""What a checkpoint holds: the trainer's sharded state dict (Megatron-Core `dist_checkpointing`) and its restore.

Sharded: every model chunk (per-layer keys, so memory layers and their TDQKR/IVE buffers have their own), the
distributed optimizer in the `fully_reshardable` format (loads under any (TP, PP, DP)), and each rank's RNG
states. Common (written once by rank 0): iteration, consumed samples, the resolved config, the layout, the padded
vocabulary and the per-step history. The LR schedule is a pure function of the iteration and is not stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.utils import extract_sharded_tensors_and_factories
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from umtrain.config import Config
from umtrain.config.base import to_dict
from umtrain.data.datasets import next_samples_fingerprint, split_blend

FORMAT_VERSION = 3
"""2: MoE experts are expert-parallel parameters at every expert-parallel size (their own chained optimizer).
3: the distributed optimizer's state is saved unshifted where a gradient buffer has several buckets
(`bucket_padding_kept`)."""
FULL_CONTENTS = ("model", "model_extra_state", "optimizer", "rng")
"""What a training checkpoint holds; a converted one holds only the model's tensors ("model")."""
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


# --------------------------------------------------------------------------------------------- model


def model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def model_sharded_state_dict(trainer, tensors_only: bool = False) -> dict[str, Any]:
    """Every chunk's sharded state dict; `tensors_only` drops the `_extra_state` objects (absent from converted
    checkpoints; None for umtrain's local-spec modules)."""
    from umtrain.model.build import unwrap

    state = {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(model_keys(len(trainer.model)), trainer.model)}
    return extract_sharded_tensors_and_factories(state)[0] if tensors_only else state


def load_model_state(trainer, loaded: dict[str, Any]) -> None:
    from umtrain.model.build import unwrap

    for key, chunk in zip(model_keys(len(trainer.model)), trainer.model):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded[key], strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")


# --------------------------------------------------------------------------------------------- optimizer


def distributed_optimizers(optimizer) -> list[DistributedOptimizer]:
    return [inner for inner in optimizer.chained_optimizers if isinstance(inner, DistributedOptimizer)]


def prepare_optimizer_for_load(optimizer) -> None:
    """A fresh distributed optimizer has no Adam states to load into (its `state_dict()` asserts): create them."""
    for inner in distributed_optimizers(optimizer):
        if not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _set_states_except_step(inner: DistributedOptimizer, model_param, tensors: dict[str, torch.Tensor]) -> None:
    """Megatron's `_set_main_param_and_optimizer_states` without TE/apex: copy under no_grad, leave `step` alone."""
    group_index, group_order = inner.model_param_group_index_map[model_param]
    main_param = inner.optimizer.param_groups[group_index]["params"][group_order]
    targets = {"param": main_param, **inner.optimizer.state[main_param]}
    with torch.no_grad():
        for key, target in targets.items():
            if key != "step":
                target.copy_(tensors[key])


@contextlib.contextmanager
def methods_replaced(replacements: list[tuple[Any, str, Callable]]) -> Iterator[None]:
    """Each (object, name, function): the object's method `name` is `function` while the block runs (an instance
    attribute over Megatron's method, deleted afterwards)."""
    for obj, name, function in replacements:
        setattr(obj, name, function)
    try:
        yield
    finally:
        for obj, name, _ in replacements:
            delattr(obj, name)


def load_optimizer_state(optimizer, loaded: Any) -> None:
    """`ChainedOptimizer.load_state_dict`, with the three fixes a TE/apex-less Megatron-Core 0.16.1 needs: states
    copied under no_grad, `step` skipped there, and afterwards every parameter given its OWN `step` tensor (Megatron
    hands all of them one shared tensor, which torch's AdamW then increments once per parameter per step, silently
    breaking bias correction)."""
    copies_without_step = [(inner, "_set_main_param_and_optimizer_states",
                            functools.partial(_set_states_except_step, inner))
                           for inner in distributed_optimizers(optimizer)]
    with methods_replaced(copies_without_step), parameterless_optimizers_stated(optimizer):
        optimizer.load_state_dict(loaded)
    for inner in optimizer.chained_optimizers:
        for state in inner.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].detach().clone()


def optimizer_sharded_state_dict(trainer, model_state: dict[str, Any], is_loading: bool) -> Any:
    with parameterless_optimizers_stated(trainer.optimizer), bucket_padding_kept(trainer.optimizer):
        return trainer.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                    metadata=dict(OPTIMIZER_METADATA))


@contextlib.contextmanager
def bucket_padding_kept(optimizer) -> Iterator[None]:
    """Megatron-Core 0.16.1 saves the `fully_reshardable` format from `get_parameter_state_dp_zero`, which packs a
    buffer's buckets back to back without the padding at each bucket's end, and then slices it at
    `param_index_map` positions, which count that padding (its issue #504). Every parameter after a padded bucket
    was saved shifted (the shared embedding under the interleaved pipeline has a bucket of its own; so do the
    buckets of `overlap_grad_reduce`), with zeros at the end, and a resume trained on from a corrupted optimizer
    state. While the state dict is built, the gathered tensors are laid out as the buffer is."""
    with methods_replaced([(inner, "get_parameter_state_dp_zero",
                            functools.partial(_parameter_state_in_buffer_layout, inner))
                           for inner in distributed_optimizers(optimizer)]):
        yield


def _parameter_state_in_buffer_layout(inner: DistributedOptimizer, **kwargs) -> Optional[dict]:
    state = type(inner).get_parameter_state_dp_zero(inner, **kwargs)
    if state is None:
        return None
    for gbuf_idx, buffer in enumerate(inner.buffers):
        for world_tensors in state[gbuf_idx].values():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                world_tensors[key] = _with_bucket_padding(world_tensors[key], buffer)
    return state


def _with_bucket_padding(packed: torch.Tensor, buffer) -> torch.Tensor:
    """Each bucket's unpadded elements moved from their packed position to the bucket's offset in the buffer."""
    laid_out = packed.new_zeros(buffer.numel)
    start = 0
    for bucket in buffer.buckets:
        laid_out[bucket.offset:bucket.offset + bucket.numel_unpadded] = packed[start:start + bucket.numel_unpadded]
        start += bucket.numel_unpadded
    return laid_out


@contextlib.contextmanager
def parameterless_optimizers_stated(optimizer) -> Iterator[None]:
    """A pipeline stage without memory layers holds a memory-table optimizer without parameters. Only global rank 0
    writes the optimizers' common state, which holds their step, and when its stage is the one without memory
    layers, that step is what the stages with them load. While a checkpoint is saved or loaded, such an optimizer
    states the step of the chain's other optimizers: the distributed one in its param groups (without TE or apex
    Megatron's `DistributedOptimizer.state_dict` asserts on it, taking `step` from parameters it does not have;
    a chain's optimizers must be at one step), the plain one as its `common_step` (without it, Megatron gave the
    memory parameters' Adam states no `step`, on which torch's Adam fails)."""
    empty = [inner for inner in optimizer.chained_optimizers
             if not any(group["params"] for group in inner.optimizer.param_groups)]
    step = chain_step(optimizer)
    with methods_replaced([(inner, name, method)
                           for inner in empty for name, method in _stand_ins(inner, step).items()]):
        yield


def _stand_ins(inner, step: float) -> dict[str, Any]:
    """The methods a parameterless optimizer states its `step` through, by kind of optimizer."""
    if isinstance(inner, DistributedOptimizer):
        return {"state_dict": functools.partial(_state_dict_without_parameters, inner, step),
                "sharded_state_dict": functools.partial(_sharded_state_dict_without_parameters, inner)}
    return {"sharded_state_dict": functools.partial(_plain_sharded_state_dict_without_parameters, inner, step)}


def _plain_sharded_state_dict_without_parameters(inner, step: float, *args, **kwargs) -> dict[str, Any]:
    state = type(inner).sharded_state_dict(inner, *args, **kwargs)
    torch_state = state.get("optimizer", state)    # the mixed-precision optimizer nests torch's state under "optimizer"
    if step:
        torch_state["state"]["common_step"] = torch.tensor(step)
    return state


def _sharded_state_dict_without_parameters(inner: DistributedOptimizer, *args, **kwargs) -> dict[str, Any]:
    """Without its empty `param_state`, which the stages with parameters do not have in their common state either
    (all of theirs is sharded), so that Megatron's check that every rank's common state equals rank 0's holds."""
    state = type(inner).sharded_state_dict(inner, *args, **kwargs)
    if not state.get("param_state"):
        state.pop("param_state", None)
    return state


def chain_step(optimizer) -> float:
    """The optimizer steps taken by the chain's optimizers that hold parameters (0 before the first step), read where
    Adam keeps it: torch's AdamW in each parameter's state, TE/apex FusedAdam in each param group. The per-parameter
    count is read first: after a resume torch's param groups also hold a `step` (Megatron's load passes the saved
    groups through), which AdamW never advances."""
    holders = [inner.optimizer for inner in optimizer.chained_optimizers
               if any(group["params"] for group in inner.optimizer.param_groups)]
    for adam in holders:
        for state in adam.state.values():
            if "step" in state:
                return float(state["step"])
    for adam in holders:
        for group in adam.param_groups:
            if group["params"] and "step" in group:
                return float(group["step"])
    return 0.0


def _state_dict_without_parameters(inner: DistributedOptimizer, step: float) -> dict[str, Any]:
    torch_state = inner.optimizer.state_dict()
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "step": step}
              for group in torch_state["param_groups"]]
    return {"optimizer": {"param_groups": groups}}


# --------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """This rank's generators: Python, NumPy, torch (CPU and CUDA) and Megatron's tensor-parallel tracker."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rng_sharded_object(state: Optional[dict[str, Any]], world_size: int, rank: int) -> ShardedObject:
    """One object per global rank (restored only under the same layout: other layouts have other streams)."""
    return ShardedObject("rng_state", state, (world_size,), (rank,), replica_id=0)


# --------------------------------------------------------------------------------------------- common


def layout_of(trainer) -> dict[str, int]:
    layout = trainer.layout
    return {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "ep": layout.ep,
            "vpp": trainer.config.parallel.virtual_pipeline_model_parallel_size or 1}


def with_absolute_data_paths(config: Config) -> Config:
    """The config with its data files (blend prefixes, tokenizer, cache) resolved against the working directory,
    where training validated them: the checkpoint's configs (config.yaml and the common state's) then name them
    from anywhere (`umtrain convert` or `umtrain evaluate` run elsewhere find the tokenizer and data)."""
    d = config.data

    def absolute(path: str | None) -> str | None:
        return os.path.abspath(path) if path else path

    def blend(paths: list[str] | None, key: str) -> list[str] | None:
        if not paths or d.mock:      # a mock run's data paths are not read, nor checked at load
            return paths
        prefixes, weights = split_blend(paths, key)
        if weights is None:
            return [absolute(prefix) for prefix in prefixes]
        return [item for weight, prefix in zip(paths[0::2], prefixes) for item in (weight, absolute(prefix))]

    data = dataclasses.replace(d, data_path=blend(d.data_path, "data.data_path"),
                               valid_data_path=blend(d.valid_data_path, "data.valid_data_path"),
                               tokenizer_model=absolute(d.tokenizer_model), cache_path=absolute(d.cache_path))
    return dataclasses.replace(config, data=data)


def common_state(trainer) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "contents": list(FULL_CONTENTS), "iteration": trainer.iteration,
            "consumed_samples": trainer.consumed_samples, "config": to_dict(with_absolute_data_paths(trainer.config)),
            "layout": layout_of(trainer), "padded_vocab_size": trainer.vocab_size,
            "history": dataclasses.asdict(trainer.history), "train_samples": trainer.train_samples,
            "next_sample": next_samples_fingerprint(trainer.datasets[0], trainer.consumed_samples)}


def save_state_dict(trainer) -> dict[str, Any]:
    model_state = model_sharded_state_dict(trainer)
    return {**model_state, **common_state(trainer),
            "optimizer": optimizer_sharded_state_dict(trainer, model_state, is_loading=False),
            "rng_state": rng_sharded_object(rng_state(), trainer.layout.world_size, trainer.layout.rank)}


def load_state_dict_template(trainer, contents, load_optimizer: bool, load_rng: bool) -> dict[str, Any]:
    """What to ask `dist_checkpointing.load` for: this layout's shards of the saved tensors."""
    model_state = model_sharded_state_dict(trainer, tensors_only="model_extra_state" not in contents)
    template: dict[str, Any] = dict(model_state)
    if load_optimizer:
        prepare_optimizer_for_load(trainer.optimizer)
        template["optimizer"] = optimizer_sharded_state_dict(trainer, model_state, is_loading=True)
    if load_rng:
        template["rng_state"] = rng_sharded_object(None, trainer.layout.world_size, trainer.layout.rank)
    return template


def restore_trainer(trainer, loaded: dict[str, Any], load_optimizer: bool, load_rng: bool) -> None:
    from umtrain.train.runner import History

    load_model_state(trainer, loaded)
    if load_optimizer:
        load_optimizer_state(trainer.optimizer, loaded["optimizer"])
    if load_rng:
        set_rng_state(loaded["rng_state"])
    trainer.iteration = int(loaded["iteration"])
    trainer.consumed_samples = int(loaded["consumed_samples"])
    history = loaded.get("history") or {}
    trainer.history = History(**{k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in history.items()})


def sync_params_before_save(trainer) -> None:
    """With overlap_param_gather the parameters are stale until the next forward (CPU notes gotcha 6), and so are
    the TDQKR factors computed from them, whose refresh waits for that forward."""
    if trainer.config.parallel.overlap_param_gather:
        for chunk in trainer.model:
            chunk.start_param_sync(force_sync=True)
        for memory in trainer.memory_layers:
            memory.run_pending_tdqkr_refresh()


def same_layout(saved: dict[str, int], trainer) -> bool:
    return saved == layout_of(trainer)

