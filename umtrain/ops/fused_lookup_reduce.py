"""Fused lookup-reduce on CPU (spec §5 "Fused lookup-reduce"): never materialises the [T, K, d_v] gathered rows.

    forward     pooled[t, p, slice_i] = sum_{k: blocks[t,k]=p}   scores[i,t,k] * table[rows[t,k], slice_i]
    grad scores d_scores[i, t, k]     = <d_pooled[t, blocks[t,k], slice_i], table[rows[t,k], slice_i]>
    grad table  d_table[r, slice_i]   = sum_{(t,k): rows[t,k]=r} scores[i,t,k] * d_pooled[t, blocks[t,k], slice_i]

All three are C++ loops (csrc/lookup_reduce.cpp), parallel over tokens, entries and rows. The forward and the
scores' gradient read each selected row once. The table's gradient is the forward with roles swapped: entries are
sorted by row (torch.argsort) and each gradient row is summed and written once (the spec's sort + segment-sum:
no atomics, deterministic).

The extension is compiled with gcc by `torch.utils.cpp_extension` on first use (20 s to 1.5 min on 2 busy cores) and cached per
source file (path and contents), flags and CPU; a failed build raises.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import platform
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional, Tuple

import torch

from umtrain.ops.lookup_reduce import (LOOKUP_REDUCE_IMPLS, check_lookup_reduce_inputs, main_grad_to_accumulate,
                                       table_grad_in_main_grad)

SOURCE = Path(__file__).parent / "csrc" / "lookup_reduce.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


@functools.lru_cache(maxsize=None)
def extension() -> ModuleType:
    """The compiled kernels; built on first call, then loaded from torch's extension cache."""
    from torch.utils.cpp_extension import _get_build_directory, load

    name = f"umtrain_lookup_reduce_{_build_tag()}"
    build_dir = Path(_get_build_directory(name, verbose=False))
    logging.getLogger("umtrain").info("loading the fused lookup-reduce extension (the first use after a change of "
                                      "%s compiles it: up to a minute; it waits while another process builds it)",
                                      SOURCE.name)
    with exclusive_build(build_dir):
        return load(name=name, sources=[str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])


@contextlib.contextmanager
def exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold an OS lock on the build directory while torch builds or loads the extension in it.

    torch's own lock is a file that waits as long as it exists, and a process killed while compiling leaves it
    behind: every later run would hang. The OS lock is released when its holder dies, and every umtrain process
    builds under it, so a torch lock file found while holding it was left by a killed build: it is removed."""
    with open(build_dir / "umtrain.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logging.getLogger("umtrain").warning("removing %s, left by a build that did not finish", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _build_tag() -> str:
    """Names the build after the CPU's instruction sets, the source file's path and its contents. A cache shared by
    different CPUs (-march=native) never hands one of them the other's binary; two checkouts (clones, worktrees,
    branches) sharing torch's extension cache each keep their own build instead of recompiling in turn, each
    waiting on the other's lock."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.exists() else platform.processor()
    flags = next((line for line in text.splitlines() if line.startswith("flags")), text)
    source = SOURCE.resolve()
    key = f"{platform.machine()} {flags} {source} ".encode() + source.read_bytes()
    return hashlib.sha1(key).hexdigest()[:12]


class FusedLookupReduce(torch.autograd.Function):
    """Autograd wrapper: saves only the indices, scores and table (no [T, K, d_v] activation)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                num_blocks: int) -> torch.Tensor:
        rows, blocks = rows.contiguous(), blocks.contiguous()
        ctx.save_for_backward(rows, blocks, scores, table)
        weights = scores.detach().to(table.dtype).contiguous()
        return extension().forward(rows, blocks, weights, table.detach().contiguous(), num_blocks)

    @staticmethod
    def backward(ctx, grad_pooled: torch.Tensor
                 ) -> Tuple[None, None, Optional[torch.Tensor], Optional[torch.Tensor], None]:
        rows, blocks, scores, table_param = ctx.saved_tensors
        scores, table = scores.detach(), table_param.detach().contiguous()
        grad_pooled = grad_pooled.to(table.dtype).contiguous()
        num_rows = table.shape[0]
        grad_scores = grad_table = None
        if ctx.needs_input_grad[2]:
            grad_scores = extension().score_grad(rows, blocks, table, grad_pooled, scores.shape[0]).to(scores.dtype)
        if ctx.needs_input_grad[3]:
            grad_table = table_grad(rows, blocks, scores, grad_pooled, num_rows)
            main_grad = main_grad_to_accumulate(table_param)
            if main_grad is not None:          # as the Triton kernel does, so that CPU runs test the same path
                main_grad.add_(grad_table)
                grad_table = table_grad_in_main_grad(table_param)
        return None, None, grad_scores, grad_table, None


def table_grad(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, grad_pooled: torch.Tensor,
               num_rows: int) -> torch.Tensor:
    """[N, d_v]: the entries sorted by row (stable, so each row sums in a fixed order), then one segment-sum."""
    tokens, num_blocks, d_v = grad_pooled.shape
    flat_rows = rows.view(-1)
    order = torch.argsort(flat_rows, stable=True)
    ends = torch.bincount(flat_rows, minlength=num_rows).cumsum(0)
    token = torch.arange(tokens, device=rows.device).unsqueeze(1)
    grad_rows = (token * num_blocks + blocks).view(-1)[order]          # row of grad_pooled viewed [T*E, d_v]
    weights = scores.reshape(scores.shape[0], -1)[:, order].to(grad_pooled.dtype)
    return extension().segment_sum(ends, grad_rows, weights, grad_pooled.view(-1, d_v))


def fused_lookup_reduce(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                        num_blocks: int) -> torch.Tensor:
    """Same signature and semantics as `lookup_reduce_reference`; pooled is in the table's dtype."""
    if table.device.type != "cpu":
        raise ValueError(f"table is on {table.device}: the fused lookup-reduce runs on CPU (use 'triton' on GPU)")
    check_lookup_reduce_inputs(rows, blocks, scores, table, num_blocks)
    return FusedLookupReduce.apply(rows, blocks, scores, table, num_blocks)


LOOKUP_REDUCE_IMPLS["fused"] = fused_lookup_reduce
