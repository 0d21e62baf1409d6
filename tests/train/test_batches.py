"""Micro-batches: every (DP, micro-batch) split of a global batch holds the same micro-batches, in Megatron's order."""

from __future__ import annotations

import pytest
import torch

from umtrain.config.base import ConfigError
from umtrain.train.batches import MicroBatches


class Numbers:
    def __len__(self):
        return 1000

    def __getitem__(self, index):
        return {"tokens": torch.tensor([index])}


def micro_batches_of(dp: int, global_batch: int = 8, micro: int = 2, consumed: int = 16) -> set[tuple[int, ...]]:
    batches = set()
    for rank in range(dp):
        for mb in MicroBatches(Numbers(), global_batch, micro, rank, dp).global_batch(consumed):
            batches.add(tuple(mb["tokens"].view(-1).tolist()))
    return batches


def test_dp_layouts_share_micro_batches():
    expected = {(16, 17), (18, 19), (20, 21), (22, 23)}
    assert micro_batches_of(1) == expected
    assert micro_batches_of(2) == expected
    assert micro_batches_of(4) == expected


def test_rank_interleaving_matches_megatron_sampler():
    rank1 = MicroBatches(Numbers(), 8, 2, dp_rank=1, dp_size=2).global_batch(0)
    assert [mb["tokens"].view(-1).tolist() for mb in rank1] == [[2, 3], [6, 7]]


def test_one_iterator_per_virtual_chunk_over_micro_batches_moved_once():
    moved = []
    iterators = MicroBatches(Numbers(), 8, 2, 0, 1).iterators(0, num_chunks=3, move=lambda b: moved.append(b) or b)
    assert [[mb["tokens"].view(-1).tolist() for mb in it] for it in iterators] == [[[0, 1], [2, 3], [4, 5], [6, 7]]] * 3
    assert len(moved) == 4


def test_token_ids_past_the_vocabulary_are_named_with_their_samples():
    batches = MicroBatches(Numbers(), 8, 2, dp_rank=1, dp_size=2, vocab_size=11)
    assert [mb["tokens"].tolist() for mb in batches.global_batch(0)] == [[[2], [3]], [[6], [7]]]
    with pytest.raises(ConfigError, match=r"data.tokenizer_model: samples 10..11 hold token id 11, but the "
                                          r"tokenizer has 11 ids"):
        batches.global_batch(8)


class ShiftedNumbers(Numbers):
    """GPTDataset's layout: labels are the tokens shifted by one, so the last id of a sample is in labels only."""

    def __getitem__(self, index):
        return {"tokens": torch.tensor([index]), "labels": torch.tensor([index + 1])}


def test_an_id_past_the_vocabulary_in_labels_only_is_caught():
    with pytest.raises(ConfigError, match="samples 10..11 hold token id 12"):
        MicroBatches(ShiftedNumbers(), 2, 2, 0, 1, vocab_size=12).global_batch(10)
