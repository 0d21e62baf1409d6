"""Dense umtrain models <-> Hugging Face `GPTNeoXForCausalLM` (sequential residual, GELU, RoPE on
`rotary_percent` of each head, LayerNorm everywhere): the same architecture, so the logits match."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch

from umtrain.checkpoint import manager
from umtrain.checkpoint.convert import (config_of, copy_tokenizer, portable_tokenizer, read_portable, reference_model,
                                        tokenizer_type_of, write_portable)
from umtrain.config import Config, config_from_dict, load_config
from umtrain.config.base import ConfigError, to_dict
from umtrain.model.reference import ModelArgs, ReferenceGPT
from umtrain.model.state_dict_adapter import Tensors, hf_to_portable, portable_to_hf


def check_exportable(config: Config, tensors: Tensors) -> None:
    m = config.model
    if m.family != "dense":
        raise ValueError(f"model.family {m.family!r}: only dense models export to Hugging Face GPTNeoX")
    if m.normalization != "LayerNorm":
        raise ValueError(f"model.normalization {m.normalization!r}: GPTNeoX uses LayerNorm")
    if "norm.weight" not in tensors:
        raise ValueError("the model has no final LayerNorm, which GPTNeoX always applies")


def end_of_document_id(config: Config, tokenizer: Optional[Path] = None) -> Optional[int]:
    """The training tokenizer's end-of-document id (HF's eos and bos, so that `generate` stops there): of
    `tokenizer` (the one a portable checkpoint ships), else of the config's; None when no tokenizer is at hand."""
    from umtrain.data.tokenizer import MockTokenizer, load_tokenizer

    d = config.data
    if tokenizer is not None:
        return load_tokenizer(tokenizer_type_of(tokenizer, d.tokenizer_type), str(tokenizer)).eod
    if d.mock:
        return MockTokenizer(d.mock_vocab_size).eod
    if d.tokenizer_model and Path(d.tokenizer_model).is_file():
        return load_tokenizer(d.tokenizer_type, d.tokenizer_model).eod
    return None


def gpt_neox_config(config: Config, vocab_size: int, tokenizer: Optional[Path] = None):
    from transformers import GPTNeoXConfig

    m = config.model
    eod = end_of_document_id(config, tokenizer)
    if eod is None:
        logging.getLogger("umtrain").warning("tokenizer %s not found: the HF config keeps GPTNeoX's default eos/bos "
                                             "ids", config.data.tokenizer_model)
    special = {} if eod is None else {"eos_token_id": eod, "bos_token_id": eod}
    return GPTNeoXConfig(**special,
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_size, hidden_act="gelu",
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base),
                         "partial_rotary_factor": m.rotary_percent},
        max_position_embeddings=config.data.seq_length, layer_norm_eps=m.layernorm_epsilon,
        use_parallel_residual=False, attention_bias=True, tie_word_embeddings=False,
        hidden_dropout=0.0, attention_dropout=0.0, torch_dtype="float32")


def with_explicit_biases_and_head(tensors: Tensors, config: Config) -> Tensors:
    """GPTNeoX always has biases and its own output matrix: zeros where umtrain has none, the tied embedding."""
    out = dict(tensors)
    if "output.weight" not in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    for key, tensor in tensors.items():
        bias = key[: -len("weight")] + "bias"
        if key.endswith(".weight") and is_linear_bias(bias):
            out.setdefault(bias, torch.zeros(tensor.shape[0], dtype=tensor.dtype))
    return out


def with_zero_biases_it_lacks(tensors: Tensors, config: Config) -> Tensors:
    """GPTNeoX with `attention_bias: false` has MLP biases but no attention ones, which umtrain's linear biases
    (all or none) need: a zero bias is the same layer."""
    args = ModelArgs.from_config(config, vocab_size=tensors["tok_embeddings.weight"].shape[0],
                                 final_norm="norm.weight" in tensors)
    with torch.device("meta"):
        expected = ReferenceGPT(args).state_dict()
    dtype = tensors["tok_embeddings.weight"].dtype
    missing = {k: torch.zeros(v.shape, dtype=dtype) for k, v in expected.items()
               if k not in tensors and is_linear_bias(k)}
    return {**tensors, **missing}


