"""`umtrain convert` between portable and Hugging Face forms, and `generate`, on a small random model (no Megatron)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from umtrain.checkpoint import manager
from umtrain.checkpoint.state import with_absolute_data_paths
from umtrain.checkpoint.convert import (config_of, load_portable, portable_to_megatron, read_megatron_common,
                                        read_portable, write_megatron, write_portable)
from umtrain.checkpoint.hf import is_linear_bias
from umtrain.cli.generate import generate
from umtrain.cli.main import main
from umtrain.config import config_from_dict
from umtrain.config.base import to_dict
from umtrain.data.tokenizer import MockTokenizer, load_tokenizer
from umtrain.model.reference import ModelArgs, ReferenceGPT


def portable_checkpoint(path):
    config = config_from_dict({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4},
                               "data": {"mock": True, "seq_length": 16}}, check_files=False)
    torch.manual_seed(0)
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=64))
    meta = {"iteration": 7, "consumed_samples": 56, "padded_vocab_size": 64}
    return write_portable(path, model.state_dict(), to_dict(config), meta), model.eval()


def test_convert_portable_to_hf_and_back_is_lossless(tmp_path, capsys):
    portable, _ = portable_checkpoint(tmp_path / "portable")
    assert main(["convert", str(portable), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    eod = MockTokenizer(config_of(read_portable(portable)[1]).data.mock_vocab_size).eod
    assert hf_config["eos_token_id"] == hf_config["bos_token_id"] == eod       # HF generate stops at the EOD
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "portable"]) == 0
    before, config_before, _ = read_portable(portable)
    after, config_after, _ = read_portable(tmp_path / "back")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert config_after["model"] == config_before["model"]
    assert main(["convert", str(portable), str(tmp_path / "hf"), "--to", "hf"]) == 2
    assert "exists" in capsys.readouterr().err
    for source, form in ((portable, "portable"), (tmp_path / "hf", "hf")):
        assert main(["convert", str(source), str(tmp_path / f"again-{form}"), "--to", form]) == 2
        assert f"is already a {form} checkpoint" in capsys.readouterr().err


def test_generate_is_greedy_and_stops_at_eod(tmp_path):
    portable, model = portable_checkpoint(tmp_path / "portable")
    loaded, config = load_portable(portable)
    prompt = [1, 2, 3]
    ids = generate(loaded, prompt, max_new_tokens=5, context=config.data.seq_length)
    expected = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            expected.append(int(model(torch.tensor([expected]))[0, -1].argmax()))
    assert ids == expected
    assert generate(loaded, prompt, 5, 16, top_k=1, generator=torch.Generator().manual_seed(0)) == expected
    for tiny in (1e-45, 1e-300):                                 # underflows to greedy, no nan
        assert generate(loaded, prompt, 5, 16, top_k=50, temperature=tiny,
                        generator=torch.Generator().manual_seed(0)) == expected
    assert generate(loaded, prompt, 5, 16, eod=expected[3]) == expected[:4]
    window = list(prompt)                     # past a context of 4 tokens: each from the last 4, recomputed
    with torch.no_grad():
        for _ in range(8):
            window.append(int(model(torch.tensor([window[-4:]]))[0, -1].argmax()))
    assert generate(loaded, prompt, max_new_tokens=8, context=4) == window


@pytest.mark.parametrize("extra,message", [(["--max-new-tokens", "0"], "--max-new-tokens"),
                                           (["--top-k", "-3"], "--top-k"),
                                           (["--top-k", "20", "--temperature", "0"], "--temperature must be"),
                                           (["--top-k", "20", "--temperature", "nan"], "--temperature must be"),
                                           (["--top-k", "20", "--temperature", "inf"], "--temperature must be"),
                                           (["--temperature", "0.7"], "--temperature applies to sampling only"),
                                           (["--prompt", ""], "--prompt is empty")])
def test_generate_refuses_bad_arguments_before_loading(tmp_path, capsys, extra, message):
    argv = ["generate", str(tmp_path / "no-such-checkpoint"), "--prompt", "x", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_names_a_checkpoint_that_is_not_portable(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a portable checkpoint" in capsys.readouterr().err


def test_hf_import_refuses_a_config_that_would_drop_weights(tmp_path, capsys):
    """Without the exported umtrain config, `--config` describes the HF model: a family with memory layers, a
    config without biases where the HF model has nonzero ones, or other rotary or norm settings would write a
    checkpoint that is not the model."""
    portable, _ = portable_checkpoint(tmp_path / "portable")
    state = {k: v + 0.01 if is_linear_bias(k) else v for k, v in read_portable(portable)[0].items()}
    _, config, meta = read_portable(portable)
    biased = write_portable(tmp_path / "biased", state, config, meta)
    assert main(["convert", str(biased), str(tmp_path / "hf"), "--to", "hf"]) == 0
    (tmp_path / "hf" / "umtrain_config.json").unlink()
    sizes = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    cases = {"model.family": {**sizes, "family": "ultramem", "memory": {"placements": ["1:2"]}},
             "model.add_bias_linear": {**sizes, "add_bias_linear": False},
             "rope_theta=10000.0, the umtrain config 500.0": {**sizes, "rotary_base": 500},
             "partial_rotary_factor=1.0, the umtrain config 0.5": {**sizes, "rotary_percent": 0.5},
             "layer_norm_eps": {**sizes, "layernorm_epsilon": 0.01},
             "model.normalization": {**sizes, "normalization": "RMSNorm"}}
    for key, model_section in cases.items():
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({"model": model_section, "data": {"mock": True, "seq_length": 16}}))
        out = tmp_path / f"out-{key}"
        assert main(["convert", str(tmp_path / "hf"), str(out), "--to", "portable", "--config", str(path)]) == 2
        assert key in capsys.readouterr().err and not out.exists()


def test_a_portable_checkpoint_carries_its_tokenizer(demo_dataset, tmp_path, monkeypatch, capsys):
    """The saved config names the tokenizer relative to the training run's directory; `generate` from anywhere else
    must still find it, in the checkpoint."""
    monkeypatch.chdir(demo_dataset.parent)
    relative = f"{demo_dataset.name}/tokenizer.model"
    config = config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
                               "data": {"data_path": [f"{demo_dataset.name}/api_docs_text_document"],
                                        "tokenizer_model": relative, "seq_length": 16}}, check_files=False)
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=1024))
    portable = write_portable(tmp_path / "portable", model.state_dict(), to_dict(config), {"iteration": 1})
    monkeypatch.chdir(tmp_path)
    assert main(["generate", str(portable), "--prompt", "Once upon", "--max-new-tokens", "3"]) == 0, \
        capsys.readouterr().err
    assert (portable / "tokenizer" / "tokenizer.model").read_bytes() == (demo_dataset / "tokenizer.model").read_bytes()


def saved_gpt_neox(path, **config):
    """A small random GPTNeoX without an exported umtrain config, saved to `path`; the model, in eval mode."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hf_config = GPTNeoXConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, hidden_act="gelu", use_parallel_residual=False,
                              max_position_embeddings=16, **config)
    torch.manual_seed(0)
    hf_model = GPTNeoXForCausalLM(hf_config).eval()
    hf_model.save_pretrained(path)
    return hf_model


