"""Global batches split across data-parallel ranks and micro-batches, in Megatron's sample order.

Global batch i holds samples [i*G, (i+1)*G). Micro-batch j of DP rank r holds samples
[i*G + (j*DP + r)*mbs, ... + mbs), as Megatron's pretraining sampler does, so every (TP, PP, DP) layout sees the
same micro-batches, and resuming at `consumed_samples` continues the exact sample order.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from umtrain.config.base import ConfigError


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]}


def check_token_ids(batch: dict[str, torch.Tensor], vocab_size: int, samples: range) -> None:
    """Token ids past the tokenizer's vocabulary mean the data was tokenised with another tokenizer; on GPU they
    would surface as a device-side assert in the embedding. Checked on the host batch, before it moves."""
    largest = max(int(batch[key].max()) for key in ("tokens", "labels") if key in batch)
    if largest >= vocab_size:
        raise ConfigError("data.tokenizer_model", f"samples {samples.start}..{samples.stop - 1} hold token id "
                                                  f"{largest}, but the tokenizer has {vocab_size} ids: the data was "
                                                  f"tokenised with another tokenizer (re-run `umtrain preprocess` "
                                                  f"with this one)")


class MicroBatches:
    """`vocab_size`: when given, every micro-batch's token ids are checked against it (`check_token_ids`)."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 vocab_size: Optional[int] = None):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.vocab_size = vocab_size

    @property
    def num_micro_batches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def micro_batch_indices(self, consumed_samples: int, micro: int) -> range:
        start = consumed_samples + (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        return range(start, start + self.micro_batch_size)

    def global_batch(self, consumed_samples: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch that starts at `consumed_samples`."""
        return [self.micro_batch(consumed_samples, m) for m in range(self.num_micro_batches)]

    def micro_batch(self, consumed_samples: int, micro: int) -> dict[str, torch.Tensor]:
        samples = self.micro_batch_indices(consumed_samples, micro)
        if samples.stop > len(self.dataset):
            raise RuntimeError(f"samples {samples.start}..{samples.stop - 1} are past the {len(self.dataset)} the "
                               f"split was built for")
        batch = collate([self.dataset[i] for i in samples])
        if self.vocab_size is not None:
            check_token_ids(batch, self.vocab_size, samples)
        return batch

    def iterators(self, consumed_samples: int, num_chunks: int,
                  move: Callable[[dict], dict] = lambda batch: batch) -> list[Iterator]:
        """One iterator per virtual-pipeline chunk over the same micro-batches, each micro-batch moved (to the
        device) by `move` once for all chunks."""
        batch = [move(micro_batch) for micro_batch in self.global_batch(consumed_samples)]
        return [iter(batch) for _ in range(num_chunks)]
