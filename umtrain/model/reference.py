"""A single-process, pure-PyTorch GPT with the same math as umtrain's Megatron-Core model (torchtitan-style).

Pre-LN blocks, RoPE (rotate-half on the first `rotary_percent` of each head), GELU MLP, tied or untied
embeddings, and memory layers (`umtrain.model.memory.MemoryLayer`) at the configured `a:b` placements: block a's
pre-MLP norm output is the memory input, the memory output is added after block b. With the weights of a Megatron
checkpoint (through `umtrain.model.state_dict_adapter`) it gives the same logits; no process group, no Megatron.
Used by portable checkpoints, `umtrain generate` (incremental decoding with a `DecodeCache`) and the Hugging
Face comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from umtrain.config import Config
from umtrain.config.schema import MemoryConfig


@dataclass
class ModelArgs:
    """The model fields the reference implementation reads, all from the typed config (`from_config`)."""

    vocab_size: int
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    head_dim: int
    normalization: str
    norm_eps: float
    bias: bool
    rotary_base: int
    rotary_dim: int
    tied_embeddings: bool
    final_norm: bool
    memory: Optional[MemoryConfig]
    seed: int

    @classmethod
    def from_config(cls, config: Config, vocab_size: int, final_norm: bool = True) -> "ModelArgs":
        m = config.model
        if m.family == "moe":
            raise ValueError("model.family 'moe' has no reference implementation (dense, pkm and ultramem do)")
        return cls(vocab_size=vocab_size, num_layers=m.num_layers, hidden_size=m.hidden_size,
                   ffn_hidden_size=m.ffn_size, num_heads=m.num_attention_heads, head_dim=m.head_dim,
                   normalization=m.normalization, norm_eps=m.layernorm_epsilon, bias=m.linear_bias,
                   rotary_base=m.rotary_base, rotary_dim=m.rotary_dim,
                   tied_embeddings=not m.untie_embeddings_and_output_weights, final_norm=final_norm,
                   memory=m.memory if m.has_memory else None, seed=config.training.seed)

    def placements(self) -> list[tuple[int, int]]:
        """Sorted (reader, writer) 1-based layer pairs."""
        return sorted(self.memory.parsed_placements("model.memory")) if self.memory is not None else []


def make_norm(args: ModelArgs) -> nn.Module:
    if args.normalization == "RMSNorm":
        return nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
    return nn.LayerNorm(args.hidden_size, eps=args.norm_eps)


def rotary_tables(args: ModelArgs, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq, rot_dim] for positions 0..seq-1 (Megatron's RotaryEmbedding: cat(freqs, freqs))."""
    rot_dim = args.rotary_dim
    inv_freq = 1.0 / (args.rotary_base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, s, d]: rotate the first rot_dim channels, pass the rest."""
    rot_dim = cos.shape[-1]
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    rotated = rotated * cos.to(x.dtype) + rotate_half(rotated) * sin.to(x.dtype)
    return torch.cat((rotated, passed), dim=-1)


@dataclass
class DecodeCache:
    """What incremental decoding keeps between calls: every block's attention keys and values [b, heads, s, d] of
    the tokens so far, and every memory layer's last k-1 inputs [k-1, b, D] (its query conv's history)."""
    length: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    memory_inputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def extend_attention(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys and values; the whole sequence's come back."""
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def conv_history(self, reader: int, x: torch.Tensor, kernel: int) -> Optional[torch.Tensor]:
        """The k-1 memory inputs before x [s, b, D] (zeros before the sequence start), and x kept as the next call's."""
        if kernel < 2:
            return None
        history = self.memory_inputs.get(reader, x.new_zeros(kernel - 1, *x.shape[1:]))
        self.memory_inputs[reader] = torch.cat([history, x])[-(kernel - 1):]
        return history


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """[queries, keys] True where query i (the last `queries` positions of `keys`) may attend."""
    past = keys - queries
    return torch.arange(keys, device=device) <= past + torch.arange(queries, device=device)[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.head_dim = args.num_heads, args.head_dim
        self.wq = nn.Linear(args.hidden_size, args.hidden_size, bias=args.bias)
        self.wk = nn.Linear(args.hidden_size, args.hidden_size, bias=args.bias)
        self.wv = nn.Linear(args.hidden_size, args.hidden_size, bias=args.bias)
        self.wo = nn.Linear(args.hidden_size, args.hidden_size, bias=args.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[DecodeCache] = None, layer: int = 0) -> torch.Tensor:
        """x [b, s, D]; cos/sin of x's positions. With a cache, x follows the cached tokens and attends to them."""
        batch, seq, _ = x.shape
        q, k, v = (w(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.extend_attention(layer, k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = cache.extend_attention(layer, k, v)
            mask = None if seq == 1 else causal_mask(seq, k.shape[2], x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.hidden_size, args.ffn_hidden_size, bias=args.bias)
        self.w2 = nn.Linear(args.ffn_hidden_size, args.hidden_size, bias=args.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class TransformerBlock(nn.Module):
    """Pre-LN block `number` (1-based). A reader puts its pre-MLP norm output on the bus; a writer owns `memory`
    and adds its output, computed from its reader's bus entry, after its own MLP residual."""

    def __init__(self, args: ModelArgs, number: int, reads: bool, memory_reader: Optional[int]):
        super().__init__()
        self.number, self.reads, self.memory_reader = number, reads, memory_reader
        self.attention_norm = make_norm(args)
        self.attention = Attention(args)
        self.ffn_norm = make_norm(args)
        self.feed_forward = FeedForward(args)
        self.memory = memory_layer(args, memory_reader) if memory_reader is not None else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bus: dict[int, torch.Tensor],
                cache: Optional[DecodeCache] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, self.number)
        normed = self.ffn_norm(h)
        if self.reads:
            bus[self.number] = normed
        out = h + self.feed_forward(normed)
        if self.memory is not None:
            memory_input = bus.pop(self.memory_reader).transpose(0, 1)       # MemoryLayer is sequence-first
            history = None if cache is None else cache.conv_history(self.memory_reader, memory_input,
                                                                     self.memory.config.query_conv_kernel)
            out = out + self.memory(memory_input, history).transpose(0, 1)
        return out


def memory_layer(args: ModelArgs, reader: int) -> nn.Module:
    """The memory layer of the placement read at `reader` (its index in the sorted placements seeds it)."""
    from umtrain.model.memory import MemoryLayer

    index = [a for a, _ in args.placements()].index(reader)
    return MemoryLayer(args.memory, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed,
                       layer_index=index)


class ReferenceGPT(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        placements = args.placements()
        readers = {a for a, _ in placements}
        reader_of = {b: a for a, b in placements}
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args, n, n in readers, reader_of.get(n))
                                    for n in range(1, args.num_layers + 1))
        self.norm = make_norm(args) if args.final_norm else None
        self.output = None if args.tied_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cache: Optional[DecodeCache] = None) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, vocab]. With a `DecodeCache`, tokens continue the cached ones (positions
        from `cache.length` on), and the cache is extended by them."""
        past = 0 if cache is None else cache.length
        cos, sin = rotary_tables(self.args, past + tokens.shape[1], tokens.device)
        cos, sin = cos[past:], sin[past:]
        h = self.tok_embeddings(tokens)
        bus: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            h = layer(h, cos, sin, bus, cache)
        if cache is not None:
            cache.length += tokens.shape[1]
        if self.norm is not None:
            h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight)
