import json
import shutil

import pytest
import sentencepiece
import tokenizers

from tests.data.indexed_files import one_token_documents
from umtrain.config.base import ConfigError
from umtrain.data.tokenizer import MockTokenizer, load_tokenizer, pieces_of_at_most, train_tokenizer

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


def test_documents_are_encoded_whole_and_as_text(bpe_json, tmp_path):
    """A tokenizer.json saved with truncation and padding on, and a document that spells the EOD token: every
    token of the text comes back (no cut, no padding), and no EOD among them."""
    saved = tokenizers.Tokenizer.from_file(bpe_json)
    saved.enable_truncation(max_length=8)
    saved.enable_padding(length=64, pad_id=0)
    saved.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer("huggingface", str(tmp_path))
    text = SAMPLES[0] + " <|endoftext|> inside a document"
    ids = tokenizer.tokenize(text)
    assert tokenizer.eod not in ids and 0 not in ids
    assert tokenizer.detokenize(ids) == text


def test_an_unreadable_tokenizer_config_is_named(bpe_json, tmp_path):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{bad")
    with pytest.raises(ConfigError, match="tokenizer_config.json: cannot read its eos_token"):
        load_tokenizer("huggingface", str(tmp_path))


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


def test_long_lines_are_cut_into_pieces_sentencepiece_keeps():
    words = " ".join(["word"] * 30)                  # 149 bytes
    pieces = list(pieces_of_at_most(words, 20))
    assert all(len(p.encode()) <= 20 for p in pieces) and " ".join(pieces) == words
    cjk = "世界你好" * 10                               # 120 bytes, no space: cut between characters
    pieces = list(pieces_of_at_most(cjk, 16))
    assert all(len(p.encode()) <= 16 for p in pieces) and "".join(pieces) == cjk
    assert list(pieces_of_at_most("short", 20)) == ["short"]


def test_sentencepiece_learns_from_documents_of_long_lines(tmp_path):
    """Each document one 4.5 KB line of CJK text: SentencePiece's trainer drops such lines whole, and the model
    would encode CJK as byte pieces only."""
    alphabet = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后"
    lines = ["".join(alphabet[(i * 7 + j) % len(alphabet)] for j in range(1500)) for i in range(40)]
    corpus = tmp_path / "cjk.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}, ensure_ascii=False) + "\n" for line in lines),
                      encoding="utf-8")
    tokenizer = load_tokenizer("sentencepiece", train_tokenizer([str(corpus)], str(tmp_path / "cjk.model"),
                                                                "sentencepiece", 400))
    assert len(tokenizer.tokenize(alphabet[:10])) < 10 * 3, "CJK characters became byte pieces"


@pytest.mark.parametrize("kind, output", [("sentencepiece", "spm.model"), ("bpe", "tokenizer.json")])
def test_training_on_a_lone_surrogate_names_its_line_and_writes_nothing(tmp_path, capsys, kind, output):
    from umtrain.cli.main import main

    corpus = tmp_path / "tweets.jsonl"
    corpus.write_text('{"text": "hello"}\n{"text": "a\\ud800b"}\n')
    status = main(["train-tokenizer", "--input", str(corpus), "--output", str(tmp_path / "tok" / output),
                   "--kind", kind, "--vocab-size", "300"])
    assert status == 2
    assert capsys.readouterr().err.strip().endswith(
        "tweets.jsonl, line 2: 'text' holds a lone surrogate \\ud800 at character 2")
    assert not any((tmp_path / "tok").iterdir())


def test_a_tokenizer_folder_passes_the_config_check_and_loads(bpe_json, tmp_path):
    """`umtrain train` checks data.tokenizer_model at load; it accepts the folder that load_tokenizer reads."""
    from umtrain.config import load_config

    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(bpe_json, folder / "tokenizer.json")
    one_token_documents(tmp_path / "corpus")
    config = load_config(None, [f"data.data_path=['{tmp_path / 'corpus'}']", "data.tokenizer_type=huggingface",
                                f"data.tokenizer_model={folder}"])
    assert load_tokenizer("huggingface", config.data.tokenizer_model).vocab == load_tokenizer("huggingface",
                                                                                              bpe_json).vocab


def test_a_corpus_without_text_and_a_directory_output_are_named(tmp_path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "   "}\n{"text": "\\n\\n"}\n')
    with pytest.raises(ConfigError, match="inputs: no document has a line with text"):
        train_tokenizer([str(blank)], str(tmp_path / "spm.model"), "sentencepiece", 300)
    (tmp_path / "out").mkdir()
    with pytest.raises(ConfigError, match="output: .*out is a directory; name the tokenizer file"):
        train_tokenizer([str(blank)], str(tmp_path / "out"), "bpe", 300, overwrite=True)


def test_a_vocabulary_with_gaps_in_its_ids_counts_up_to_its_largest_id(tmp_path):
    """The model's embedding and the .bin's dtype must take every id, not the number of tokens."""
    gapped = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "</s>": 1, "far": 70000},
                                                              unk_token="[UNK]"))
    gapped.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer("huggingface", str(tmp_path / "tokenizer.json"))
    assert tokenizer.vocab_size == 70001