def test_a_tied_hugging_face_model_converts_tied_and_keeps_its_logits(tmp_path, capsys):
    """A GPTNeoX with tie_word_embeddings (no lm_head in its weights) and no exported umtrain config."""
    hf_model = saved_gpt_neox(tmp_path / "tied", tie_word_embeddings=True)
    assert main(["convert", str(tmp_path / "tied"), str(tmp_path / "portable"), "--to", "portable"]) == 0
    model, config = load_portable(tmp_path / "portable")
    assert not config.model.untie_embeddings_and_output_weights
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=1e-5, atol=1e-5)
    untied = tmp_path / "untied.yaml"
    untied.write_text(yaml.safe_dump({"model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                                                "ffn_hidden_size": 64, "rotary_percent": 0.25,
                                                "untie_embeddings_and_output_weights": True},
                                      "data": {"mock": True, "seq_length": 16}}))
    out = tmp_path / "refused"
    assert main(["convert", str(tmp_path / "tied"), str(out), "--to", "portable", "--config", str(untied)]) == 2
    assert "model.untie_embeddings_and_output_weights" in capsys.readouterr().err and not out.exists()


def test_hugging_face_attention_without_bias_rope_defaults_and_scaling(tmp_path, capsys):
    """GPTNeoX with `attention_bias: false` wrote a checkpoint nothing could load; a config without a rotary
    fraction means transformers' 0.25, not 1; scaled RoPE has no umtrain counterpart (it converted, silently
    another model)."""
    hf_model = saved_gpt_neox(tmp_path / "hf", attention_bias=False)
    config_json = tmp_path / "hf" / "config.json"
    written = json.loads(config_json.read_text())
    rope = written.pop("rope_parameters", None) or {}
    written.pop("rotary_pct", None)
    written["rope_parameters"] = {k: v for k, v in rope.items() if k != "partial_rotary_factor"}
    config_json.write_text(json.dumps(written))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "portable"), "--to", "portable"]) == 0
    model, config = load_portable(tmp_path / "portable")
    assert config.model.rotary_percent == 0.25
    tokens = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, rtol=1e-5, atol=1e-5)
    written["rope_parameters"] = {**written["rope_parameters"], "rope_type": "linear", "factor": 4.0}
    config_json.write_text(json.dumps(written))
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "scaled"), "--to", "portable"]) == 2
    assert "rope scaling 'linear' has no umtrain counterpart" in capsys.readouterr().err
    assert not (tmp_path / "scaled").exists()