def is_linear_bias(key: str) -> bool:
    """A bias of an attention or MLP linear layer (portable keys); GPTNeoX has them even when umtrain has none."""
    return key.endswith(".bias") and (".attention.w" in key or ".feed_forward.w" in key)


def portable_to_hf_dir(source: Path, out: Path) -> Path:
    """The HF directory carries the portable's tokenizer beside the weights (tokenizer.json and its
    tokenizer_config.json, or the SentencePiece .model)."""
    from transformers import GPTNeoXForCausalLM

    tensors, config_dict, _ = read_portable(source)
    config = config_of(config_dict)
    check_exportable(config, tensors)
    if out.exists():
        raise FileExistsError(f"{out} exists; conversion never overwrites")
    tensors = with_explicit_biases_and_head(tensors, config)
    tokenizer = portable_tokenizer(source)
    hf_config = gpt_neox_config(config, tensors["tok_embeddings.weight"].shape[0], tokenizer)
    model = GPTNeoXForCausalLM(hf_config)
    hf_tensors = {k: v.clone() for k, v in portable_to_hf(tensors, config.model.num_attention_heads).items()}
    model.load_state_dict(hf_tensors, strict=True)
    with manager.staged_output(out) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / "umtrain_config.json").write_text(json.dumps(config_dict))
        copy_tokenizer(tokenizer, tmp, directory="")
    return out


def umtrain_config_for(hf_config: dict[str, Any], config_path: Optional[str], hf_dir: Path) -> Config:
    """The umtrain config of an HF GPTNeoX model: the one exported with it, or `--config`, checked against it."""
    if hf_config.get("model_type") != "gpt_neox" or hf_config.get("use_parallel_residual", True):
        raise ValueError(f"{hf_dir}: only GPTNeoX with use_parallel_residual=false converts to umtrain")
    if config_path is not None:
        config = load_config(config_path, check_files=False)
    elif (hf_dir / "umtrain_config.json").is_file():
        config = config_of(json.loads((hf_dir / "umtrain_config.json").read_text()))
    else:
        rope_base, rope_fraction = hf_rotary(hf_config)
        config = config_from_dict({
            "model": {"family": "dense", "num_layers": hf_config["num_hidden_layers"],
                      "hidden_size": hf_config["hidden_size"], "num_attention_heads": hf_config["num_attention_heads"],
                      "ffn_hidden_size": hf_config["intermediate_size"], "vocab_size": hf_config["vocab_size"],
                      "layernorm_epsilon": hf_config["layer_norm_eps"],
                      "untie_embeddings_and_output_weights": not hf_config.get("tie_word_embeddings", False),
                      "rotary_base": int(rope_base), "rotary_percent": rope_fraction},
            "data": {"mock": True, "seq_length": hf_config["max_position_embeddings"]}}, check_files=False)
    if config.model.family != "dense":
        raise ConfigError("model.family", f"{hf_dir} is a GPTNeoX model without memory or MoE layers; the umtrain "
                                          f"config says {config.model.family!r} (use a dense config)")
    m = config.model
    rope_base, rope_fraction = hf_rotary(hf_config)
    expected = {"num_hidden_layers": (hf_config["num_hidden_layers"], m.num_layers),
                "hidden_size": (hf_config["hidden_size"], m.hidden_size),
                "num_attention_heads": (hf_config["num_attention_heads"], m.num_attention_heads),
                "intermediate_size": (hf_config["intermediate_size"], m.ffn_size),
                "hidden_act": (hf_config.get("hidden_act", "gelu"), "gelu"),
                "rope_theta": (rope_base, float(m.rotary_base)),
                "partial_rotary_factor": (rope_fraction, m.rotary_percent),
                "layer_norm_eps": (hf_config["layer_norm_eps"], m.layernorm_epsilon)}
    for name, (hf_value, value) in expected.items():
        if hf_value != value:
            raise ValueError(f"{hf_dir}/config.json has {name}={hf_value}, the umtrain config {value}")
    if m.normalization != "LayerNorm":
        raise ConfigError("model.normalization", f"{hf_dir} is a GPTNeoX model (LayerNorm); the umtrain config says "
                                                 f"{m.normalization!r}")
    return config


