"""Weight-layout maps (Megatron <-> portable <-> Hugging Face) and the reference model against transformers."""

from __future__ import annotations

import torch

from umtrain.checkpoint.hf import gpt_neox_config, with_explicit_biases_and_head
from umtrain.config import config_from_dict
from umtrain.model.reference import ModelArgs, ReferenceGPT
from umtrain.model.state_dict_adapter import (
    fuse_qkv,
    hf_to_portable,
    megatron_to_portable,
    portable_to_hf,
    portable_to_megatron,
    split_qkv,
)

HEADS, HEAD_DIM, HIDDEN = 4, 8, 32


def test_split_qkv_follows_megatrons_per_head_interleaving():
    fused = torch.randn(3 * HEADS * HEAD_DIM, HIDDEN)
    q, k, v = split_qkv(fused, HEADS)
    for head in range(HEADS):
        block = fused[head * 3 * HEAD_DIM:(head + 1) * 3 * HEAD_DIM]      # (q_h, k_h, v_h) rows
        rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        assert torch.equal(q[rows], block[:HEAD_DIM])
        assert torch.equal(k[rows], block[HEAD_DIM:2 * HEAD_DIM])
        assert torch.equal(v[rows], block[2 * HEAD_DIM:])
    assert torch.equal(fuse_qkv(q, k, v, HEADS), fused)


def _config(**model):
    return config_from_dict({"model": {"num_layers": 2, "hidden_size": HIDDEN, "num_attention_heads": HEADS, **model},
                             "data": {"mock": True, "seq_length": 16}}, check_files=False)


def _random_reference(config) -> ReferenceGPT:
    torch.manual_seed(0)
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=64))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if param.dim() == 1 else 0.0))
    return model.eval()


def test_key_maps_round_trip_through_megatron_and_hf():
    tensors = _random_reference(_config(untie_embeddings_and_output_weights=True)).state_dict()
    megatron = portable_to_megatron(tensors, HEADS)
    assert "decoder.layers.1.self_attention.linear_qkv.weight" in megatron
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in megatron
    back = megatron_to_portable(megatron, HEADS)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    hf = portable_to_hf(tensors, HEADS)
    assert "gpt_neox.layers.1.attention.query_key_value.bias" in hf and "lm_head.weight" in hf
    again = hf_to_portable(hf, HEADS)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_reference_model_matches_transformers_gpt_neox():
    from transformers import GPTNeoXForCausalLM

    config = _config(rotary_percent=0.5, rotary_base=5000)
    model = _random_reference(config)
    tensors = with_explicit_biases_and_head(model.state_dict(), config)
    hf_model = GPTNeoXForCausalLM(gpt_neox_config(config, vocab_size=64)).eval()
    hf_model.load_state_dict(portable_to_hf(tensors, HEADS), strict=True)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = model(tokens)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
