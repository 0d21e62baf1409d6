"""Train / validation / test datasets through Megatron-Core's `BlendedMegatronDatasetBuilder` and `GPTDataset`.

`data.data_path` is a Megatron blend: `[w1, prefix1, w2, prefix2, ...]` (weights need not sum to 1) or plain
prefixes (then weighted by their token counts), split into train/valid/test by `data.split` at document granularity.
With `data.valid_data_path`, validation reads that blend instead, training reads all of `data.data_path` and there
is no test set.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (convert_split_vector_to_split_matrix,
                                                                    parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from umtrain.config.base import ConfigError
from umtrain.config.schema import Config, DataConfig
from umtrain.data.tokenizer import MockTokenizer

Blend = tuple[list[str], Optional[list[float]]]
TOKENS_CHECKED_AT_LOAD = 1 << 24
INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
"""A Megatron .idx starts with its magic, version (u64), dtype code (u8), sequence and document counts (u64)."""


def parse_blend(paths: list[str], key: str) -> Blend:
    """Megatron's `weight prefix weight prefix` list (or bare prefixes) -> (prefixes, weights or None).

    Every prefix must have its `.bin` and `.idx`; errors name `key` (e.g. 'data.data_path').
    """
    prefixes, weights = split_blend(paths, key)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(key, f"{prefix}{suffix} not found (run `umtrain preprocess` first)")
    return prefixes, weights


def split_blend(paths: list[str], key: str) -> Blend:
    """The prefixes and weights of a blend list, checked for form only (no file is read)."""
    if not paths:
        raise ConfigError(key, "is empty")
    if not any(is_number(p) for p in paths):
        return list(paths), None
    prefixes = list(paths[1::2])
    if len(paths) % 2 or not all(is_number(w) for w in paths[0::2]) or any(is_number(p) for p in prefixes):
        raise ConfigError(key, f"a blend must alternate weight and prefix: [w, prefix, w, prefix, ...], "
                               f"got {paths}")
    weights = [float(w) for w in paths[0::2]]
    for text, weight, prefix in zip(paths[0::2], weights, prefixes):
        if not (np.isfinite(weight) and weight > 0):
            raise ConfigError(key, f"blend weights must be > 0 and finite, got {text!r} for {prefix}")
    if not np.isfinite(sum(weights)):
        raise ConfigError(key, f"blend weights {paths[0::2]} overflow when summed (Megatron normalises them); "
                               f"scale them down")
    return prefixes, weights


def size_weighted(blend: Blend) -> Blend:
    """Bare prefixes weighted by their token counts. Megatron-Core builds an unweighted blend of several sources as
    one epoch of their concatenation, which training would then repeat in the same order; a weighted blend is
    sampled (and reshuffled) for as many samples as asked."""
    prefixes, weights = blend
    if weights is not None or len(prefixes) == 1:
        return blend
    return prefixes, [float(token_count(prefix)) for prefix in prefixes]


def indexed_dataset(prefix: str) -> IndexedDataset:
    """One open IndexedDataset per prefix and version of its files, shared by the load-time checks."""
    versions = tuple((stat.st_mtime_ns, stat.st_size) for stat in (os.stat(prefix + ".idx"), os.stat(prefix + ".bin")))
    return _open_indexed_dataset(prefix, versions)


@functools.lru_cache(maxsize=64)
def _open_indexed_dataset(prefix: str, versions: tuple) -> IndexedDataset:
    """Held in the cache: the dataset's arrays are views of a memory map that it closes when collected."""
    return IndexedDataset(prefix)


def token_count(prefix: str) -> int:
    return int(indexed_dataset(prefix).sequence_lengths.sum())


def gpt_dataset_config(config: Config, tokenizer, create_attention_mask: Optional[bool] = None) -> GPTDatasetConfig:
    """The GPTDatasetConfig of `config.data`. `tokenizer` is ignored for mock data (vocabulary `data.mock_vocab_size`).

    By default the batches carry an `attention_mask` only with `reset_attention_mask`; otherwise the mask is the
    plain causal one that the model's attention builds itself.
    """
    data = config.data
    if create_attention_mask is None:
        create_attention_mask = data.reset_attention_mask
    sources: dict = {}
    if data.mock:
        tokenizer = MockTokenizer(data.mock_vocab_size)
    elif data.valid_data_path:
        sources["blend_per_split"] = [size_weighted(parse_blend(data.data_path, "data.data_path")),
                                      size_weighted(parse_blend(data.valid_data_path, "data.valid_data_path")), None]
    else:
        sources["blend"] = size_weighted(parse_blend(data.data_path, "data.data_path"))
        sources["split"] = data.split
    if tokenizer is None:
        raise ConfigError("data.tokenizer_model", "a tokenizer is needed for real (non-mock) data")
    return GPTDatasetConfig(
        random_seed=config.training.seed,
        sequence_length=data.seq_length,
        path_to_cache=data.cache_path,
        tokenizer=tokenizer,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mmap_bin_files=True,
        **sources,
    )