GPTNEOX_ROTARY_FRACTION = 0.25
"""transformers' GPTNeoX rotates this fraction of each head when the config names none."""


def hf_rotary(hf_config: dict[str, Any]) -> tuple[float, float]:
    """(rope theta, fraction of each head rotated) of a GPTNeoX config: `rope_parameters` (transformers >= 5), or
    the older top-level `rotary_emb_base` / `rope_theta` and `rotary_pct`. Scaled RoPE (linear, dynamic, YaRN, ...)
    has no umtrain counterpart and is refused by name."""
    rope = hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf_config.get("rope_scaling"):
        scaling = rope.get("rope_type") if rope.get("rope_type", "default") != "default" else hf_config["rope_scaling"]
        raise ValueError(f"config.json: rope scaling {scaling!r} has no umtrain counterpart (RoPE without scaling "
                         f"only)")
    theta = rope.get("rope_theta", hf_config.get("rope_theta", hf_config.get("rotary_emb_base", 10000)))
    fraction = rope.get("partial_rotary_factor", hf_config.get("rotary_pct", GPTNEOX_ROTARY_FRACTION))
    return float(theta), float(fraction)


def hf_to_portable_dir(source: Path, out: Path, config_path: Optional[str] = None) -> Path:
    from safetensors.torch import load_file

    hf_config = json.loads((source / "config.json").read_text())
    config = umtrain_config_for(hf_config, config_path, source)
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{source} has no .safetensors weights")
    tensors = hf_to_portable({k: v for f in files for k, v in load_file(str(f)).items()},
                             config.model.num_attention_heads)
    if not config.model.untie_embeddings_and_output_weights:
        head = tensors.pop("output.weight", None)
        if head is not None and not torch.equal(head, tensors["tok_embeddings.weight"]):
            raise ConfigError("model.untie_embeddings_and_output_weights", f"{source} has an output head of its own; "
                              "a tied config would drop it: set it to true")
    elif "output.weight" not in tensors:
        raise ConfigError("model.untie_embeddings_and_output_weights", f"{source} has no output head of its own "
                          "(tied embeddings); an untied config would miss it: set it to false")
    if not config.model.linear_bias:
        dropped = [k for k, v in tensors.items() if is_linear_bias(k) and v.any()]
        if dropped:
            raise ConfigError("model.add_bias_linear", f"{source} has nonzero linear biases ({dropped[0]}, ...); "
                                                       "a config without them would drop them: set it to true")
        tensors = {k: v for k, v in tensors.items() if not is_linear_bias(k)}
    tensors = with_zero_biases_it_lacks(tensors, config)
    reference_model(tensors, config)     # every tensor the model needs, no other: an error now, not at load
    meta = {"iteration": 0, "consumed_samples": 0, "padded_vocab_size": tensors["tok_embeddings.weight"].shape[0],
            "source": str(source)}
    tokenizer = hf_tokenizer(source)
    config_dict = to_dict(config)
    if tokenizer is not None:
        config_dict["data"] = {**config_dict["data"], "tokenizer_model": str(tokenizer.resolve()),
                               "tokenizer_type": tokenizer_type_of(tokenizer, config.data.tokenizer_type)}
    return write_portable(out, tensors, config_dict, meta, tokenizer)


def hf_tokenizer(hf_dir: Path) -> Optional[Path]:
    """The tokenizer of an HF model directory: its tokenizer.json, else a SentencePiece .model (an umtrain export of
    a SentencePiece-trained model); None when it has neither."""
    candidates = [hf_dir / "tokenizer.json"] + sorted(hf_dir.glob("*.model"))
    return next((path for path in candidates if path.is_file()), None)
