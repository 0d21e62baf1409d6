import json
import shutil

import pytest
import sentencepiece
import tokenizers

from umtrain.config.base import ConfigError
from umtrain.data.tokenizer import MockTokenizer, load_tokenizer

SAMPLES = [
    "def f(x):\n    return  x ** 2  # two spaces\n\n\tTabbed line\n",
    "Unicode: héllo wörld, 世界, emoji 🙂, a rare glyph ꙮ.",
    "   leading and trailing spaces   ",
]


@pytest.fixture(params=["sentencepiece", "huggingface"])
def tokenizer_and_reference(request, sentencepiece_model, bpe_json):
    """Our wrapper and the library's own object, loaded independently."""
    if request.param == "sentencepiece":
        reference = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
        encode, eod = reference.encode, reference.piece_to_id("</s>")
        return load_tokenizer("sentencepiece", sentencepiece_model), encode, eod
    reference = tokenizers.Tokenizer.from_file(bpe_json)
    encode, eod = (lambda text: reference.encode(text).ids), reference.token_to_id("<|endoftext|>")
    return load_tokenizer("huggingface", bpe_json), encode, eod


def test_vocab_eod_and_ids_match_the_library(tokenizer_and_reference, tokenizer_vocab):
    tokenizer, reference_encode, reference_eod = tokenizer_and_reference
    assert tokenizer.vocab_size == tokenizer_vocab
    assert tokenizer.eod == reference_eod
    assert len(tokenizer.vocab) == tokenizer_vocab
    for text in SAMPLES:
        assert tokenizer.tokenize(text) == reference_encode(text)


def test_text_round_trips_exactly(tokenizer_and_reference):
    """Both trained kinds are lossless: identity normalisation and byte fallback (SentencePiece), bytes (BPE)."""
    tokenizer = tokenizer_and_reference[0]
    for text in SAMPLES:
        ids = tokenizer.tokenize(text)
        assert tokenizer.eod not in ids
        assert tokenizer.detokenize(ids) == text


def test_unique_identifiers_name_the_file_and_its_content(tokenizer_and_reference, tmp_path):
    tokenizer = tokenizer_and_reference[0]
    identifiers = json.loads(json.dumps(tokenizer.unique_identifiers))
    assert identifiers["tokenizer_path"].endswith((".model", "tokenizer.json"))
    assert len(identifiers["md5"]) == 32


def test_eos_token_of_tokenizer_config_wins(bpe_json, tmp_path):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    reference = tokenizers.Tokenizer.from_file(bpe_json)
    token = reference.id_to_token(500)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": token}}))
    assert load_tokenizer("huggingface", str(tmp_path)).eod == 500


def test_tokenizer_json_without_an_eod_token_is_rejected(tmp_path):
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.train_from_iterator(["some text"], tokenizers.trainers.BpeTrainer(vocab_size=50, show_progress=False))
    path = tmp_path / "tokenizer.json"
    model.save(str(path))
    with pytest.raises(ConfigError, match="tokenizer.json: no end-of-document token"):
        load_tokenizer("huggingface", str(path))


def test_bad_paths_and_types_are_named(sentencepiece_model, tmp_path):
    with pytest.raises(ConfigError, match="missing.model: tokenizer model not found"):
        load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match="tokenizer_type"):
        load_tokenizer("tiktoken", sentencepiece_model)
    (tmp_path / "text.model").write_text("not a model")
    with pytest.raises(ConfigError, match="text.model: cannot load as a SentencePiece model"):
        load_tokenizer("sentencepiece", str(tmp_path / "text.model"))


def test_mock_tokenizer_uses_the_last_id_as_eod():
    assert (MockTokenizer(256).vocab_size, MockTokenizer(256).eod) == (256, 255)
