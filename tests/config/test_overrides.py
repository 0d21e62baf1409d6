"""Overrides merge mappings into sections; keys and values get case-blind hints; dumps read back unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from umtrain.config import ConfigError, dump_config, load_config
from umtrain.config.loader import apply_overrides, config_from_dict, parse_yaml

MEMORY = {"placements": ["1:2", "3:4"], "num_values": 256, "value_dim": 16, "key_dim": 8, "num_heads": 2, "topk": 4}


@pytest.fixture
def ultramem_yaml(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({"data": {"mock": True}, "model": {"family": "ultramem", "memory": MEMORY},
                                    "optimizer": {"lr": 1e-3, "min_lr": 1e-4}}))
    return path


def test_a_mapping_override_keeps_the_sections_other_keys(ultramem_yaml):
    memory = load_config(ultramem_yaml, ["model.memory={topk: 8, share_query: false}"]).model.memory
    expected = dataclasses.replace(load_config(ultramem_yaml).model.memory, topk=8, share_query=False)
    assert memory == expected
    assert (memory.placements, memory.value_dim, memory.num_values) == (["1:2", "3:4"], 16, 256)


def test_mappings_merge_at_every_depth_and_lists_replace(ultramem_yaml):
    config = load_config(ultramem_yaml, ["model={hidden_size: 128, memory: {placements: ['2:3'], value_dim: 64}}",
                                         "optimizer={lr: 2e-3}"])
    assert config.model.family == "ultramem"
    assert (config.model.hidden_size, config.model.memory.placements) == (128, ["2:3"])
    assert (config.model.memory.value_dim, config.model.memory.num_values, config.model.memory.topk) == (64, 256, 4)
    assert (config.optimizer.lr, config.optimizer.min_lr) == (2e-3, 1e-4)


def test_null_clears_an_optional_section_and_a_mapping_then_starts_from_defaults(ultramem_yaml):
    assert load_config(ultramem_yaml, ["model.family=dense", "model.memory=null"]).model.memory is None
    memory = load_config(ultramem_yaml, ["model.memory=null", "model.memory={topk: 2}"]).model.memory
    default = load_config(None, ["data.mock=true", "model.family=ultramem", "model.memory={}"]).model.memory
    assert memory == dataclasses.replace(default, topk=2)


def test_a_merged_override_leaves_a_mapping_yaml_shares_through_an_alias_alone():
    data = parse_yaml("shared: &mem {topk: 4, num_values: 256}\nmodel: {family: ultramem, memory: *mem}\n")
    apply_overrides(data, ["model.memory={topk: 2}"])
    assert data["shared"] == {"topk": 4, "num_values": 256}
    assert data["model"]["memory"] == {"topk": 2, "num_values": 256}


def test_an_unknown_key_inside_a_merged_mapping_is_named(ultramem_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(ultramem_yaml, ["model.memory={topkk: 8}"])
    assert info.value.key == "model.memory.topkk"
    assert "did you mean 'topk'" in str(info.value)


def test_a_non_string_yaml_key_is_an_unknown_key(tmp_path):
    for text, key in (("model: {12: foo}\n", "model.12"), ("12: foo\n", "12")):
        path = tmp_path / "intkey.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert info.value.key == key
        assert "unknown key" in str(info.value)


@pytest.mark.parametrize("override, key, hint", [
    ("model.normalization=rmsnorm", "model.normalization", "RMSNorm"),
    ("data.tokenizer_type=SentencePiece", "data.tokenizer_type", "sentencepiece"),
    ("model.Hidden_Size=8", "model.Hidden_Size", "hidden_size"),
])
def test_hints_ignore_case(override, key, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.mock=true", override])
    assert info.value.key == key
    assert f"did you mean '{hint}'" in str(info.value)


NUMBER_LIKE = {"run_name": "1e3", "checkpoint.save": "1.5", "logging.wandb_project": "1:30",
               "logging.tensorboard_dir": "0755", "data.cache_path": ".inf"}


def test_number_like_strings_survive_a_dump_and_reload():
    overrides = ["data.mock=true", *(f"{key}='{value}'" for key, value in NUMBER_LIKE.items())]
    config = load_config(None, overrides, check_files=False)
    assert [config.run_name, config.checkpoint.save, config.logging.wandb_project, config.logging.tensorboard_dir,
            config.data.cache_path] == list(NUMBER_LIKE.values())
    text = dump_config(config)
    assert config_from_dict(parse_yaml(text), check_files=False) == config
    assert yaml.safe_load(text)["run_name"] == "1e3"                   # plain PyYAML (YAML 1.1) reads it the same
    assert yaml.safe_load(text)["logging"]["wandb_project"] == "1:30"


@pytest.mark.parametrize("override, key", [
    ("run_name=1.10", "run_name"),
    ("checkpoint.save=2.50", "checkpoint.save"),                     # Optional[str]
    ("logging.wandb_project=1e3", "logging.wandb_project"),
    ("data.tokenizer_model=[0.5]", "data.tokenizer_model"),
    ("model.memory.placements=[1.5]", "model.memory.placements[0]"),   # List[str]
])
def test_an_unquoted_float_for_a_string_is_refused_not_rewritten(override, key):
    """str(1.1) is '1.1', not the '1.10' written: `run_name=1.10` and `run_name=1.1` would share a checkpoint dir."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.mock=true", override], check_files=False)
    assert err.value.key == key


def test_an_unquoted_float_in_a_yaml_file_names_the_key_and_says_to_quote_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run_name: 1e3\ndata: {mock: true}\n")
    with pytest.raises(ConfigError, match=r"run_name: must be a string, got the number 1000\.0: .*quote it"):
        load_config(path, check_files=False)
    path.write_text("run_name: '1e3'\ndata: {mock: true}\n")
    assert load_config(path, check_files=False).run_name == "1e3"


def test_blend_weights_may_be_yaml_numbers():
    """A blend's weight is a number whatever its spelling (Megatron parses it): `[0.3, a, 0.7, b]` as written in YAML."""
    config = load_config(None, ["data.data_path=[0.3, a, 7, b]", "data.valid_data_path=[1e-1, c]",
                                "data.tokenizer_model=t.model"], check_files=False)
    assert config.data.data_path == ["0.3", "a", "7", "b"] and config.data.valid_data_path == ["0.1", "c"]


def test_integers_for_strings_are_kept_and_booleans_refused():
    config = load_config(None, ["data.mock=true", "run_name=10", "training.exit_signal=10"], check_files=False)
    assert (config.run_name, config.training.exit_signal) == ("10", "10")
    with pytest.raises(ConfigError, match="run_name: must be a string, got True"):
        load_config(None, ["data.mock=true", "run_name=true"], check_files=False)
