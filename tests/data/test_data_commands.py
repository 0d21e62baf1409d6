import argparse
import json
import shutil
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from umtrain.cli import data_commands
from umtrain.config.base import ConfigError
from umtrain.config.schema import Config
from umtrain.data.datasets import build_gpt_datasets
from umtrain.data import demo_corpus as demo_corpus_module
from umtrain.data.demo_corpus import SOURCES
from umtrain.data.tokenizer import load_tokenizer


def run(*argv) -> int:
    parser = argparse.ArgumentParser(prog="umtrain")
    data_commands.register(parser.add_subparsers(required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def copy_files(paths, out_dir):
    Path(out_dir).mkdir(parents=True)
    return [Path(shutil.copy(path, out_dir)) for path in paths]


def token_count(prefix: str) -> int:
    dataset = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its memory map
    return int(dataset.sequence_lengths.sum())


@pytest.mark.usefixtures("process_group")
def test_demo_data_layout_feeds_the_trainer(demo_corpus, tmp_path, capsys, monkeypatch):
    """The whole command, except that the corpus (tested on its own) is copied from the session's build."""
    monkeypatch.setattr(demo_corpus_module, "build_demo_corpus", lambda out_dir: copy_files(demo_corpus, out_dir))
    out = tmp_path / "demo"
    assert run("demo-data", "--out", str(out), "--vocab-size", "2000", "--workers", "2") == 0
    printed = capsys.readouterr().out
    tokenizer = load_tokenizer("sentencepiece", str(out / "tokenizer.model"))
    assert tokenizer.vocab_size == 2000
    blend = (out / "blend.txt").read_text().split()
    prefixes = blend[1::2]
    assert prefixes == [str((out / f"{s}_text_document").resolve()) for s in SOURCES]
    tokens = [token_count(p) for p in prefixes]
    assert [float(w) for w in blend[0::2]] == pytest.approx([t / sum(tokens) for t in tokens], abs=1e-4)
    assert f"data_path: {json.dumps(blend)}" in printed

    config = Config()
    config.data.data_path = blend
    config.data.split = "98,2,0"
    train, valid, test = build_gpt_datasets(config, tokenizer, 64, 8, 0)
    assert len(train) >= 64 and len(valid) >= 8 and test is None
    assert train[0]["tokens"].shape == (config.data.seq_length,)


def test_demo_data_refuses_to_overwrite(tmp_path):
    (tmp_path / "blend.txt").write_text("")
    with pytest.raises(ConfigError, match="holds a demo dataset already.*pass --overwrite"):
        run("demo-data", "--out", str(tmp_path))


def test_preprocess_reports_a_bad_line_and_exits_2(sentencepiece_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    status = run("preprocess", "--input", str(bad), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-type", "sentencepiece", "--tokenizer-model", sentencepiece_model, "--workers", "1")
    assert status == 2
    assert f"{bad}, line 2: the record has no 'text' field" in capsys.readouterr().err


def test_preprocess_and_train_tokenizer_commands(module_docs, tmp_path, capsys):
    assert run("train-tokenizer", "--input", str(module_docs), "--output", str(tmp_path / "tok.json"),
               "--kind", "bpe", "--vocab-size", "600") == 0
    assert "vocab_size=600" in capsys.readouterr().out
    assert run("preprocess", "--input", str(module_docs), "--output-prefix", str(tmp_path / "md"),
               "--tokenizer-type", "huggingface", "--tokenizer-model", str(tmp_path / "tok.json"),
               "--workers", "1", "--no-append-eod") == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dataset = IndexedDataset(str(tmp_path / "md"))
    assert stats["documents"] == len(dataset) and stats["tokens"] == token_count(str(tmp_path / "md"))
    assert 0 not in dataset[0]


@pytest.mark.parametrize("kind,name", [("sentencepiece", "tok.model"), ("sentencepiece", "tok.vocab"),
                                       ("bpe", "tokenizer.json")])
def test_train_tokenizer_refuses_to_replace_a_tokenizer(module_docs, tmp_path, kind, name):
    """Data already tokenized with it would silently stop matching: only --overwrite replaces it."""
    existing = tmp_path / name
    existing.write_text("the user's tokenizer")
    output = tmp_path / ("tok.model" if kind == "sentencepiece" else "tokenizer.json")
    with pytest.raises(ConfigError, match="--overwrite") as info:
        run("train-tokenizer", "--input", str(module_docs), "--output", str(output), "--kind", kind,
            "--vocab-size", "400")
    assert info.value.key == "output" and existing.read_text() == "the user's tokenizer"


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_train_tokenizer_names_a_bad_record_without_a_traceback(tmp_path, capsys, kind):
    """SentencePiece re-raises its iterator's errors as RuntimeError: the record's own error must come through."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line"}\n{"text": oops}\n')
    assert run("train-tokenizer", "--input", str(bad), "--output", str(tmp_path / "tok.model"), "--kind", kind,
               "--vocab-size", "300") == 2
    assert "bad.jsonl, line 2: not valid JSON" in capsys.readouterr().err