def test_generate_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, demo_dataset, capsys):
    portable, _ = portable_checkpoint(tmp_path / "portable")          # 64 tokens; the demo tokenizer has 1024
    assert main(["generate", str(portable), "--prompt", "hello", "--tokenizer",
                 str(demo_dataset / "tokenizer.model")]) == 2
    assert "--tokenizer: " in capsys.readouterr().err


def test_convert_names_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out"), "--to", "megatron"]) == 2
    assert "holds no valid umtrain checkpoint" in capsys.readouterr().err
    portable, _ = portable_checkpoint(tmp_path / "portable")
    tensors, config, meta = read_portable(portable)
    moe = {**config, "model": {**config["model"], "family": "moe", "moe": {"num_experts": 2}}}
    moe_checkpoint = write_megatron(tmp_path / "moe-megatron", portable_to_megatron(tensors, 4), moe, meta)
    assert main(["convert", str(moe_checkpoint), str(tmp_path / "moe-out"), "--to", "portable"]) == 2
    assert "is a MoE model" in capsys.readouterr().err and not (tmp_path / "moe-out").exists()


def relative_demo_config(demo_dataset):
    """A config naming the demo data and tokenizer relative to demo_dataset's parent (the run's directory)."""
    return config_from_dict({"model": {"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4},
                             "data": {"data_path": ["0.5", f"{demo_dataset.name}/api_docs_text_document", "1",
                                                    f"{demo_dataset.name}/api_docs_text_document"],
                                      "tokenizer_model": f"{demo_dataset.name}/tokenizer.model",
                                      "cache_path": "cache", "seq_length": 16}}, check_files=False)


def test_a_checkpoints_saved_config_names_its_data_files_absolutely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = relative_demo_config(Path("demo"))
    data = with_absolute_data_paths(config).data
    prefix = str(tmp_path / "demo" / "api_docs_text_document")
    assert data.data_path == ["0.5", prefix, "1", prefix]
    assert data.tokenizer_model == str(tmp_path / "demo" / "tokenizer.model")
    assert data.cache_path == str(tmp_path / "cache") and data.valid_data_path is None
    unweighted = config_from_dict({"data": {"data_path": ["a", "/b"], "valid_data_path": ["v"], "mock": False,
                                            "tokenizer_model": "t.model"}}, check_files=False)
    data = with_absolute_data_paths(unweighted).data
    assert data.data_path == [str(tmp_path / "a"), "/b"] and data.valid_data_path == [str(tmp_path / "v")]
    assert config.data.tokenizer_model == "demo/tokenizer.model"        # the run's own config is left alone
    mock = config_from_dict({"data": {"mock": True, "data_path": ["0", "stale", "1", "b"]}}, check_files=False)
    assert with_absolute_data_paths(mock).data.data_path == ["0", "stale", "1", "b"]   # not read, not refused


def test_converting_from_another_directory_ships_the_tokenizer(demo_dataset, tmp_path, monkeypatch, caplog):
    """A run's relative data paths are saved absolute (its common state and config.yaml, as the trainer saves them),
    so conversion from another directory finds the tokenizer. A tokenizer that is nowhere is named in a warning."""
    monkeypatch.chdir(demo_dataset.parent)
    config = relative_demo_config(demo_dataset)
    torch.manual_seed(0)
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=1024))
    meta = {"iteration": 3, "consumed_samples": 24, "padded_vocab_size": 1024}
    saved = to_dict(with_absolute_data_paths(config))
    checkpoint = write_megatron(tmp_path / "iter_3", portable_to_megatron(model.state_dict(), 4), saved, meta)
    manager.write_file_atomically(checkpoint / manager.CONFIG_FILE, yaml.safe_dump(saved, sort_keys=False))
    manager.write_manifest(checkpoint, 3)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["convert", str(checkpoint), str(tmp_path / "portable"), "--to", "portable"]) == 0
    shipped = tmp_path / "portable" / "tokenizer" / "tokenizer.model"
    assert shipped.read_bytes() == (demo_dataset / "tokenizer.model").read_bytes()
    tensors, config_dict, _ = read_portable(tmp_path / "portable")
    with caplog.at_level(logging.WARNING, logger="umtrain"):
        write_portable(tmp_path / "without", tensors, to_dict(config), {"iteration": 3})
    assert f"the config names tokenizer {config.data.tokenizer_model}, which is not here" in caplog.text
    assert not (tmp_path / "without" / "tokenizer").exists()


