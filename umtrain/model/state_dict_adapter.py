"""Key and layout maps between the three forms of a model's weights:

- Megatron: the canonical `dist_checkpointing` keys of umtrain's GPTModel (`decoder.layers.{i}.self_attention.
  linear_qkv.weight`, norms as `...linear_qkv.layer_norm_weight`), full (unsharded) tensors, global layer numbers;
- portable: `umtrain.model.reference.ReferenceGPT`'s state dict (`layers.{i}.attention.wq.weight`, ...);
- Hugging Face `GPTNeoXForCausalLM` (dense models only).

Megatron's fused QKV interleaves per head: rows [h*3d : (h+1)*3d] are (q_h, k_h, v_h), each of head_dim rows.
GPTNeoX's `query_key_value` uses the same per-head interleaving, so it is Megatron's tensor as is.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

Tensors = dict[str, torch.Tensor]

Rule = tuple[str, str]
_FIELDS = {"layer": r"(?P<layer>\d+)", "p": r"(?P<p>weight|bias)", "name": r"(?P<name>.+)"}

MEGATRON_PORTABLE: list[Rule] = [
    ("embedding.word_embeddings.weight", "tok_embeddings.weight"),
    ("decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_{p}", "layers.{layer}.attention_norm.{p}"),
    ("decoder.layers.{layer}.self_attention.linear_proj.{p}", "layers.{layer}.attention.wo.{p}"),
    ("decoder.layers.{layer}.mlp.linear_fc1.layer_norm_{p}", "layers.{layer}.ffn_norm.{p}"),
    ("decoder.layers.{layer}.mlp.linear_fc1.{p}", "layers.{layer}.feed_forward.w1.{p}"),
    ("decoder.layers.{layer}.mlp.linear_fc2.{p}", "layers.{layer}.feed_forward.w2.{p}"),
    ("decoder.layers.{layer}.memory.{name}", "layers.{layer}.memory.{name}"),
    ("decoder.final_layernorm.{p}", "norm.{p}"),
    ("output_layer.weight", "output.weight"),
]
HF_PORTABLE: list[Rule] = [
    ("gpt_neox.embed_in.weight", "tok_embeddings.weight"),
    ("gpt_neox.layers.{layer}.input_layernorm.{p}", "layers.{layer}.attention_norm.{p}"),
    ("gpt_neox.layers.{layer}.attention.dense.{p}", "layers.{layer}.attention.wo.{p}"),
    ("gpt_neox.layers.{layer}.post_attention_layernorm.{p}", "layers.{layer}.ffn_norm.{p}"),
    ("gpt_neox.layers.{layer}.mlp.dense_h_to_4h.{p}", "layers.{layer}.feed_forward.w1.{p}"),
    ("gpt_neox.layers.{layer}.mlp.dense_4h_to_h.{p}", "layers.{layer}.feed_forward.w2.{p}"),
    ("gpt_neox.final_layer_norm.{p}", "norm.{p}"),
    ("lm_head.weight", "output.weight"),
]
_PORTABLE_QKV = re.compile(r"layers\.(\d+)\.attention\.w([qkv])\.(weight|bias)")


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(part) if i % 2 == 0 else _FIELDS[part] for i, part in enumerate(parts)))


def _rename(key: str, rules: list[Rule], forward: bool) -> str:
    """Rename by the first rule whose source template matches (left -> right if forward, else right -> left)."""
    for left, right in rules:
        source, target = (left, right) if forward else (right, left)
        match = _regex(source).fullmatch(key)
        if match:
            return target.format(**match.groupdict())
    raise ValueError(f"no mapping for weight {key!r}")


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head interleaved [3*H*d, ...] -> q, k, v each [H*d, ...]."""
    grouped = fused.reshape(num_heads, 3, fused.shape[0] // (3 * num_heads), *fused.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *fused.shape[1:]) for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    grouped = [t.reshape(num_heads, t.shape[0] // num_heads, *t.shape[1:]) for t in (q, k, v)]
    return torch.stack(grouped, dim=1).reshape(-1, *q.shape[1:])


def _map(tensors: Tensors, num_heads: int, fused_name: Callable[[str, str], str], rename: Callable[[str], str]) -> Tensors:
    """Rename every tensor; split each fused QKV tensor (named like `fused_name`) into portable q, k, v."""
    out: Tensors = {}
    for key, tensor in tensors.items():
        match = _regex(fused_name("{layer}", "{p}")).fullmatch(key)
        if match:
            layer, kind = match.groups()
            for name, part in zip("qkv", split_qkv(tensor, num_heads)):
                out[f"layers.{layer}.attention.w{name}.{kind}"] = part
        else:
            out[rename(key)] = tensor
    return out


def _unmap(tensors: Tensors, num_heads: int, fused_name: Callable[[str, str], str],
           rename: Callable[[str], str]) -> Tensors:
    """Inverse of `_map`: fuse portable q, k, v into one tensor named `fused_name(layer, kind)`."""
    out: Tensors = {}
    for key, tensor in tensors.items():
        match = _PORTABLE_QKV.fullmatch(key)
        if match is None:
            out[rename(key)] = tensor
        elif match.group(2) == "q":
            layer, _, kind = match.groups()
            parts = [tensors[f"layers.{layer}.attention.w{n}.{kind}"] for n in "qkv"]
            out[fused_name(layer, kind)] = fuse_qkv(*parts, num_heads)
    return out


def _megatron_qkv(layer: str, kind: str) -> str:
    return f"decoder.layers.{layer}.self_attention.linear_qkv.{kind}"


def _hf_qkv(layer: str, kind: str) -> str:
    return f"gpt_neox.layers.{layer}.attention.query_key_value.{kind}"


def megatron_to_portable(tensors: Tensors, num_heads: int) -> Tensors:
    return _map(tensors, num_heads, _megatron_qkv, lambda k: _rename(k, MEGATRON_PORTABLE, forward=True))


def portable_to_megatron(tensors: Tensors, num_heads: int) -> Tensors:
    return _unmap(tensors, num_heads, _megatron_qkv, lambda k: _rename(k, MEGATRON_PORTABLE, forward=False))


def portable_to_hf(tensors: Tensors, num_heads: int) -> Tensors:
    if any(".memory." in key for key in tensors):
        raise ValueError("memory layers have no Hugging Face GPTNeoX equivalent: only dense models export to HF")
    return _unmap(tensors, num_heads, _hf_qkv, lambda k: _rename(k, HF_PORTABLE, forward=False))


def hf_to_portable(tensors: Tensors, num_heads: int) -> Tensors:
    """Also reads checkpoints of transformers < 5, whose output matrix was `embed_out`."""
    tensors = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in tensors.items()
               if not k.endswith(("attention.bias", "attention.masked_bias"))}
    return _map(tensors, num_heads, _hf_qkv, lambda k: _rename(k, HF_PORTABLE, forward=True))
