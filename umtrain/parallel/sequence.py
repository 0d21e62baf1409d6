"""Moving memory-layer activations in and out of sequence-parallel regions.

Memory layers are replicated across tensor-parallel ranks (every TP rank runs the whole layer on the whole
sequence; their parameters are not TP-sharded). Under sequence parallelism the residual stream holds 1/TP of
the sequence, so the memory input is all-gathered along the sequence (backward: keep this rank's slice, since every
rank computed the full gradient) and the output is split back (backward: all-gather).
"""

from __future__ import annotations

from typing import Callable

from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)


def memory_io(sequence_parallel: bool) -> tuple[Callable, Callable]:
    if not sequence_parallel:
        return (lambda x: x), (lambda x: x)
    return ((lambda x: gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)),
            scatter_to_sequence_parallel_region)