def test_a_moved_portable_keeps_its_tokenizer_through_megatron_and_hf(demo_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_dataset.parent)
    config = relative_demo_config(demo_dataset)
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=1024))
    write_portable(tmp_path / "portable", model.state_dict(), to_dict(config), {"iteration": 1})
    moved = Path(shutil.move(tmp_path / "portable", tmp_path / "moved"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    original = (demo_dataset / "tokenizer.model").read_bytes()
    eod = load_tokenizer("sentencepiece", demo_dataset / "tokenizer.model").eod
    assert eod != 0

    assert main(["convert", str(moved), str(tmp_path / "megatron"), "--to", "megatron"]) == 0
    in_megatron = tmp_path / "megatron" / "tokenizer" / "tokenizer.model"
    assert in_megatron.read_bytes() == original
    assert read_megatron_common(tmp_path / "megatron")["config"]["data"]["tokenizer_model"] == str(in_megatron)
    assert main(["convert", str(tmp_path / "megatron"), str(tmp_path / "again"), "--to", "portable"]) == 0
    assert (tmp_path / "again" / "tokenizer" / "tokenizer.model").read_bytes() == original

    assert main(["convert", str(moved), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["eos_token_id"] == hf_config["bos_token_id"] == eod
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == original


def test_training_from_a_portable_or_hf_checkpoint_names_the_conversion(tmp_path, monkeypatch, capsys):
    """`--resume` of a converted checkpoint said only "no valid checkpoint"."""
    from tests.distributed import tiny_config
    from umtrain.parallel.comm import free_port

    portable, _ = portable_checkpoint(tmp_path / "portable")
    assert main(["convert", str(portable), str(tmp_path / "hf"), "--to", "hf"]) == 0
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(training={"train_iters": 1})))
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    for source, name in ((portable, "a portable"), (tmp_path / "hf", "a Hugging Face")):
        capsys.readouterr()
        assert main(["train", "--config", str(path), "--resume", str(source)]) == 2
        assert (f"checkpoint.load: no valid checkpoint in {source} ({source} is {name} checkpoint: `umtrain convert "
                f"{source} OUT --to megatron`") in capsys.readouterr().err
