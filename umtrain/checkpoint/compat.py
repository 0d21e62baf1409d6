"""Is a checkpoint's model the one the config describes? The first differing shape field, by name."""

from __future__ import annotations

from typing import Any, Optional

from umtrain.config import Config
from umtrain.config.base import ConfigError, to_dict

MODEL_SHAPE_FIELDS = ("family", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                      "untie_embeddings_and_output_weights", "normalization", "add_bias_linear")
MOE_SHAPE_FIELDS = ("num_experts", "moe_ffn_hidden_size")
MEMORY_SHAPE_FIELDS = ("placements", "num_values", "value_dim", "key_dim", "num_heads", "output_projection",
                       "share_query", "query_key_layernorm", "ive_expansion", "tucker_rank", "key_layout",
                       "num_cores", "query_conv_kernel")


def _resolved(model: dict[str, Any]) -> dict[str, Any]:
    """The model section with defaults that depend on other fields filled in (ffn_hidden_size = 4 * hidden; linear
    biases, which family 'moe' never has)."""
    model = dict(model)
    if model.get("ffn_hidden_size") is None:
        model["ffn_hidden_size"] = 4 * model["hidden_size"]
    if model.get("add_bias_linear") is None or model.get("family") == "moe":
        model["add_bias_linear"] = model.get("family") != "moe"
    return model


def first_shape_difference(saved: dict[str, Any], current: dict[str, Any]) -> Optional[tuple[str, Any, Any]]:
    """(dotted field, saved value, config value) of the first model field whose change alters a tensor shape."""
    saved, current = _resolved(saved), _resolved(current)
    for name in MODEL_SHAPE_FIELDS:
        if saved.get(name) != current.get(name):
            return f"model.{name}", saved.get(name), current.get(name)
    for section, names in (("moe", MOE_SHAPE_FIELDS), ("memory", MEMORY_SHAPE_FIELDS)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        if bool(old) != bool(new):
            return f"model.{section}", "set" if old else None, "set" if new else None
        for name in names if old else ():
            if old.get(name) != new.get(name):
                return f"model.{section}.{name}", old.get(name), new.get(name)
    return None


def check_model_shape(saved_config: dict[str, Any], saved_vocab: int, config: Config, vocab: int, path: str) -> None:
    """Raise ConfigError naming the field if the checkpoint at `path` cannot hold this config's model."""
    difference = first_shape_difference(saved_config["model"], to_dict(config.model))
    if difference is None and saved_vocab != vocab:
        raise ConfigError("model.vocab_size", f"checkpoint {path} was saved with a vocabulary padded to {saved_vocab}, "
                                              f"this run pads to {vocab}{_vocab_padding_hint(config, saved_vocab)}")
    if difference is not None:
        field, old, new = difference
        raise ConfigError(field, f"checkpoint {path} was saved with {old!r}, the config has {new!r}; "
                                 "the model shape differs (start a new run or restore the field)")


def _vocab_padding_hint(config: Config, saved_vocab: int) -> str:
    """The padding is a multiple of make_vocab_size_divisible_by x TP, so a new TP can change it."""
    tp = config.parallel.tensor_model_parallel_size
    if config.model.vocab_size is None and saved_vocab % tp == 0:
        return (f" (the padding is a multiple of make_vocab_size_divisible_by x TP): set model.vocab_size={saved_vocab} "
                f"to resume under TP={tp}")
    return ""
