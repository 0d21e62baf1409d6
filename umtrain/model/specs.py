"""Layer specs for the four model families: dense, MoE, PKM and UltraMem, all from Megatron-Core's local spec
(with SDPA core attention, sequence-parallel-aware norms and a final norm).

Memory families differ from dense only in which layers are `MemoryTransformerLayer`s (readers and writers of
`a:b` placements); MoE swaps the MLP for Megatron-Core's MoE layer. Core attention is SDPA in every family.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from umtrain.config import Config
from umtrain.model.attention import SDPACoreAttention
from umtrain.model.memory_block import MemoryTransformerLayer
from umtrain.model.norm import norm_class


def base_layer_spec(config: Config) -> ModuleSpec:
    model = config.model
    num_experts = model.moe.num_experts if model.family == "moe" else None
    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=model.normalization)
    norm = norm_class(model.normalization)
    attention = spec.submodules.self_attention
    attention_submodules = dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    submodules = dataclasses.replace(spec.submodules, input_layernorm=norm, pre_mlp_layernorm=norm,
                                     self_attention=dataclasses.replace(attention, submodules=attention_submodules))
    return dataclasses.replace(spec, submodules=submodules)


def memory_roles(config: Config) -> dict[int, tuple[bool, Optional[int]]]:
    """1-based layer -> (is reader, reader layer whose memory this layer writes) for every memory placement."""
    roles: dict[int, tuple[bool, Optional[int]]] = {}
    for a, b in config.model.memory.parsed_placements("model.memory"):
        roles[a] = (True, roles.get(a, (False, None))[1])
        roles[b] = (roles.get(b, (False, None))[0], a)
    return roles


def layer_specs(config: Config, transformer_config, vp_stage: Optional[int],
                memory_factory: Optional[Callable], aux_loss_scale: float = 1.0) -> TransformerBlockSubmodules:
    """One spec per layer of this pipeline chunk (memory readers/writers where placements say so)."""
    base = base_layer_spec(config)
    offset = get_transformer_layer_offset(transformer_config, vp_stage=vp_stage)
    chunks = config.parallel.pipeline_model_parallel_size * (config.parallel.virtual_pipeline_model_parallel_size or 1)
    per_chunk = config.model.num_layers // chunks
    roles = memory_roles(config) if config.model.has_memory else {}
    specs = []
    for layer in range(offset + 1, offset + per_chunk + 1):
        if layer not in roles:
            specs.append(base)
            continue
        reader, writer_of = roles[layer]
        params = dict(base.params or {}, reader=reader, writer_of=writer_of, memory_factory=memory_factory,
                      aux_loss_scale=aux_loss_scale)
        specs.append(dataclasses.replace(base, module=MemoryTransformerLayer, params=params))
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=norm_class(config.model.normalization))