def build_gpt_datasets(
    config: Config,
    tokenizer,
    train_samples: int,
    valid_samples: int,
    test_samples: int,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    create_attention_mask: Optional[bool] = None,
):
    """(train, valid, test), each a GPTDataset, a BlendedDataset of them, or None for an empty split.

    Call on every rank: Megatron's builder holds barriers (rank 0 builds the index caches first). Ranks where
    `is_built_on_rank()` is False (default: always True) get None datasets.
    """
    dataset_config = gpt_dataset_config(config, tokenizer, create_attention_mask)
    check_every_split_has_documents(config.data)
    if not config.data.mock:
        _check_token_ids_fit(dataset_config, tokenizer.vocab_size)
    dataset_class = MockGPTDataset if config.data.mock else GPTDataset
    builder = BlendedMegatronDatasetBuilder(
        dataset_class, [train_samples, valid_samples, test_samples], is_built_on_rank or (lambda: True),
        dataset_config)
    train, valid, test = builder.build()
    if not config.data.mock:
        for dataset in (train, valid, test):
            for part in gpt_datasets_of(dataset):
                _check_cached_indices_fit(part, config.data.cache_path)
    for name, dataset, wanted in (("train", train, train_samples), ("valid", valid, valid_samples)):
        if dataset is not None and len(dataset) < wanted:
            raise RuntimeError(f"the {name} dataset holds {len(dataset)} samples, {wanted} were asked for")
    return train, valid, test


def check_every_split_has_documents(data: DataConfig) -> None:
    """Megatron-Core 0.16 loops forever on a split part that rounds to zero documents of a source (its epoch has no
    tokens), even when no sample of that part is requested; refuse such a split up front (at config validation, and
    again when the datasets are built)."""
    if data.mock or data.valid_data_path:
        return
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(data.split))
    prefixes, _ = parse_blend(data.data_path, "data.data_path")
    for prefix in prefixes:
        documents = sequence_count(prefix)
        for part, bookends in zip(Split, split_matrix):
            if bookends is not None and round(bookends[1] * documents) == round(bookends[0] * documents):
                raise ConfigError("data.split", f"{data.split!r} leaves the {part.name} part of {prefix} "
                                                f"({documents} documents) without a document; give that part a "
                                                f"larger share, or 0")


def sequence_count(prefix: str) -> int:
    """The number of sequences (GPTDataset's documents) in the header of `prefix.idx`, read without mapping the
    files; a file that is not a Megatron index is named."""
    path = prefix + ".idx"
    with open(path, "rb") as stream:
        header = stream.read(INDEX_HEADER_BYTES)
    if len(header) < INDEX_HEADER_BYTES or not header.startswith(INDEX_MAGIC):
        raise ConfigError("data.data_path", f"{path} is not a Megatron index (re-run `umtrain preprocess`)")
    return struct.unpack_from("<Q", header, len(INDEX_MAGIC) + 9)[0]


def gpt_datasets_of(dataset) -> list[GPTDataset]:
    """The GPTDatasets of a split: itself, the sources of a blend, or none."""
    if dataset is None:
        return []
    return list(dataset.datasets) if isinstance(dataset, BlendedDataset) else [dataset]


def _check_cached_indices_fit(dataset: GPTDataset, cache_path: Optional[str]) -> None:
    """Megatron keys its cached sample indices on the prefix, seed, lengths and split, not on the data: after a
    prefix is re-preprocessed they would be loaded as they are (new documents never read, or an IndexError deep in
    Megatron for fewer ones). A fresh index holds every document of the split once per epoch, and its sample k
    starts k x seq_length tokens into the documents it lists (checked for the last sample); refuse one that does not.
    One pass over the document index."""
    documents, split = np.asarray(dataset.document_index), dataset.indices
    problem = None
    if len(documents) % len(split) or documents.min() != split[0] or documents.max() != split[-1]:
        problem = (f"it holds {len(documents)} entries of documents {documents.min()}..{documents.max()}, not "
                   f"epochs of the split's documents {split[0]}..{split[-1]}")
    else:
        last = max(len(dataset.sample_index) - 2, 0)
        row, offset = (int(v) for v in dataset.sample_index[last])
        tokens_before = _tokens_of(dataset.dataset.sequence_lengths, documents[:row]) + offset
        if tokens_before != last * dataset.config.sequence_length:
            problem = "its samples do not fit the documents' lengths"
    if problem:
        folder = cache_path or os.path.join(dataset.dataset.path_prefix, "cache")
        raise ConfigError("data.cache_path", f"the cached {dataset.index_split.name} sample index of "
                                             f"{dataset.dataset.path_prefix} was built for other data ({problem}; "
                                             f"was the prefix preprocessed again?): delete {folder} to rebuild it")


