"""`umtrain generate`: where it runs the model, which tokenizer it picks, and what it says about a bad checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from umtrain.checkpoint.convert import (PORTABLE_META, load_portable, portable_to_megatron, portable_tokenizer,
                                        read_portable, write_megatron, write_portable)
from umtrain.cli.generate import generate
from umtrain.cli.main import main
from umtrain.config import config_from_dict
from umtrain.config.base import to_dict
from umtrain.data.tokenizer import load_tokenizer
from umtrain.model.reference import ModelArgs, ReferenceGPT

WORDS = ["[UNK]", "once", "upon", "a", "time", "<|endoftext|>", "there", "was"]


def word_tokenizer(path):
    """A tiny Hugging Face tokenizer.json: one id per word, `<|endoftext|>` (id 5) the end of document."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def portable(path, model_section=None, data=None):
    """A small random portable checkpoint; `model_section` overrides the dense default, `data` the data section (its
    tokenizer_model is the one the checkpoint ships)."""
    model = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, **(model_section or {})}
    config = config_from_dict({"model": model, "data": {"mock": True, "seq_length": 16, **(data or {})}},
                              check_files=False)
    torch.manual_seed(0)
    reference = ReferenceGPT(ModelArgs.from_config(config, vocab_size=64)).eval()
    write_portable(path, reference.state_dict(), to_dict(config), {"iteration": 1})
    return path, reference


def hf_data(tokenizer):
    return {"tokenizer_type": "huggingface", "tokenizer_model": str(tokenizer)}


