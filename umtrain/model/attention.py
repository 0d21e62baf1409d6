"""Core attention through `torch.nn.functional.scaled_dot_product_attention`.

Drop-in for the local spec's `DotProductAttention` (same inputs [s, b, heads, head_dim], output [s, b, hidden]):
on an H200 swapping only this module raised a 680M GPT from 16% to 40% MFU (docs/benchmarks/gpu_training.md).
Causal by default; a batch's `attention_mask` (Megatron's convention: bool [b, 1, s, s], True = masked, causal
included), as `data.reset_attention_mask` builds one per document, replaces it. SDPA's flash kernel takes no mask,
so masked batches run on the memory-efficient kernel. Packed sequences stay with Megatron's module.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPACoreAttention supports causal masks only, got {attn_mask_type}")
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support packed sequences or attention bias")
        seq, batch, heads, head_dim = query.shape
        if key.shape[2] != heads:
            repeat = heads // key.shape[2]
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))    # [b, heads, s, d]
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=allowed is None,
                                             scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
