"""Tokenizers for pretraining: a SentencePiece `.model` or a Hugging Face `tokenizer.json`.

Both are wrapped as `megatron.core.tokenizers.MegatronTokenizerBase` so Megatron-Core's GPTDataset can use them
directly: it reads `vocab_size`, `eod` and the JSON-serialisable `unique_identifiers` (part of the hash that names
its cached sample indices).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Literal

import sentencepiece
import tokenizers
from megatron.core.tokenizers import MegatronTokenizerBase

from umtrain.config.base import ConfigError
from umtrain.config.validate import tokenizer_json
from umtrain.data.readers import iter_texts, resolve_inputs

TokenizerType = Literal["sentencepiece", "huggingface"]
TrainKind = Literal["sentencepiece", "bpe"]

BPE_EOD_TOKEN = "<|endoftext|>"
EOD_CANDIDATES = (BPE_EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]")
"""Names tried, in order, for the end-of-document token of a tokenizer.json without a tokenizer_config.json."""

SENTENCEPIECE_MAX_LINE_BYTES = 4192
"""SentencePiece's trainer drops longer sentences; training feeds it lines of documents, long ones in pieces."""


class Tokenizer(MegatronTokenizerBase):
    """The interface umtrain needs: `tokenize`, `detokenize`, `vocab_size`, `eod`, `unique_identifiers`."""

    def __init__(self, path: str | os.PathLike, kind: TokenizerType):
        super().__init__(str(path), {})
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("kind", kind), ("tokenizer_path", str(Path(path).resolve())),
             ("md5", _file_md5(path))])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("pretraining tokenizers carry no chat template")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; its `</s>` (eos) piece is the end-of-document token."""

    def __init__(self, path: str | os.PathLike):
        try:
            self._model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as err:
            raise ConfigError(str(path), f"cannot load as a SentencePiece model: {err}") from err
        if self._model.eos_id() < 0:
            raise ConfigError(str(path), "the SentencePiece model has no eos piece to serve as end-of-document token")
        super().__init__(path, "sentencepiece")

    @property
    def vocab_size(self) -> int:
        return self._model.get_piece_size()

    @property
    def eod(self) -> int:
        return self._model.eos_id()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._model.id_to_piece(i): i for i in range(self.vocab_size)}

    def tokenize(self, text: str) -> list[int]:
        return self._model.encode(text)

    def detokenize(self, ids) -> str:
        return self._model.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (or a folder holding one). The end-of-document token is the `eos_token` of a
    tokenizer_config.json beside it, else the first of `EOD_CANDIDATES` in the vocabulary."""

    def __init__(self, path: str | os.PathLike):
        path = tokenizer_json(Path(path))
        try:
            self._model = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:
            raise ConfigError(str(path), f"cannot load as a Hugging Face tokenizer.json: {err}") from err
        self._encode_whole_documents_as_text()
        self._eod = _find_eod(self._model, path)
        self._vocab_size = max(self.vocab.values()) + 1      # not the token count: ids may leave gaps
        super().__init__(path, "huggingface")

    def _encode_whole_documents_as_text(self) -> None:
        """A tokenizer.json can carry truncation or padding (transformers saves them after a truncating call),
        which would cut or pad every document; and text that spells a special token (`<|endoftext|>` in a document
        about tokenizers) would become that token, an EOD in the middle of a document. Documents are encoded whole,
        as text."""
        self._model.no_truncation()
        self._model.no_padding()
        self._model.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        """Ids are below it."""
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab(self) -> dict[str, int]:
        return self._model.get_vocab(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._model.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        return self._model.decode([int(i) for i in ids], skip_special_tokens=False)


class MockTokenizer:
    """What Megatron's MockGPTDataset reads of a tokenizer: `vocab_size` ids, the last one the EOD."""

    def __init__(self, vocab_size: int):
        if vocab_size < 2:
            raise ConfigError("data.mock_vocab_size", f"must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", vocab_size)])


def load_tokenizer(tokenizer_type: TokenizerType, path: str | os.PathLike) -> Tokenizer:
    if not Path(path).exists():
        raise ConfigError(str(path), "tokenizer model not found")
    if tokenizer_type == "sentencepiece":
        return SentencePieceTokenizer(path)
    if tokenizer_type == "huggingface":
        return HuggingFaceTokenizer(path)
    raise ConfigError("tokenizer_type", f"must be 'sentencepiece' or 'huggingface', got {tokenizer_type!r}")


