"""Which operators read device values on the host: a check that runs on CPU.

On a GPU an operator whose result shape, or whose error check, depends on tensor values makes the host wait until
the device has computed them (`.item()`, `nonzero`, `unique`, the info check of a cuSOLVER factorisation, ...).
Inside a memory layer such a wait stops the host from queueing the blocks the layer overlaps with. On CPU nothing
waits, but the same operators are dispatched, so `record_host_syncs` lists them there too, and CI can hold a code
path to "no host synchronisation" without a GPU. Reads of a tensor's data by the host (`.tolist()`, `.numpy()`,
`.cpu()`) never reach the dispatcher on CPU; the recorder lists those Python calls as well, whatever the device.
The GPU profile (benchmarks/memory_layer_profile.py) counts the synchronisations themselves.
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",           # .item(), bool(t), int(t), float(t)
    "aten::nonzero", "aten::masked_select", "aten::bincount", "aten::histc",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::repeat_interleave",             # the size of its output is the sum of the repeats
    "aten::_linalg_svd", "aten::linalg_svd", "aten::_linalg_eigh", "aten::linalg_eig", "aten::linalg_lstsq",
    "aten::linalg_solve", "aten::linalg_inv", "aten::linalg_cholesky", "aten::_linalg_check_errors",
    "aten::equal", "aten::is_nonzero",
})
"""Operators that on CUDA make the host wait for the device (value-dependent output size, a value read by the
host, or an error check of a linear-algebra routine)."""


class _HostSyncRecorder(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self._found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_SYNC_OPS or _is_boolean_mask_index(name, args):
            self._found.append(f"{name} at {_caller()}")
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """file:line of the innermost Python frame outside torch and this module: the code that made the call (for an
    operator of a backward, the caller of `backward()` or a custom autograd Function's backward)."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()):
        if not (frame.filename.startswith(torch_dir) or frame.filename == __file__):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def _is_boolean_mask_index(name: str, args: tuple) -> bool:
    """x[mask] and x[mask] = v: the output (or the written positions) come from a nonzero over the mask."""
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


HOST_READ_METHODS = ("tolist", "numpy", "cpu")
"""Tensor methods that hand a tensor's data to the host: a device-to-host copy for a CUDA tensor."""


@contextmanager
def _recording_host_reads(found: list[str]) -> Iterator[None]:
    originals = {name: torch.Tensor.__dict__.get(name) for name in HOST_READ_METHODS}

    def recorded(name: str):
        method = getattr(torch.Tensor, name)

        def call(tensor, *args, **kwargs):
            found.append(f"Tensor.{name} at {_caller()}")
            return method(tensor, *args, **kwargs)
        return call

    for name in HOST_READ_METHODS:
        setattr(torch.Tensor, name, recorded(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """Yields a list that fills with "<operator or method> at <file:line>" for every host-synchronising operator
    dispatched, and every host read of tensor data made, inside the block, in order, forward and (when backward runs
    inside it) backward. Operators are seen on the calling thread only (dispatch modes are thread-local); host
    reads on any thread."""
    found: list[str] = []
    with _recording_host_reads(found), _HostSyncRecorder(found):
        yield found