def greedy(model, prompt, steps, vocab_size=None, eod=None):
    """Full forwards of the whole sequence: the independent reference of `generate`'s cached decoding."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1, :vocab_size].argmax()))
            if tokens[-1] == eod:
                break
    return tokens


def text_of(ids, tokenizer_path):
    return load_tokenizer("huggingface", tokenizer_path).detokenize(ids)


def test_a_triton_trained_memory_model_generates_on_cpu(tmp_path, monkeypatch, capsys):
    """The kernel is the training run's speed choice, not the model: a portable whose config says
    `lookup_impl: triton` loads and decodes on a CPU machine (and `auto`, on a GPU machine, runs a CPU table)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pkm = {"family": "pkm", "memory": {"num_values": 64, "value_dim": 32, "key_dim": 8, "num_heads": 2, "topk": 4,
                                       "placements": ["2:2"], "lookup_impl": "reference"}}
    tokenizer = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    path, reference = portable(tmp_path / "pkm", pkm, hf_data(tokenizer))
    tensors, config, meta = read_portable(path)
    config["model"]["memory"]["lookup_impl"] = "triton"
    shutil.rmtree(path)
    write_portable(path, tensors, config, meta)
    model, loaded = load_portable(path)
    assert loaded.model.memory.lookup_impl == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)      # a GPU machine; the model stays on CPU
    assert generate(model, [1, 2, 3], 4, 16) == greedy(reference, [1, 2, 3], 4)
    monkeypatch.undo()
    assert main(["generate", str(path), "--prompt", "once upon a", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    expected = text_of(greedy(reference, [1, 2, 3], 4, len(WORDS), eod=5), tokenizer)
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_ultramem_model_generates_on_the_gpu_what_it_generates_on_the_cpu(tmp_path, capsys):
    ultramem = {"family": "ultramem", "memory": {"num_values": 64, "value_dim": 16, "key_dim": 8, "num_heads": 2,
                                                 "topk": 4, "placements": ["1:2"]}}
    tokenizer = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    path, _ = portable(tmp_path / "ultramem", ultramem, hf_data(tokenizer))
    texts = []
    for device in ("cpu", "cuda"):
        assert main(["generate", str(path), "--prompt", "once upon a", "--max-new-tokens", "6",
                     "--device", device]) == 0
        texts.append(capsys.readouterr().out.strip())
    assert texts[0] and texts[1] == texts[0]


def test_device_option_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, message in (("cuda", "has no CUDA device"), ("gpu0", "is not a torch device")):
        assert main(["generate", str(tmp_path / "missing"), "--prompt", "x", "--device", device]) == 2
        assert message in capsys.readouterr().err


def test_tokenizer_type_follows_the_tokenizer_path(tmp_path, capsys):
    """A config saying sentencepiece, a tokenizer.json (or its directory) passed with --tokenizer: read as HF."""
    path, reference = portable(tmp_path / "portable", data={"tokenizer_type": "sentencepiece"})
    tokenizer = word_tokenizer(tmp_path / "hf" / "tokenizer.json")
    expected = text_of(greedy(reference, [1, 2], 3, len(WORDS), eod=5), tokenizer)
    for given in (tokenizer, tokenizer.parent):
        assert main(["generate", str(path), "--prompt", "once upon", "--max-new-tokens", "3",
                     "--tokenizer", str(given)]) == 0, capsys.readouterr().err
        assert capsys.readouterr().out.strip() == expected


def test_a_portable_without_its_tokenizer_falls_back_to_the_config_and_names_what_it_tried(tmp_path, capsys):
    configured = word_tokenizer(tmp_path / "configured" / "tokenizer.json")
    path, _ = portable(tmp_path / "portable", data=hf_data(configured))
    assert portable_tokenizer(path) == path / "tokenizer" / "tokenizer.json"
    shutil.rmtree(path / "tokenizer")                   # copied without its tokenizer/ directory
    assert portable_tokenizer(path) is None
    assert main(["generate", str(path), "--prompt", "once", "--max-new-tokens", "1"]) == 0, capsys.readouterr().err
    configured.unlink()
    assert main(["generate", str(path), "--prompt", "once", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert str(path / "tokenizer") in err and f"names {configured}, which is not here" in err
    assert main(["generate", str(path), "--prompt", "once", "--tokenizer", str(tmp_path / "nope.json")]) == 2
    assert f"--tokenizer {tmp_path / 'nope.json'} does not exist" in capsys.readouterr().err
    assert json.loads((path / PORTABLE_META).read_text())["tokenizer"] == "tokenizer/tokenizer.json"


def test_names_a_missing_path_and_a_moe_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nonexistent"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'nonexistent'} does not exist" in err and "convert it first" not in err
    path, _ = portable(tmp_path / "portable")
    tensors, config, meta = read_portable(path)
    moe = {**config, "model": {**config["model"], "family": "moe", "moe": {"num_experts": 2}}}
    meta = {**meta, "consumed_samples": 0, "padded_vocab_size": 64}
    write_megatron(tmp_path / "moe", portable_to_megatron(tensors, 4), moe, meta)
    assert main(["generate", str(tmp_path / "moe"), "--prompt", "x"]) == 2
    assert "MoE models cannot be decoded" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_tokenizer_type_of(tmp_path, name):
    from umtrain.checkpoint.convert import tokenizer_type_of

    expected = "sentencepiece" if name.endswith(".model") else "huggingface"
    assert tokenizer_type_of(tmp_path / name, "other") == expected
    assert tokenizer_type_of(tmp_path, "sentencepiece") == "huggingface"           # a directory: tokenizer.json
    assert tokenizer_type_of(tmp_path / "vocab.bin", "sentencepiece") == "sentencepiece"


def test_a_hugging_face_tokenizer_travels_through_hf_export_and_import(tmp_path, capsys):
    """portable -> hf copies tokenizer.json and takes eos/bos from it; an HF model (no umtrain config) with a
    tokenizer.json imports as a portable shipping it, read as a Hugging Face tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = word_tokenizer(tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    path, _ = portable(tmp_path / "portable", data=hf_data(tokenizer))
    assert main(["convert", str(path), str(tmp_path / "exported"), "--to", "hf"]) == 0
    hf_config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert hf_config["eos_token_id"] == hf_config["bos_token_id"] == WORDS.index("<|endoftext|>")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "tok" / name).read_bytes()

    hf_dir = tmp_path / "hub-model"
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, hidden_act="gelu", use_parallel_residual=False,
                                     max_position_embeddings=16)).save_pretrained(hf_dir)
    shutil.copy(tokenizer, hf_dir / "tokenizer.json")
    assert main(["convert", str(hf_dir), str(tmp_path / "imported"), "--to", "portable"]) == 0
    imported = tmp_path / "imported"
    assert portable_tokenizer(imported).read_bytes() == tokenizer.read_bytes()
    _, config = load_portable(imported)
    assert config.data.tokenizer_type == "huggingface"
    model, _ = load_portable(imported)
    expected = text_of(greedy(model, [1, 2], 3, len(WORDS), eod=5), tokenizer)
    capsys.readouterr()
    for extra in ([], ["--tokenizer", str(hf_dir / "tokenizer.json")]):
        assert main(["generate", str(imported), "--prompt", "once upon", "--max-new-tokens", "3", *extra]) == 0, \
            capsys.readouterr().err
        assert capsys.readouterr().out.strip() == expected
