"""Measuring the cost model's constants on a process group: alpha and beta of the all-to-all (`calibrate`), and the
local compute of each sharded lookup (`calibrate_compute`); `umtrain calibrate-comm` writes both to one file.
The formulas and the fits are in `umtrain.parallel.cost_model`.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import LookupReduce, get_lookup_reduce, lookup_reduce_reference
from umtrain.parallel.comm import Communicator
from umtrain.parallel.cost_model import (VARIANTS, Calibration, ComputeObservation, LookupDims, Variant,
                                         fit_compute, variant_traffic)
from umtrain.parallel.memory_sharding import make_sharded_lookup, row_offsets
from umtrain.parallel.state import local_device_index


def calibrate(comm: Communicator, sizes: Sequence[int] = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22),
              iters: int = 5, device: torch.device | str = "cpu") -> Calibration:
    """Fit alpha, beta to the slowest rank's best time of equal-split all-to-alls of `sizes` bytes sent per rank
    (the best of `iters`: on a shared machine the median measures other processes)."""
    peers = comm.size - 1
    if peers == 0:
        raise ValueError("calibration needs a group of at least 2 ranks")
    xs, ys = [], []
    for size in sizes:
        per_peer = max(1, size // (4 * peers))
        x = torch.zeros(per_peer * comm.size, dtype=torch.float32, device=device)
        splits = [per_peer] * comm.size
        comm.all_to_all(x, splits, splits, "calibration")
        times = []
        for _ in range(iters):
            _synchronize(device)
            start = time.perf_counter()
            comm.all_to_all(x, splits, splits, "calibration")
            _synchronize(device)
            times.append(time.perf_counter() - start)
        xs.append(per_peer * 4 * peers)
        ys.append(_group_max(comm, min(times), device))
    beta, alpha = _least_squares_line(xs, ys)
    backend = torch.distributed.get_backend(comm.group) if comm.group is not None else "none"
    return Calibration(alpha_s=max(alpha, 0.0), beta_s_per_byte=max(beta, 1e-15), backend=str(backend),
                       world_size=comm.size, source=f"measured: all-to-all of {list(sizes)} bytes per rank")


COMPUTE_CALIBRATION_POINTS: tuple[tuple[int, int, int, int], ...] = tuple(
    itertools.product((48, 320), (12, 40), (2, 6), (8, 192)))
"""(T, K, E, d_v) timed by `calibrate_compute`: a 2^4 design reaching the upper work counts of
benchmarks/memory_sharding_sweep.py (CPU times grow faster than linearly once the [T, K, d_v] intermediates leave
the caches, so a fit to small sizes under-predicts the large ones) without containing any sweep point, so the sweep
tests the model out of sample. d_v = 8 sits below the sweep's narrowest values: there the index bookkeeping
outweighs the gathered bytes, which separates the per-index from the per-byte coefficient (with d_v >= 32 only,
the fit folded the index work into the bytes and under-predicted the narrow, index-heavy points). The sweep's
smallest T, K and E lie below the design's lower corner: there the fit extrapolates, and the per-call term
dominates. d_v is rounded up to a multiple of P (and of h) where needed."""


def calibrate_compute(comm: Communicator, calibration: Calibration, local_impl: LookupReduce = lookup_reduce_reference,
                      points: Sequence[tuple[int, int, int, int]] = COMPUTE_CALIBRATION_POINTS, num_cores: int = 2,
                      num_rows: int = 4096, dtype: torch.dtype = torch.float32, iters: int = 5, rounds: int = 2,
                      device: torch.device | str = "cpu") -> Calibration:
    """`calibration` with its compute term fitted (`fit_compute`) to every variant's real lookup
    (`umtrain.parallel.memory_sharding`, with `local_impl`) on this group at `points`: the `step_seconds` of the
    group's forward + backward step times over `rounds` passes through all points of `iters` repetitions each
    (passes apart in time, so that a burst of load from other processes spoils one of them only), minus the
    communication `calibration` predicts for it."""
    if comm.size < 2:
        raise ValueError("compute calibration runs the sharded lookups: it needs a group of at least 2 ranks")
    if comm.size % num_cores and num_cores % comm.size:
        num_cores = 1                                   # dimension-wise MCS needs cores aligned with ranks
    step = math.lcm(comm.size, num_cores)
    sizes = [(tokens, LookupDims(value_dim=-(-value_dim // step) * step, topk=topk, num_blocks=num_blocks,
                                 num_cores=num_cores, group_size=comm.size, value_bytes=dtype.itemsize,
                                 score_bytes=dtype.itemsize)) for tokens, topk, num_blocks, value_dim in points]
    samples: list[dict[Variant, list[float]]] = [{v: [] for v in VARIANTS} for _ in sizes]
    for _ in range(rounds):
        for (tokens, dims), mine in zip(sizes, samples):
            measured = time_lookup_variants(comm, dims, tokens, num_rows, local_impl, iters, dtype=dtype, device=device)
            for variant, times in measured.items():
                mine[variant] += times
    observations = [ComputeObservation(v, dims, tokens, step_seconds(mine[v]),
                                       calibration.seconds(variant_traffic(v, dims, tokens)))
                    for (tokens, dims), mine in zip(sizes, samples) for v in VARIANTS]
    return replace(calibration, compute=fit_compute(observations),
                   source=f"{calibration.source}; compute: fit to {len(points)} sizes x {len(VARIANTS)} variants "
                          f"of the sharded lookups ({getattr(local_impl, '__name__', 'lookup')}, {dtype}, median "
                          f"group step of {rounds} x {iters})")


def calibrate_world(rank: int, world_size: int, iters: int, lookup_impl: str | None,
                    backend: str | None) -> Calibration:
    """`umtrain calibrate-comm` on one rank of the world: communication, and with `lookup_impl` the local compute of
    each sharded lookup. Under torchrun `backend` names the group to create (and destroy after); spawned by
    `run_local_group`, the group exists (`backend` None)."""
    if backend is not None:
        dist.init_process_group(backend)
    device = "cpu"
    if dist.get_backend() == "nccl":
        device = f"cuda:{local_device_index()}"
        torch.cuda.set_device(device)
    comm = Communicator(dist.group.WORLD)
    calibration = calibrate(comm, iters=iters, device=device)
    if lookup_impl is not None:
        dtype = torch.bfloat16 if device != "cpu" else torch.float32
        calibration = calibrate_compute(comm, calibration, get_lookup_reduce(lookup_impl), dtype=dtype, iters=iters,
                                        device=device)
    if backend is not None:
        dist.destroy_process_group()
    return calibration


def step_seconds(samples: Sequence[float]) -> float:
    """One variant's step time from its group step times: their median. On a loaded machine it follows the load,
    but all variants alike, so the ratios between variants (what the choice depends on) vary less from one
    calibration to the next than those of the best times (docs/memory_sharding.md, Calibration)."""
    return statistics.median(samples)


def time_lookup_variants(comm: Communicator, dims: LookupDims, tokens_per_rank: int, num_rows: int,
                         local_impl: LookupReduce, iters: int, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu", seed: int = 0,
                         on_step: Optional[Callable[[Variant], None]] = None) -> dict[Variant, list[float]]:
    """Per variant, the group step time of each of `iters` forward + backward passes (after one warm-up) on
    balanced inputs: repetition i's time on the slowest rank, since a step of collectives ends when its slowest
    rank does. Variants take turns within each repetition, so that sample i of every variant ran under about the
    same load from other processes: compare variants pairwise, sample by sample. The order rotates from one
    repetition to the next, so that no variant always runs right after another one.
    Counters are reset before each pass; `on_step(variant)` runs after it (to read what was counted)."""
    rows, blocks, scores = balanced_lookup_inputs(dims, tokens_per_rank, num_rows, comm.rank, seed)
    rows, blocks = rows.to(device), blocks.to(device)
    scores = scores.to(device=device, dtype=dtype).requires_grad_()
    steps = []
    for variant in VARIANTS:
        mode, options = {"number": ("number", {}), "pooled": ("number", {"owner_pooling": True}),
                         "dimension": ("dimension", {"num_cores": dims.num_cores,
                                                     "tokens_per_rank": tokens_per_rank})}[variant]
        lookup = make_sharded_lookup(mode, comm.group, num_rows, dims.value_dim, local_impl, comm=comm, **options)
        shard = torch.nn.Parameter(torch.randn(lookup.local_table_shape(), dtype=dtype, device=device))
        steps.append((lookup, shard))
    times = torch.zeros(len(VARIANTS), iters, dtype=torch.float64)
    for repetition in range(iters + 1):
        for offset in range(len(VARIANTS)):
            index = (offset + repetition) % len(VARIANTS)
            lookup, shard = steps[index]
            comm.reset_counters()
            dist.barrier(comm.group)
            _synchronize(device)
            start = time.perf_counter()
            lookup(rows, blocks, scores, shard, dims.num_blocks).sum().backward()
            _synchronize(device)
            if repetition:
                times[index, repetition - 1] = time.perf_counter() - start
            if on_step is not None:
                on_step(VARIANTS[index])
    times = times.to(device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=comm.group)
    return {v: row for v, row in zip(VARIANTS, times.tolist())}


def balanced_lookup_inputs(dims: LookupDims, tokens_per_rank: int, num_rows: int, rank: int,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, blocks, scores) of one rank with exactly T*K/P requests per owner (what the model assumes), random
    rows within each owner's range, random blocks and scores."""
    g = torch.Generator().manual_seed(seed + rank)
    requests = tokens_per_rank * dims.topk
    owners = (torch.arange(requests) % dims.group_size)[torch.randperm(requests, generator=g)]
    offsets = torch.tensor(row_offsets(num_rows, dims.group_size))
    sizes = offsets[1:] - offsets[:-1]
    rows = (offsets[owners] + (torch.rand(requests, generator=g) * sizes[owners]).long()).view(tokens_per_rank,
                                                                                               dims.topk)
    blocks = torch.randint(0, dims.num_blocks, rows.shape, generator=g)
    scores = torch.randn(dims.num_cores, tokens_per_rank, dims.topk, generator=g)
    return rows, blocks, scores


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _group_max(comm: Communicator, value: float, device: torch.device | str) -> float:
    """The slowest rank's value (every rank then fits the same line)."""
    ones = [1] * comm.size
    mine = torch.full((comm.size,), value, dtype=torch.float64, device=device)
    return float(comm.all_to_all(mine, ones, ones, "calibration").max())


def _least_squares_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) minimising relative errors, so the small messages that fix alpha count as much as the
    large ones that fix beta."""
    design = torch.tensor([[1.0 / y, x / y] for x, y in zip(xs, ys)], dtype=torch.float64)
    ones = torch.ones(len(ys), 1, dtype=torch.float64)
    intercept, slope = torch.linalg.lstsq(design, ones).solution.view(-1).tolist()
    return slope, intercept
