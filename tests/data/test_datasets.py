"""Blends, splits and flags of `build_gpt_datasets`, on hand-made indexed datasets whose tokens say where they came
from: each source (or each document) owns its own range of token ids."""

import shutil

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from umtrain.config.base import ConfigError
from umtrain.config.schema import Config
from umtrain.data.datasets import (build_gpt_datasets, next_samples_fingerprint, parse_blend, sample_fingerprint,
                                  token_count)

pytestmark = pytest.mark.usefixtures("process_group")

SOURCE_TOKENS = 300
"""Source k of the blend uses token ids [10 + 300 k, 10 + 300 (k + 1)); below 10 only the EOD."""


def write_indexed(prefix, documents, eod):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(np.array(list(document) + [eod]), [len(document) + 1])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def blend_source(prefix, k, eod, rng):
    low = 10 + SOURCE_TOKENS * k
    return write_indexed(prefix, [rng.integers(low, low + SOURCE_TOKENS, rng.integers(20, 80)) for _ in range(150)],
                         eod)


def one_token_per_document(prefix, first_token, count, eod):
    """Document i is the token `first_token + i` repeated 3-9 times."""
    return write_indexed(prefix, [[first_token + i] * (3 + i % 7) for i in range(count)], eod)


def make_config(data_path, seq_length=16, split="1,0,0", **data):
    config = Config()
    config.data.data_path = data_path
    config.data.seq_length = seq_length
    config.data.split = split
    for key, value in data.items():
        setattr(config.data, key, value)
    return config


def tokens_of(dataset, eod):
    return {int(t) for i in range(len(dataset)) for t in dataset[i]["tokens"] if t != eod}


