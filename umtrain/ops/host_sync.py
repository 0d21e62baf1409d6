"""Which operators read device values on the host: a check that runs on CPU.

On a GPU an operator whose result shape, or whose error check, depends on tensor values makes the host wait until
the device has computed them (`.item()`, `nonzero`, `unique`, the info check of a cuSOLVER factorisation, ...).
Inside a memory layer such a wait stops the host from queueing the blocks the layer overlaps with. On CPU nothing
waits, but the same operators are dispatched, so `record_host_syncs` lists them there too, and CI can hold a code
path to "no host synchronisation" without a GPU. Reads of a tensor's data by the host (`.tolist()`, `.numpy()`,
`.cpu()`, `.to("cpu")`) never reach the dispatcher on CPU; the recorder lists those Python calls as well, whatever
the device. The GPU profile (benchmarks/memory_layer_profile.py) counts the synchronisations themselves.

What is listed follows what the CUDA kernels do, so some calls that look alike are not: `x[mask] = 0` (a scalar
value) becomes a `masked_fill_`, `repeat_interleave` with `output_size` and `histc` with a range need no host read.
Operators called inside another operator's kernel are not seen (e.g. the `.item()` inside `torch.allclose`), so
those whose kernels read values on the host are listed by name.
"""

from __future__ import annotations

import os
import threading
import traceback
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Container, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_SYNC_OPS = frozenset({
    "aten::_local_scalar_dense",           # .item(), bool(t), int(t), float(t)
    "aten::nonzero", "aten::masked_select", "aten::bincount",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
    "aten::_linalg_svd", "aten::linalg_svd", "aten::_linalg_eigh", "aten::linalg_eig", "aten::linalg_lstsq",
    "aten::linalg_solve", "aten::linalg_inv", "aten::linalg_cholesky", "aten::_linalg_check_errors",
    "aten::equal", "aten::is_nonzero", "aten::allclose",
})
"""Operators that on CUDA always make the host wait for the device (value-dependent output size, a value read by
the host, or an error check of a linear-algebra routine or of sampling probabilities)."""

_INDEX_OPS = ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


def synchronises(name: str, args: tuple, kwargs: dict, host_scalars: Container = ()) -> bool:
    """Whether the dispatched operator `name` with these arguments makes the host wait on CUDA. `host_scalars`: the
    tensors made from Python values (`aten::lift_fresh`), which on a GPU stay on the host."""
    if name in HOST_SYNC_OPS:
        return True
    if name == "aten::multinomial":                 # checks the probabilities on the host, unless it may repeat
        samples = args[1] if len(args) > 1 else kwargs.get("num_samples")
        replacement = args[2] if len(args) > 2 else kwargs.get("replacement", False)
        return not (replacement and samples > 1)
    if name == "aten::repeat_interleave":           # the output's size is the sum of the repeats, unless given
        repeats = args[1] if len(args) > 1 else args[0]
        return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
    if name == "aten::histc":                       # min == max (the default): the range is read from the data
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return low == high
    if name in _INDEX_OPS:
        return _is_boolean_mask_index(name, args, kwargs, host_scalars)
    return False


def _is_boolean_mask_index(name: str, args: tuple, kwargs: dict, host_scalars: Container) -> bool:
    """x[mask] and x[mask] = v: the output (or the written positions) come from a nonzero over the mask, except
    `x[mask] = v` with one mask, no accumulation and v a one-element tensor on the host (a Python scalar), which
    PyTorch turns into `masked_fill_`."""
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
    if not masks:
        return False
    if name == "aten::index":
        return True
    value = args[2] if len(args) > 2 else kwargs.get("values")
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    other_indices = [i for i in indices if i is not None and i is not masks[0]]
    scalar_fill = value.numel() == 1 and value in host_scalars and not accumulate and not other_indices
    return not scalar_fill


class _HostSyncRecorder(TorchDispatchMode):
    def __init__(self, found: list[str]):
        super().__init__()
        self._found = found
        self._host_scalars: weakref.WeakSet = weakref.WeakSet()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if synchronises(name, args, kwargs, self._host_scalars):
            self._found.append(f"{name} at {_caller()}")
        out = func(*args, **kwargs)
        if name == "aten::lift_fresh":
            self._host_scalars.add(out)
        return out


def _caller() -> str:
    """file:line of the innermost Python frame outside torch and this module: the code that made the call (for an
    operator of a backward, the caller of `backward()` or a custom autograd Function's backward)."""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_stack()):
        if not (frame.filename.startswith(torch_dir) or frame.filename == __file__):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


# ------------------------------------------------------------------------------------- host reads of tensor data

def _reads_to_host(method: str, args: tuple, kwargs: dict) -> bool:
    if method != "to":
        return True
    device = _target_device(args, kwargs)
    return device is not None and device.type == "cpu"


def _target_device(args: tuple, kwargs: dict) -> Optional[torch.device]:
    """The device a `Tensor.to(...)` call names, in any of its forms (device, string, or a tensor to match)."""
    for candidate in (kwargs.get("device"), *args):
        if isinstance(candidate, torch.Tensor):
            return candidate.device
        if isinstance(candidate, (torch.device, str)):
            return torch.device(candidate)
    return None


HOST_READ_METHODS = ("tolist", "numpy", "cpu", "to")
"""Tensor methods that hand a tensor's data to the host (`to` when its target is the CPU): a device-to-host copy
for a CUDA tensor."""

_patch_lock = threading.Lock()
_recording: list[list[str]] = []              # the lists of the recorders now open, on any thread
_originals: dict[str, Any] = {}


def _recorded(method: str, original: Callable) -> Callable:
    def call(tensor, *args, **kwargs):
        if _reads_to_host(method, args, kwargs):
            entry = f"Tensor.{method} at {_caller()}"
            for found in list(_recording):
                found.append(entry)
        return original(tensor, *args, **kwargs)
    return call


@contextmanager
def _recording_host_reads(found: list[str]) -> Iterator[None]:
    """The Tensor methods are patched while at least one recorder is open, and restored when the last one closes,
    in whatever order recorders on several threads close."""
    with _patch_lock:
        if not _recording:
            for method in HOST_READ_METHODS:
                _originals[method] = torch.Tensor.__dict__.get(method)
                setattr(torch.Tensor, method, _recorded(method, getattr(torch.Tensor, method)))
        _recording.append(found)
    try:
        yield
    finally:
        with _patch_lock:
            _recording[:] = [other for other in _recording if other is not found]
            if not _recording:
                for method, original in _originals.items():
                    if original is None:
                        delattr(torch.Tensor, method)
                    else:
                        setattr(torch.Tensor, method, original)
                _originals.clear()


@contextmanager
def record_host_syncs() -> Iterator[list[str]]:
    """Yields a list that fills with "<operator or method> at <file:line>" for every host-synchronising operator
    dispatched, and every host read of tensor data made, inside the block, in order, forward and (when backward runs
    inside it) backward. Operators are seen on the calling thread only (dispatch modes are thread-local); host
    reads on any thread, by every recorder open at the time."""
    found: list[str] = []
    with _recording_host_reads(found), _HostSyncRecorder(found):
        yield found
