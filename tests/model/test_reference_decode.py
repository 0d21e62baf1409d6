"""Incremental decoding of the reference model (`DecodeCache`) against a full forward of the whole sequence."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from umtrain.config import config_from_dict
from umtrain.model.reference import DecodeCache, ModelArgs, ReferenceGPT, causal_mask

MEMORY = {"num_values": 64, "value_dim": 8, "key_dim": 8, "num_heads": 2, "topk": 4}
FAMILIES = {
    "dense": {"family": "dense"},
    "ultramem-conv5": {"family": "ultramem", "memory": {**MEMORY, "ive_expansion": 4, "tucker_rank": 2,
                                                        "num_cores": 2, "query_conv_kernel": 5,
                                                        "placements": ["1:2", "3:3"]}},
    "pkm": {"family": "pkm", "memory": {**MEMORY, "value_dim": 32, "placements": ["2:2"]}},   # PKM: d_v = hidden
}


@functools.lru_cache(maxsize=None)
def reference_model(family: str) -> ReferenceGPT:
    """Built once per family (the memory layers' initialisation is the slow part); decoding changes no weight."""
    model = FAMILIES[family]
    config = config_from_dict({"model": {"num_layers": 3, "hidden_size": 32, "num_attention_heads": 4, **model},
                               "data": {"mock": True, "seq_length": 32}}, check_files=False)
    torch.manual_seed(0)
    return ReferenceGPT(ModelArgs.from_config(config, vocab_size=64)).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("chunks", [[6, 1, 1, 1, 1], [4, 3, 1, 2], [1, 1, 1, 1, 1, 1]])
def test_cached_decoding_gives_the_full_forwards_logits(family, chunks):
    model = reference_model(family)
    tokens = torch.randint(0, 64, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache, start, pieces = DecodeCache(), 0, []
        for size in chunks:
            pieces.append(model(tokens[:, start:start + size], cache))
            start += size
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_on_the_gpu_gives_the_cpu_full_forwards_logits(family):
    """`umtrain generate --device cuda`: the memory layers' lookup runs its CUDA path, the cache lives on the GPU."""
    model = reference_model(family)
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        full = model(tokens)
        gpu_model = copy.deepcopy(model).cuda()
        cache = DecodeCache()
        pieces = [gpu_model(tokens[:, :5].cuda(), cache)]
        pieces += [gpu_model(tokens[:, i:i + 1].cuda(), cache) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(pieces, dim=1).cpu(), full, rtol=1e-4, atol=1e-4)


def test_causal_mask_of_a_continuation():
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)   # 2 new queries after 2 cached keys
    assert torch.equal(causal_mask(2, 4, torch.device("cpu")), expected)