def test_blend_proportions_follow_the_weights(sp_tokenizer, tmp_path):
    rng = np.random.default_rng(0)
    weights = [0.5, 0.3, 0.2]
    data_path = []
    for k, weight in enumerate(weights):
        data_path += [str(weight * 10), blend_source(tmp_path / f"src{k}", k, sp_tokenizer.eod, rng)]
    samples = 1500
    train, valid, test = build_gpt_datasets(make_config(data_path), sp_tokenizer, samples, 0, 0)
    assert valid is None and test is None
    assert len(train) >= samples
    counts = np.zeros(len(weights))
    for i in range(samples):
        sample = train[i]
        sources = {(int(t) - 10) // SOURCE_TOKENS for t in sample["tokens"] if t != sp_tokenizer.eod}
        assert sources == {int(sample["dataset_id"])}, "a sample mixes sources or names the wrong one"
        counts[sources.pop()] += 1
    np.testing.assert_allclose(counts / samples, weights, atol=0.02)


def test_bare_prefixes_are_sampled_by_size_over_several_epochs(sp_tokenizer, tmp_path):
    """Two bare prefixes, asked for three epochs' worth of samples: as many samples as asked, the sources in
    proportion to their token counts, and the second epoch not a replay of the first."""
    rng = np.random.default_rng(1)
    prefixes = [blend_source(tmp_path / f"src{k}", k, sp_tokenizer.eod, rng) for k in range(2)]
    tokens = [token_count(p) for p in prefixes]
    one_epoch = sum(tokens) // 16
    train, _, _ = build_gpt_datasets(make_config(prefixes), sp_tokenizer, 3 * one_epoch, 0, 0)
    assert len(train) >= 3 * one_epoch
    sources = [int(train[i]["dataset_id"]) for i in range(3 * one_epoch)]
    assert abs(sources.count(0) / len(sources) - tokens[0] / sum(tokens)) < 0.02
    first = [train[i]["tokens"].tolist() for i in range(20)]
    assert first != [train[one_epoch + i]["tokens"].tolist() for i in range(20)]


def test_split_assigns_disjoint_documents(sp_tokenizer, tmp_path):
    """split 80,15,5 over 100 documents: documents 0-79 train, 80-94 valid, 95-99 test."""
    prefix = one_token_per_document(tmp_path / "docs", 100, 100, sp_tokenizer.eod)
    config = make_config([prefix], seq_length=8, split="80,15,5")
    train, valid, test = build_gpt_datasets(config, sp_tokenizer, 300, 60, 20)
    assert (len(train), len(valid), len(test)) >= (300, 60, 20)
    assert tokens_of(train, sp_tokenizer.eod) == set(range(100, 180))
    assert tokens_of(valid, sp_tokenizer.eod) == set(range(180, 195))
    assert tokens_of(test, sp_tokenizer.eod) == set(range(195, 200))


def test_separate_validation_blend(sp_tokenizer, tmp_path):
    """With valid_data_path, training reads all of data_path (the split is ignored) and validation the other blend."""
    train_prefix = one_token_per_document(tmp_path / "train", 100, 40, sp_tokenizer.eod)
    valid_prefix = one_token_per_document(tmp_path / "valid", 500, 10, sp_tokenizer.eod)
    config = make_config([train_prefix], seq_length=8, split="50,50,0", valid_data_path=[valid_prefix])
    train, valid, test = build_gpt_datasets(config, sp_tokenizer, 100, 20, 0)
    assert tokens_of(train, sp_tokenizer.eod) == set(range(100, 140))
    assert tokens_of(valid, sp_tokenizer.eod) == set(range(500, 510))
    assert test is None


def test_eod_flags_reach_the_samples(sp_tokenizer, tmp_path):
    prefix = one_token_per_document(tmp_path / "docs", 100, 20, sp_tokenizer.eod)
    config = make_config([prefix], seq_length=8, eod_mask_loss=True, reset_position_ids=True)
    train, _, _ = build_gpt_datasets(config, sp_tokenizer, 10, 0, 0)
    sample = train[0]
    tokens, positions = sample["tokens"].numpy(), sample["position_ids"].numpy()
    assert "attention_mask" not in sample
    np.testing.assert_array_equal(sample["loss_mask"].numpy(), (tokens != sp_tokenizer.eod).astype(np.float32))
    expected_positions, position = [], 0
    for token in tokens:
        expected_positions.append(position)
        position = 0 if token == sp_tokenizer.eod else position + 1
    np.testing.assert_array_equal(positions, expected_positions)


def test_mock_data_needs_no_files_or_tokenizer():
    config = make_config([], seq_length=32, mock=True, mock_vocab_size=64)
    train, valid, test = build_gpt_datasets(config, None, 8, 4, 4)
    assert len(train) >= 8 and len(valid) >= 4 and len(test) >= 4
    tokens = train[0]["tokens"]
    assert tokens.shape == (32,) and int(tokens.max()) < 64


@pytest.mark.timeout(60, func_only=True)   # the session fixtures' corpus and tokenizer are not the test
def test_split_part_without_documents_is_refused(sp_tokenizer, tmp_path):
    """Megatron-Core would loop forever building the test part: 0.001 of 300 documents rounds to none."""
    prefix = one_token_per_document(tmp_path / "docs", 100, 300, sp_tokenizer.eod)
    with pytest.raises(ConfigError, match=r"data.split: '969,30,1' leaves the test part of .*docs \(300 documents\)"):
        build_gpt_datasets(make_config([prefix], split="969,30,1"), sp_tokenizer, 10, 2, 0)
    train, valid, test = build_gpt_datasets(make_config([prefix], split="969,30,0"), sp_tokenizer, 10, 2, 0)
    assert test is None and len(valid) >= 2


def test_bad_blends_are_named(sp_tokenizer, tmp_path):
    prefix = one_token_per_document(tmp_path / "docs", 100, 5, sp_tokenizer.eod)
    with pytest.raises(ConfigError, match="data.data_path: a blend must alternate weight and prefix"):
        parse_blend(["0.5", prefix, prefix], "data.data_path")
    with pytest.raises(ConfigError, match="blend weights must be > 0"):
        parse_blend(["0", prefix, "1", prefix], "data.data_path")
    with pytest.raises(ConfigError, match=r"data.valid_data_path: .*missing.bin not found"):
        parse_blend([str(tmp_path / "missing")], "data.valid_data_path")
    assert parse_blend(["3", prefix, "1", prefix], "k") == ([prefix, prefix], [3.0, 1.0])
    assert parse_blend([prefix], "k") == ([prefix], None)


@pytest.mark.parametrize("weight", ["nan", "inf", "1e400", "-2"])
def test_blend_weights_that_megatron_cannot_normalise_are_named(sp_tokenizer, tmp_path, weight):
    """Megatron-Core would stop on a bare AssertionError (the normalised weights do not sum to 1)."""
    prefix = one_token_per_document(tmp_path / "docs", 100, 5, sp_tokenizer.eod)
    with pytest.raises(ConfigError, match=rf"data.data_path: blend weights must be > 0 and finite, got '{weight}'"):
        build_gpt_datasets(make_config(["1", prefix, weight, prefix]), sp_tokenizer, 10, 0, 0)
    with pytest.raises(ConfigError, match=rf"data.valid_data_path: .* got '{weight}' for .*docs"):
        build_gpt_datasets(make_config([prefix], valid_data_path=[weight, prefix]), sp_tokenizer, 10, 2, 0)


def test_data_tokenised_with_a_larger_vocabulary_is_refused_at_load(sp_tokenizer, tmp_path):
    fits = one_token_per_document(tmp_path / "fits", 100, 20, sp_tokenizer.eod)
    too_large = one_token_per_document(tmp_path / "too_large", sp_tokenizer.vocab_size - 5, 20, sp_tokenizer.eod)
    with pytest.raises(ConfigError, match=rf"data.tokenizer_model: .*too_large.bin holds token id "
                                          rf"{sp_tokenizer.vocab_size + 14}, but the tokenizer has "
                                          rf"{sp_tokenizer.vocab_size} ids"):
        build_gpt_datasets(make_config(["1", fits, "1", too_large]), sp_tokenizer, 10, 0, 0)
    with pytest.raises(ConfigError, match="too_large.bin holds token id"):
        build_gpt_datasets(make_config([fits], valid_data_path=[too_large]), sp_tokenizer, 10, 2, 0)
    build_gpt_datasets(make_config([fits]), sp_tokenizer, 10, 0, 0)



def test_load_time_checks_open_each_source_once_and_see_it_rewritten(sp_tokenizer, tmp_path, monkeypatch):
    import umtrain.data.datasets as datasets

    opened = []

    def counting_open(prefix):
        opened.append(prefix)
        return IndexedDataset(prefix)

    monkeypatch.setattr(datasets, "IndexedDataset", counting_open)
    first = one_token_per_document(tmp_path / "a", 100, 20, sp_tokenizer.eod)
    second = one_token_per_document(tmp_path / "b", 200, 30, sp_tokenizer.eod)
    build_gpt_datasets(make_config([first, second]), sp_tokenizer, 10, 0, 0)
    assert sorted(opened) == [first, second]
    assert token_count(first) == sum(3 + i % 7 + 1 for i in range(20))
    one_token_per_document(tmp_path / "a", 100, 5, sp_tokenizer.eod)     # rewritten by a new preprocess run
    assert token_count(first) == sum(3 + i % 7 + 1 for i in range(5))


def test_the_next_samples_fingerprint_sees_a_source_reordered_by_a_larger_budget(sp_tokenizer, tmp_path):
    """A small source that a larger budget takes to several epochs gets another order (Megatron shuffles across
    the epochs it builds), while the large source and the blend's choice of source keep theirs: a fingerprint of
    the next sample alone, which comes from the large source, would not see it. At the end of the blend (a
    finished run, extended) there is still a next sample of each source to compare."""
    rng = np.random.default_rng(0)
    small = write_indexed(tmp_path / "small", [rng.integers(10, 300, rng.integers(20, 80)) for _ in range(5)],
                          sp_tokenizer.eod)
    config = make_config(["9", blend_source(tmp_path / "large", 1, sp_tokenizer.eod, rng), "1", small])
    saved, same, larger = (build_gpt_datasets(config, sp_tokenizer, budget, 0, 0)[0] for budget in (32, 64, 400))
    index = next(i for i in range(8, 32) if int(saved.dataset_index[i]) == 0)   # a sample of the large source next
    large_next = int(saved.dataset_sample_index[index])
    assert sample_fingerprint(larger.datasets[0], large_next) == sample_fingerprint(saved.datasets[0], large_next)
    for at in (index, 32):
        assert next_samples_fingerprint(same, at) == next_samples_fingerprint(saved, at) is not None
        assert next_samples_fingerprint(larger, at) != next_samples_fingerprint(saved, at)


@pytest.mark.parametrize("rewrite", ["fewer documents", "more documents", "longer documents"])
@pytest.mark.parametrize("own_cache", [False, True])
def test_sample_indices_cached_for_other_data_are_refused(sp_tokenizer, tmp_path, rewrite, own_cache):
    """Megatron's index cache is keyed on the prefix's path, not its data. Re-writing the prefix: fewer documents
    (Megatron would raise an IndexError reading a sample), twice as many with the old index two epochs long (the
    same length: the new documents would never be read), as many but one token longer each."""
    def write(count, extra):
        return write_indexed(tmp_path / "docs", [[100 + i] * (3 + i % 7 + extra) for i in range(count)],
                             sp_tokenizer.eod)

    cache = tmp_path / "own_cache" if own_cache else tmp_path / "docs" / "cache"
    config = make_config([write(40, 0)], seq_length=8, cache_path=str(cache) if own_cache else None)
    old_epoch = sum(4 + i % 7 for i in range(40)) // 8
    build_gpt_datasets(config, sp_tokenizer, old_epoch + 1, 0, 0)
    assert cache.is_dir()
    count, extra = {"fewer documents": (20, 0), "more documents": (80, 0), "longer documents": (40, 1)}[rewrite]
    write(count, extra)
    with pytest.raises(ConfigError, match=rf"data.cache_path: the cached train sample index of .*docs was built for "
                                          rf"other data .* delete {cache} to rebuild it"):
        build_gpt_datasets(config, sp_tokenizer, old_epoch + 1, 0, 0)
    shutil.rmtree(cache)
    train, _, _ = build_gpt_datasets(config, sp_tokenizer, old_epoch + 1, 0, 0)
    assert tokens_of(train, sp_tokenizer.eod) == set(range(100, 100 + count))
