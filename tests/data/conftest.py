"""Shared fixtures of the data tests: the demo corpus, small tokenizers of both kinds, a 1-process gloo group."""

from __future__ import annotations

from pathlib import Path

import pytest

from umtrain.data.demo_corpus import build_demo_corpus
from umtrain.data.tokenizer import load_tokenizer, train_tokenizer
from umtrain.parallel.state import process_group_of_one

TOKENIZER_VOCAB = 1000


@pytest.fixture(scope="session")
def tokenizer_vocab() -> int:
    return TOKENIZER_VOCAB


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> list[Path]:
    return build_demo_corpus(str(tmp_path_factory.mktemp("demo") / "jsonl"))


@pytest.fixture(scope="session")
def module_docs(demo_corpus) -> Path:
    """The smallest demo source (~200 KB): enough text for a tokenizer of 1000 pieces."""
    return next(p for p in demo_corpus if p.stem == "module_docs")


@pytest.fixture(scope="session")
def sentencepiece_model(module_docs, tmp_path_factory) -> str:
    return train_tokenizer([str(module_docs)], str(tmp_path_factory.mktemp("sp") / "tok.model"), "sentencepiece",
                           TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def bpe_json(module_docs, tmp_path_factory) -> str:
    return train_tokenizer([str(module_docs)], str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"), "bpe",
                           TOKENIZER_VOCAB)


@pytest.fixture(scope="session")
def sp_tokenizer(sentencepiece_model):
    return load_tokenizer("sentencepiece", sentencepiece_model)


@pytest.fixture(scope="module")
def process_group():
    """Megatron's dataset builder holds barriers: a 1-process gloo group, unless a test already made one. Module
    scope: the group is gone before the next test file runs (making one takes milliseconds)."""
    with process_group_of_one():
        yield
