"""Build Megatron-Core GPT model chunks for any family from the typed config."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from umtrain.config import Config
from umtrain.config.base import ConfigError
from umtrain.model.memory_block import attach_skip_bus
from umtrain.model.specs import layer_specs
from umtrain.parallel.state import backend_for


def padded_vocab_size(config: Config, tokenizer_vocab: int) -> int:
    """Megatron's padding: a multiple of make_vocab_size_divisible_by x TP (unless model.vocab_size is set)."""
    if config.model.vocab_size is not None:
        if config.model.vocab_size < tokenizer_vocab:
            raise ConfigError("model.vocab_size", f"{config.model.vocab_size} is smaller than the tokenizer's "
                                                  f"{tokenizer_vocab} ids")
        return config.model.vocab_size
    multiple = config.model.make_vocab_size_divisible_by * config.parallel.tensor_model_parallel_size
    return -(-tokenizer_vocab // multiple) * multiple


def transformer_config(config: Config) -> TransformerConfig:
    m, p = config.model, config.parallel
    dtype = config.training.params_dtype()
    moe = {}
    if m.family == "moe":
        moe = dict(num_moe_experts=m.moe.num_experts, moe_router_topk=m.moe.moe_router_topk,
                   moe_aux_loss_coeff=m.moe.moe_aux_loss_coeff, moe_router_load_balancing_type="aux_loss",
                   moe_ffn_hidden_size=m.moe_ffn_size,
                   moe_token_dispatcher_type=m.moe.moe_token_dispatcher_type, moe_grouped_gemm=False,
                   # top-1 routing needs the softmax before the top-k: a softmax over one selected logit is 1 and
                   # gives the router no gradient (Megatron-Core refuses top-1 without it)
                   moe_router_pre_softmax=m.moe.moe_router_topk == 1)
    recompute = {}
    if config.training.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=config.training.recompute_num_layers)
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_size,
        num_attention_heads=m.num_attention_heads,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        add_bias_linear=m.linear_bias,
        activation_func=F.gelu,
        gated_linear_unit=False,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        # Memory tables use the expert-parallel group through parallel_state only; MCore's config reserves EP for MoE.
        expert_model_parallel_size=p.expert_model_parallel_size if m.family == "moe" else 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,  # sets the TP attributes; values are then replaced by umtrain.model.init
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # gloo's batched isend/irecv corrupts the interleaved (virtual) pipeline's gradients: plain p2p there.
        batch_p2p_comm=backend_for(config) == "nccl",
        hetereogenous_dist_checkpoint=True,  # per-layer checkpoint keys: memory layers live in some layers only
        **moe,
        **recompute,
    )


def build_model_chunk(config: Config, tconfig: TransformerConfig, vocab_size: int, vp_stage: Optional[int],
                      memory_factory=None, aux_loss_scale: float = 1.0, memory_runner=None) -> GPTModel:
    pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=layer_specs(config, tconfig, vp_stage, memory_factory, aux_loss_scale),
        vocab_size=vocab_size,
        max_sequence_length=config.data.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_percent=config.model.rotary_percent,
        rotary_base=config.model.rotary_base,
        vp_stage=vp_stage,
    )
    attach_skip_bus(model, memory_runner)
    return model
