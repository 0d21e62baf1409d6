"""Run Megatron-Core 0.16.1 on machines without CUDA (gloo, float32).

Megatron-Core hard-codes CUDA in about a dozen places (docs/parallelism.md, "CPU (gloo)"). `apply()` redirects
them, and only them, and only when `torch.cuda.is_available()` is False; on a GPU it does nothing:

- inside `megatron.core.*` modules the name `torch` is rebound to a proxy whose tensor factories map
  `device="cuda"` to the CPU and whose `torch.cuda` answers with the CPU device, CPU RNG state and no-op
  synchronisation/streams (user code and torch itself are untouched);
- `Tensor.cuda()` returns the tensor itself (it can only fail on such a machine);
- the tensor-parallel RNG tracker reads and writes the CPU generator, so TP ranks get distinct streams;
- the fp32 type checks of the optimizers and gradient clipping see CPU float32 as `torch.cuda.FloatTensor`,
  only for the duration of those calls;
- the MoE utilities get the `te_general_gemm = None` they lack without Transformer Engine, and split sizes
  as NumPy arrays for all-to-all.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "as_tensor", "rand", "randn", "randint",
              "zeros_like", "ones_like", "empty_like", "full_like", "eye")
_applied = False


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int) or str(device).startswith("cuda"):
        return torch.device("cpu")
    return device


def _redirect_device(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _NullStream:
    """Stands in for `torch.cuda.Stream` and `Event`: every method is a no-op returning a null stream/event."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: _NullStream()


def _cuda_shim() -> types.SimpleNamespace:
    shim = types.SimpleNamespace(**{k: getattr(torch.cuda, k) for k in dir(torch.cuda) if not k.startswith("__")})
    shim.current_device = lambda: torch.device("cpu")
    shim.synchronize = lambda *args, **kwargs: None
    shim.Stream = _NullStream
    shim.Event = _NullStream
    shim.current_stream = lambda *args, **kwargs: _NullStream()
    shim.stream = lambda *args, **kwargs: contextlib.nullcontext()
    shim.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    shim.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    shim.manual_seed = lambda seed: torch.manual_seed(seed)
    shim.random = types.SimpleNamespace(get_rng_state=shim.get_rng_state, set_rng_state=shim.set_rng_state)
    shim.memory_allocated = lambda *args, **kwargs: 0
    shim.max_memory_allocated = lambda *args, **kwargs: 0
    shim.is_available = lambda: False
    return shim


class _CpuTorch(types.ModuleType):
    """`torch` as seen from Megatron-Core modules on a CUDA-less machine."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _cuda_shim()
        for name in _FACTORIES:
            setattr(self, name, _redirect_device(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _float_tensors_typed_as_cuda():
    original = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") and self.device.type == "cpu":
            return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = cuda_type
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_typed_tensors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _float_tensors_typed_as_cuda():
            return fn(*args, **kwargs)

    return wrapper


MEGATRON_MODULES = (
    "megatron.core.distributed", "megatron.core.models.gpt", "megatron.core.optimizer",
    "megatron.core.pipeline_parallel", "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.token_dispatcher", "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch", "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.datasets.blended_megatron_dataset_builder", "megatron.core.datasets.gpt_dataset",
)


def _import_megatron_modules() -> None:
    """Import every Megatron-Core module umtrain uses, so the rebinding below reaches all of them."""
    for name in MEGATRON_MODULES:
        importlib.import_module(name)


def _patch_megatron_namespaces(proxy: _CpuTorch) -> None:
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(module, "torch", None) is torch:
            module.torch = proxy


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _patch_fp32_type_checks() -> None:
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    clip = _with_cuda_typed_tensors(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip
    dist = distrib_optimizer.DistributedOptimizer
    dist._build_model_and_main_param_groups = classmethod(
        _with_cuda_typed_tensors(dist._build_model_and_main_param_groups.__func__))
    mixed = optimizer.Float16OptimizerWithFloat16Params
    mixed.__init__ = _with_cuda_typed_tensors(mixed.__init__)


def _patch_moe_utils() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    def to_host(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.cpu().numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = to_host
    token_dispatcher.maybe_move_tensor_to_cpu = to_host


def apply() -> bool:
    """Apply the redirects once when CUDA is absent. Returns whether they are in force."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
    _import_megatron_modules()
    _patch_megatron_namespaces(_CpuTorch())
    _patch_rng_tracker()
    _patch_fp32_type_checks()
    _patch_moe_utils()
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _applied = True
    return True