def train_tokenizer(inputs: list[str], output: str, kind: TrainKind, vocab_size: int, text_key: str = "text",
                    overwrite: bool = False) -> str:
    """Train on the documents of JSONL/Parquet `inputs`; returns the written `.model` / `tokenizer.json` path.

    `output` is a file path: `NAME.model` (sentencepiece; `.model` is appended when missing, with `NAME.vocab`
    beside it) or a tokenizer.json path (bpe). An existing tokenizer there is replaced only with `overwrite`: data
    tokenized with it would silently stop matching.
    """
    if vocab_size < 300:
        raise ConfigError("vocab_size", f"must be >= 300 (256 byte pieces plus merges), got {vocab_size}")
    for path in _written_files(Path(output), kind):
        if path.is_dir():
            raise ConfigError("output", f"{path} is a directory; name the tokenizer file to write")
        if path.exists() and not overwrite:
            raise ConfigError("output", f"{path} exists; pass --overwrite to replace it (data tokenized with it "
                                        "would no longer match)")
    files = resolve_inputs(inputs, text_key)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    documents = (text for path in files for _, text in iter_texts(path, text_key))
    if kind == "sentencepiece":
        return _train_sentencepiece(documents, Path(output), vocab_size)
    if kind == "bpe":
        return _train_byte_level_bpe(documents, Path(output), vocab_size)
    raise ConfigError("kind", f"must be 'sentencepiece' or 'bpe', got {kind!r}")


def _written_files(output: Path, kind: str) -> list[Path]:
    if kind != "sentencepiece":
        return [output]
    prefix = output.with_name(output.name.removesuffix(".model"))
    return [prefix.with_name(prefix.name + ".model"), prefix.with_name(prefix.name + ".vocab")]


def _train_sentencepiece(documents: Iterator[str], output: Path, vocab_size: int) -> str:
    """A BPE SentencePiece model that round-trips any text: identity normalisation, whitespace kept as is,
    unknown characters as byte pieces."""
    prefix = output.with_name(output.name.removesuffix(".model"))
    input_errors: list[Exception] = []
    try:
        _train_sentencepiece_from(_lines_for_sentencepiece(documents, input_errors), prefix, vocab_size)
    except RuntimeError as err:
        if input_errors:                 # a bad record: SentencePiece re-raised it as its own RuntimeError
            raise input_errors[0] from None
        if "Vocabulary size" in str(err):
            raise ConfigError("vocab_size", f"{vocab_size} is too large for this corpus: {err}") from None
        if "sentences_.empty()" in str(err):
            raise ConfigError("inputs", "no document has a line with text to train on") from None
        raise
    return str(prefix) + ".model"


def _train_sentencepiece_from(lines: Iterator[str], prefix: Path, vocab_size: int) -> None:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines,
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        input_sentence_size=2_000_000,
        shuffle_input_sentence=True,
        max_sentence_length=SENTENCEPIECE_MAX_LINE_BYTES,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )


def _lines_for_sentencepiece(documents: Iterator[str], errors: list[Exception]) -> Iterator[str]:
    """The documents' non-empty lines; an error reading them is also kept in `errors`, since SentencePiece turns
    whatever its iterator raises into a RuntimeError of its own."""
    try:
        for text in documents:
            for line in text.split("\n"):
                if line.strip():
                    yield from pieces_of_at_most(line, SENTENCEPIECE_MAX_LINE_BYTES)
    except Exception as err:
        errors.append(err)
        raise


def pieces_of_at_most(line: str, limit: int) -> Iterator[str]:
    """`line` in pieces of at most `limit` UTF-8 bytes, cut at the last space within the limit (between characters
    where there is none), so that long lines (a paragraph of CJK text is ~4.5 KB) still reach SentencePiece's
    trainer, which would drop them whole. Linear in the line's length."""
    data = line.encode("utf-8")
    start = 0
    while len(data) - start > limit:
        end = start + limit
        while data[end] & 0xC0 == 0x80:        # never inside a character: back to its first byte
            end -= 1
        space = data.rfind(b" ", start + 1, end + 1)
        cut = space if space > start else end
        yield data[start:cut].decode("utf-8")
        start = cut
        while start < len(data) and data[start] == 0x20:
            start += 1
    if data[start:].strip():
        yield data[start:].decode("utf-8")


def _train_byte_level_bpe(documents: Iterator[str], output: Path, vocab_size: int) -> str:
    """GPT-2-style byte-level BPE with `<|endoftext|>` as its only special token (id 0)."""
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_EOD_TOKEN], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    model.train_from_iterator(documents, trainer=trainer)
    model.save(str(output))
    return str(output)


def _find_eod(model: tokenizers.Tokenizer, path: Path) -> int:
    config_path = path.parent / "tokenizer_config.json"
    names = list(EOD_CANDIDATES)
    if config_path.is_file():
        try:
            eos = json.loads(config_path.read_text()).get("eos_token")
        except (json.JSONDecodeError, OSError, AttributeError) as err:
            raise ConfigError(str(config_path), f"cannot read its eos_token: {err}") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if eos:
            names = [eos]
    for name in names:
        token_id = model.token_to_id(name)
        if token_id is not None:
            return token_id
    raise ConfigError(str(path), f"no end-of-document token: none of {names} is in the vocabulary")


def _file_md5(path: str | os.PathLike) -> str:
    return hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
