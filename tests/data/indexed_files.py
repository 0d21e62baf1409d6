"""A Megatron indexed dataset small enough to write in any test that only needs data files to pass the config
checks (they read the .idx header: its document count must give every part of the default split a document)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


def one_token_documents(prefix: Path, count: int = 1000) -> Path:
    """`prefix`.bin/.idx holding `count` documents of one token each; returns `prefix`."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(count):
        builder.add_document(np.array([1]), [1])
    builder.finalize(f"{prefix}.idx")
    return prefix