def _tokens_of(lengths: np.ndarray, documents: np.ndarray, chunk: int = 1 << 24) -> int:
    """The tokens of `documents` (with repeats), gathered a chunk at a time: a pretraining corpus's document index
    has billions of entries."""
    return sum(int(lengths[documents[i:i + chunk]].sum(dtype=np.int64)) for i in range(0, len(documents), chunk))


def _check_token_ids_fit(dataset_config: GPTDatasetConfig, vocab_size: int) -> None:
    """Data tokenised with a larger vocabulary than the configured tokenizer's would index past the embedding
    (a device-side assert on GPU, mid-run): check the first `TOKENS_CHECKED_AT_LOAD` tokens of every source now.
    Every batch is checked again as it is built (`umtrain.train.batches`)."""
    blends = [dataset_config.blend] if dataset_config.blend else [b for b in dataset_config.blend_per_split or [] if b]
    for prefix in dict.fromkeys(p for prefixes, _ in blends for p in prefixes):
        dtype = indexed_dataset(prefix).index.dtype
        head = np.memmap(prefix + ".bin", dtype=dtype, mode="r")[:TOKENS_CHECKED_AT_LOAD]
        if head.size and int(head.max()) >= vocab_size:
            raise ConfigError("data.tokenizer_model", f"{prefix}.bin holds token id {int(head.max())}, but the "
                                                      f"tokenizer has {vocab_size} ids: the data was tokenised with "
                                                      f"another tokenizer (re-run `umtrain preprocess` with this one)")


def is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def next_samples_fingerprint(dataset, index: int) -> Optional[str]:
    """What a run that has read samples [0, index) of a split reads next, whatever order the split was built in:
    the fingerprint of sample `index`; for a blend, of each source's next sample (one past the last the blend took
    from it), so that a source whose order changed (a larger budget gave it a second epoch) is seen even when the
    blend's next sample comes from another source, and also at the very end of the blend (a finished run, extended).
    None when there is nothing to read."""
    if dataset is None:
        return None
    if not isinstance(dataset, BlendedDataset):
        return sample_fingerprint(dataset, index) if index < len(dataset) else None
    digest = hashlib.sha1()
    for source, (part, next_index) in enumerate(zip(dataset.datasets, next_index_of_each_source(dataset, index))):
        taken = sample_fingerprint(part, next_index) if next_index < len(part) else "exhausted"
        digest.update(f"{source}:{taken}|".encode())
    return digest.hexdigest()


def next_index_of_each_source(blend: BlendedDataset, index: int, chunk: int = 1 << 16) -> list[int]:
    """For each source, the index in its own dataset of the next sample the blend takes from it after its first
    `index` samples: one past the last one taken before `index` (0 if none). The blend's index is read backwards a
    chunk at a time until every source is seen (a run's index can hold hundreds of millions of samples)."""
    if index == 0:
        return [0] * len(blend.datasets)
    blend[0]   # maps the lazily loaded blend indices
    next_index: dict[int, int] = {}
    for stop in range(index, 0, -chunk):
        start = max(stop - chunk, 0)
        sources = np.asarray(blend.dataset_index[start:stop])[::-1]
        taken = np.asarray(blend.dataset_sample_index[start:stop])[::-1]
        for source in np.unique(sources):
            next_index.setdefault(int(source), int(taken[np.argmax(sources == source)]) + 1)
        if len(next_index) == len(blend.datasets):
            break
    return [next_index.get(source, 0) for source in range(len(blend.datasets))]


def sample_fingerprint(dataset: GPTDataset, index: int) -> str:
    """What sample `index` of a GPTDataset is: its tokens and the documents and offsets it spans (mock documents are
    token ranges, and real corpora repeat boilerplate: tokens alone do not tell samples apart)."""
    tokens = np.ascontiguousarray(np.asarray(dataset[index]["tokens"])).tobytes()   # also maps lazy indices
    j = int(dataset.shuffle_index[index])
    (begin, begin_offset), (end, end_offset) = dataset.sample_index[j], dataset.sample_index[j + 1]
    span = (f"documents {int(dataset.document_index[begin])}+{int(begin_offset)}.."
            f"{int(dataset.document_index[end])}+{int(end_offset)}")
    return hashlib.sha1(tokens + b"|" + span.encode()).hexdigest()
