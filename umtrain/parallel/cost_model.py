"""Communication cost of sharded value tables, and the choice between number- and dimension-wise sharding.

Byte counts are exact, per rank and per tag, for the collectives `umtrain.parallel.memory_sharding` issues
(the same tags `umtrain.parallel.comm.Communicator` counts): given every rank's token count and, for the
number-wise modes, how many requests each rank sends to each owner. For a config, requests are assumed
balanced over owners (T*K/P per owner, what the shuffle pi of eq. 14 gives in expectation).

Per rank with T tokens, K = H*m values per token, s_i = 4 (int32 ids), s_f the score / value byte size,
h_loc the MCS cores of one rank's columns, and forward + backward (the paper's App. C/D):
  number, rows:       s_i*T*K*(P-1)/P  +  2 * s_f*T*K*d_v*(P-1)/P
  number, owner-pooled: (2*s_i + 2*h*s_f)*T*K*(P-1)/P  +  2 * s_f*T*E*d_v*(P-1)
  dimension:          (s_i + 2*h_loc*s_f)*T*K*(P-1)  +  2 * s_f*T*E*d_v*(P-1)/P
plus the per-call count exchanges (8 bytes per peer). Communication time = sum over collectives of
alpha + beta * bytes (the larger of sent and received), with alpha, beta measured by
`umtrain.parallel.calibration.calibrate` (`umtrain calibrate-comm`).

Local compute (forward + backward, per rank): gathering rows, weighting them by the scores, scattering into the
pooled outputs, the backward's scatter-adds, and each mode's index bookkeeping (sort by owner, slots, id packing).
Per variant v it is linear in four work counts, w = [1, n_index, b_gathered, b_pooled]:
  compute_v = c_v . w,  with
  number, rows:         n_index = T*K,    b_gathered = s_f*T*K*d_v,  b_pooled = s_f*T*E*d_v
  number, owner-pooled: n_index = T*K,    b_gathered = s_f*T*K*d_v,  b_pooled = s_f*P*T*E*d_v
  dimension:            n_index = P*T*K,  b_gathered = s_f*T*K*d_v,  b_pooled = s_f*T*E*d_v
(owner-pooled sums partials for every token of the group and adds P of them; dimension-wise handles the ids of
every token of the group but only d_v/P columns of each). `umtrain.parallel.calibration.calibrate_compute` times
the real lookups of
`umtrain.parallel.memory_sharding` on the group at a few sizes and fits the four c_v per variant by non-negative
least squares on the relative error of comm + compute against the measured time. Predicted time per variant =
communication + compute; a calibration without a compute fit (older files, the default) predicts compute = 0.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from umtrain.config.base import ConfigError
from umtrain.config.schema import Config
from umtrain.parallel.comm import GRAD_SUFFIX

INDEX_BYTES = 4
"""int32 ids (memory_sharding.INDEX_DTYPE)."""
COUNT_BYTES = 8
"""int64 entries of the count exchanges."""

Variant = Literal["number", "pooled", "dimension"]
"""'number': rows travel; 'pooled': owner-side partial pooling (number-wise); 'dimension': d_v split."""
VARIANTS: tuple[Variant, ...] = ("number", "pooled", "dimension")


@dataclass(frozen=True)
class LookupDims:
    """What the traffic of one memory layer depends on."""

    value_dim: int
    topk: int
    """K = H*m values per token."""
    num_blocks: int
    """E (IVE); 1 without IVE."""
    num_cores: int
    """h (MCS); 1 without MCS."""
    group_size: int
    """P."""
    value_bytes: int = 2
    score_bytes: int = 2

    @property
    def cores_per_rank(self) -> int:
        """h_loc: MCS cores whose scores one rank needs in dimension-wise mode."""
        return max(1, self.num_cores // self.group_size)


def dimension_wise_problem(value_dim: int, num_cores: int, group_size: int) -> str:
    """Why d_v cannot be split over the group ('' if it can)."""
    if value_dim % group_size:
        return f"dimension-wise sharding needs value_dim={value_dim} divisible by P={group_size}"
    if group_size % num_cores and num_cores % group_size:
        return (f"dimension-wise sharding with MCS needs P={group_size} and num_cores={num_cores} to divide one "
                f"another (each rank's columns within one core, or whole cores per rank)")
    return ""


@dataclass
class Traffic:
    """One rank's bytes sent and received, and collective calls, per tag (as `Communicator` counts them)."""

    sent: Counter = field(default_factory=Counter)
    received: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)

    def add(self, tag: str, sent: float, received: float, calls: int = 1) -> None:
        self.sent[tag] += sent
        self.received[tag] += received
        self.calls[tag] += calls

    def add_with_backward(self, tag: str, sent: float, received: float, calls: int = 1) -> None:
        """A differentiable exchange: its backward moves the same bytes the other way."""
        self.add(tag, sent, received, calls)
        self.add(tag + GRAD_SUFFIX, received, sent, calls)

    def total_sent(self, phase: Optional[Literal["forward", "backward"]] = None) -> float:
        return sum(v for tag, v in self.sent.items() if _in_phase(tag, phase))


def _in_phase(tag: str, phase: Optional[str]) -> bool:
    return phase is None or (phase == "backward") == tag.endswith(GRAD_SUFFIX)


def balanced_requests(dims: LookupDims, tokens: Sequence[int]) -> list[list[float]]:
    """requests[i][j]: ids rank i sends to owner j, when ids spread evenly over owners."""
    per_owner = [t * dims.topk / dims.group_size for t in tokens]
    return [[per_owner[i]] * dims.group_size for i in range(dims.group_size)]


def _off_rank(requests: Sequence[Sequence[float]], rank: int) -> tuple[float, float]:
    """(ids this rank sends to other owners, ids other ranks send to this owner)."""
    out = sum(n for j, n in enumerate(requests[rank]) if j != rank)
    inc = sum(row[rank] for i, row in enumerate(requests) if i != rank)
    return out, inc


def number_wise_traffic(dims: LookupDims, requests: Sequence[Sequence[float]], rank: int,
                        capacity: Optional[int] = None) -> Traffic:
    """Ids to owners, rows back, row gradients to owners in backward. With a fixed `capacity` per owner, every
    peer gets exactly `capacity` ids (padded) and no counts are exchanged."""
    peers = dims.group_size - 1
    if capacity is None:
        out, inc = _off_rank(requests, rank)
    else:
        out = inc = capacity * peers
    row = dims.value_dim * dims.value_bytes
    traffic = Traffic()
    if capacity is None:
        traffic.add("number.meta", COUNT_BYTES * peers, COUNT_BYTES * peers)
    traffic.add("number.indices", INDEX_BYTES * out, INDEX_BYTES * inc)
    traffic.add_with_backward("number.rows", row * inc, row * out)
    return traffic


def owner_pooled_traffic(dims: LookupDims, tokens: Sequence[int], requests: Sequence[Sequence[float]],
                         rank: int) -> Traffic:
    """Ids, token slots and scores to owners; per-token partial sums [T, E, d_v] back from every owner."""
    peers = dims.group_size - 1
    out, inc = _off_rank(requests, rank)
    partial = dims.num_blocks * dims.value_dim * dims.value_bytes
    others = sum(tokens) - tokens[rank]
    traffic = Traffic()
    traffic.add("pooled.meta", 2 * COUNT_BYTES * peers, 2 * COUNT_BYTES * peers)
    traffic.add("pooled.indices", 2 * INDEX_BYTES * out, 2 * INDEX_BYTES * inc, calls=2)
    score = dims.num_cores * dims.score_bytes
    traffic.add_with_backward("pooled.scores", score * out, score * inc)
    traffic.add_with_backward("pooled.partials", partial * others, partial * tokens[rank] * peers)
    return traffic


def dimension_wise_traffic(dims: LookupDims, tokens: Sequence[int], rank: int, static_tokens: bool) -> Traffic:
    """Ids and own-core scores of every token to every rank; pooled column slices back."""
    peers = dims.group_size - 1
    mine, others = tokens[rank], sum(tokens) - tokens[rank]
    ids = dims.topk * INDEX_BYTES
    scores = dims.topk * dims.cores_per_rank * dims.score_bytes
    slices = dims.num_blocks * (dims.value_dim // dims.group_size) * dims.value_bytes
    traffic = Traffic()
    if not static_tokens:
        traffic.add("dimension.meta", COUNT_BYTES * peers, COUNT_BYTES * peers)
    traffic.add("dimension.indices", ids * mine * peers, ids * others)
    traffic.add_with_backward("dimension.scores", scores * mine * peers, scores * others)
    traffic.add_with_backward("dimension.outputs", slices * others, slices * mine * peers)
    return traffic


def crossover_value_dim(topk: int, num_blocks: int, group_size: int, index_bytes: int = INDEX_BYTES,
                        float_bytes: int = 2, cores_per_rank: int = 1, backward: bool = True) -> float:
    """d_v* where number-wise (rows) and dimension-wise move equal bytes (count exchanges left out); dimension-wise
    is cheaper above it (the paper's Figure 9 curve). With c = 2 passes (forward + backward) or 1 (forward only):
    d_v* = K (P (s_i + c h_loc s_f) - s_i) / (c s_f (K - E)); with s_i = 4, s_f = 2, h_loc = 1 this is
    K (2P - 1) / (K - E) forward + backward and K (3P - 2) / (K - E) forward only (the paper's App. C/D)."""
    if topk <= num_blocks:
        return math.inf
    passes = 2 if backward else 1
    numerator = topk * (group_size * (index_bytes + passes * cores_per_rank * float_bytes) - index_bytes)
    return numerator / (passes * float_bytes * (topk - num_blocks))


def compute_work(variant: Variant, dims: LookupDims, tokens_per_rank: int,
                 capacity: Optional[int] = None) -> tuple[float, float, float, float]:
    """w = [1, n_index, b_gathered, b_pooled] of one rank's local work (module docstring). With a fixed `capacity`
    (number-wise rows only), the owner handles P*capacity padded ids in place of T*K."""
    t, k, p = tokens_per_rank, dims.topk, dims.group_size
    gathered = dims.value_bytes * t * k * dims.value_dim
    pooled = dims.value_bytes * t * dims.num_blocks * dims.value_dim
    if variant == "number" and capacity is not None:
        return 1.0, p * capacity, dims.value_bytes * p * capacity * dims.value_dim, pooled
    if variant == "pooled":
        return 1.0, t * k, gathered, p * pooled
    if variant == "dimension":
        return 1.0, p * t * k, gathered, pooled
    return 1.0, t * k, gathered, pooled


Coefficients = tuple[float, float, float, float]
"""c_v: seconds per call, per index entry, per gathered byte, per pooled-output byte."""
NO_COMPUTE: Coefficients = (0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ComputeModel:
    """compute_v = c_v . compute_work(v, ...) seconds per rank, forward + backward (all zero: not calibrated)."""

    number: Coefficients = NO_COMPUTE
    pooled: Coefficients = NO_COMPUTE
    dimension: Coefficients = NO_COMPUTE

    def seconds(self, variant: Variant, dims: LookupDims, tokens_per_rank: int,
                capacity: Optional[int] = None) -> float:
        work = compute_work(variant, dims, tokens_per_rank, capacity)
        return sum(c * w for c, w in zip(getattr(self, variant), work))

    @property
    def calibrated(self) -> bool:
        return any(any(getattr(self, v)) for v in VARIANTS)

    @classmethod
    def from_json(cls, data: dict) -> "ComputeModel":
        coefficients = {v: tuple(float(c) for c in data[v]) for v in VARIANTS}
        for variant, c in coefficients.items():
            if len(c) != len(NO_COMPUTE):
                raise ValueError(f"compute.{variant} needs {len(NO_COMPUTE)} coefficients, got {len(c)}")
            if not all(math.isfinite(x) and x >= 0 for x in c):
                raise ValueError(f"compute.{variant} must be finite and >= 0, got {list(c)}")
        return cls(**coefficients)


@dataclass(frozen=True)
class Calibration:
    """t(collective) = alpha + beta * bytes (the larger of a rank's sent and received bytes); local compute per
    variant from `compute` (zero unless fitted by `calibrate_compute`)."""

    alpha_s: float
    beta_s_per_byte: float
    backend: str = "assumed"
    world_size: int = 0
    source: str = "default: alpha 20 us, 25 GB/s per rank (a guess for NCCL over InfiniBand; calibrate)"
    compute: ComputeModel = ComputeModel()

    def seconds(self, traffic: Traffic) -> float:
        """Communication time of `traffic`."""
        return sum(self.alpha_s * traffic.calls[tag]
                   + self.beta_s_per_byte * max(traffic.sent[tag], traffic.received[tag]) for tag in traffic.calls)

    def variant_seconds(self, variant: Variant, dims: LookupDims, tokens_per_rank: int) -> tuple[float, float]:
        """(communication, compute) seconds of one variant, forward + backward, balanced requests."""
        return (self.seconds(variant_traffic(variant, dims, tokens_per_rank)),
                self.compute.seconds(variant, dims, tokens_per_rank))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """Files without a `compute` entry (written before the compute term existed) load with compute = 0."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(str(path), "calibration file not found (write one with `umtrain calibrate-comm`)")
        try:
            data = json.loads(path.read_text())
            compute = ComputeModel.from_json(data["compute"]) if "compute" in data else ComputeModel()
            calibration = cls(alpha_s=float(data["alpha_s"]), beta_s_per_byte=float(data["beta_s_per_byte"]),
                              backend=data.get("backend", "?"), world_size=int(data.get("world_size", 0)),
                              source=data.get("source", str(path)), compute=compute)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(str(path), f"is not a calibration JSON (alpha_s, beta_s_per_byte[, compute]): "
                                         f"{err}") from err
        if not (calibration.alpha_s >= 0 and calibration.beta_s_per_byte > 0):
            raise ConfigError(str(path), f"needs alpha_s >= 0 and beta_s_per_byte > 0, got {calibration.alpha_s} and "
                                         f"{calibration.beta_s_per_byte}")
        return calibration


DEFAULT_CALIBRATION = Calibration(alpha_s=20e-6, beta_s_per_byte=1 / 25e9)


def fit_calibration(observations: Sequence[tuple[Traffic, float]], source: str) -> Calibration:
    """Recalibrate from the workload itself: least-squares alpha, beta (>= 0) to measured (traffic, seconds)."""
    calls = torch.tensor([float(sum(t.calls.values())) for t, _ in observations], dtype=torch.float64)
    volume = torch.tensor([float(sum(max(t.sent[k], t.received[k]) for k in t.calls)) for t, _ in observations],
                          dtype=torch.float64)
    seconds = torch.tensor([s for _, s in observations], dtype=torch.float64)
    scale = volume.max().clamp(min=1.0)                      # keep the normal equations well conditioned
    design = torch.stack([calls, volume / scale], dim=1)
    alpha, beta = torch.linalg.lstsq(design, seconds.unsqueeze(1)).solution.view(-1).tolist()
    return Calibration(alpha_s=max(alpha, 0.0), beta_s_per_byte=max(beta / float(scale), 1e-15), backend="fit",
                       source=source)


@dataclass(frozen=True)
class ComputeObservation:
    """One measured forward + backward of a variant, and the communication time the model predicts for it."""

    variant: Variant
    dims: LookupDims
    tokens_per_rank: int
    measured_s: float
    communication_s: float


def fit_compute(observations: Sequence[ComputeObservation]) -> ComputeModel:
    """Per variant, c_v >= 0 minimising sum ((communication + c_v . w - measured) / measured)^2: relative errors,
    so the small sizes (where the per-call term shows) count as much as the large ones."""
    fitted = {}
    for variant in VARIANTS:
        mine = [o for o in observations if o.variant == variant]
        if len(mine) < len(NO_COMPUTE):
            raise ValueError(f"fitting the {variant} compute term needs >= {len(NO_COMPUTE)} observations, "
                             f"got {len(mine)}")
        work = torch.tensor([compute_work(variant, o.dims, o.tokens_per_rank) for o in mine], dtype=torch.float64)
        measured = torch.tensor([o.measured_s for o in mine], dtype=torch.float64)
        remainder = measured - torch.tensor([o.communication_s for o in mine], dtype=torch.float64)
        scale = work.abs().amax(dim=0).clamp(min=1.0)       # keep the normal equations well conditioned
        solution = _non_negative_least_squares(work / scale / measured.unsqueeze(1), remainder / measured)
        fitted[variant] = tuple((solution / scale).tolist())
    return ComputeModel(**fitted)


def _non_negative_least_squares(design: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin ||design x - target|| over x >= 0, exactly, by trying every support (a handful of columns here)."""
    columns = design.shape[1]
    best, best_residual = torch.zeros(columns, dtype=design.dtype), float(target.norm())
    for size in range(1, columns + 1):
        for support in itertools.combinations(range(columns), size):
            x = torch.linalg.lstsq(design[:, support], target.unsqueeze(1)).solution.view(-1)
            if (x < 0).any():
                continue
            candidate = torch.zeros(columns, dtype=design.dtype)
            candidate[list(support)] = x
            residual = float((design @ candidate - target).norm())
            if residual < best_residual:
                best, best_residual = candidate, residual
    return best


@dataclass
class LayerPlan:
    """One memory layer's predicted per-rank traffic (forward + backward, bytes sent) and the chosen mode."""

    layer: int
    placement: str
    group_size: int
    tokens_per_rank: int
    mode: Literal["local", "number", "dimension"]
    owner_pooling: bool
    bytes_number_wise: int
    """The better number-wise variant (rows, or owner-pooled partial sums)."""
    bytes_number_rows: int
    bytes_number_pooled: int
    bytes_dimension_wise: Optional[int]
    """None when d_v cannot be split over P."""
    seconds_number_wise: Optional[float]
    """Predicted communication + local compute of the better number-wise variant; None at P = 1 (`local`)."""
    seconds_dimension_wise: Optional[float]
    """None at P = 1 and when d_v cannot be split over P."""
    reason: str
    compute_seconds_number_wise: Optional[float] = 0.0
    """The local-compute part of seconds_number_wise (0 without a compute calibration; None at P = 1)."""
    compute_seconds_dimension_wise: Optional[float] = None
    capacity: Optional[int] = None
    """Fixed ids per owner when the layer runs number-wise rows with `sharding_capacity_factor` (bytes and seconds
    above include the padding); None otherwise."""
    dedup: bool = False
    """Number-wise rows request each distinct row once per rank (`model.memory.sharding_dedup`)."""


def variant_traffic(variant: Variant, dims: LookupDims, tokens_per_rank: int,
                    capacity: Optional[int] = None) -> Traffic:
    """Rank 0's traffic when every rank has `tokens_per_rank` tokens and requests are balanced; `capacity`: the
    fixed ids per owner of number-wise rows (`model.memory.sharding_capacity_factor`), padding included."""
    tokens = [tokens_per_rank] * dims.group_size
    if variant == "number":
        return number_wise_traffic(dims, balanced_requests(dims, tokens), 0, capacity)
    if variant == "pooled":
        return owner_pooled_traffic(dims, tokens, balanced_requests(dims, tokens), 0)
    return dimension_wise_traffic(dims, tokens, 0, static_tokens=True)


def local_plan(dims: LookupDims, tokens_per_rank: int, layer: int, placement: str) -> LayerPlan:
    """P = 1: no mode to choose and nothing sent, so no time to predict (the seconds are None)."""
    return LayerPlan(layer=layer, placement=placement, group_size=1, tokens_per_rank=tokens_per_rank, mode="local",
                     owner_pooling=False, bytes_number_wise=0, bytes_number_rows=0, bytes_number_pooled=0,
                     bytes_dimension_wise=0, seconds_number_wise=None, seconds_dimension_wise=None,
                     compute_seconds_number_wise=None, reason="the whole table is local, nothing to communicate")


def plan_layer(dims: LookupDims, tokens_per_rank: int, calibration: Calibration,
               requested: Literal["auto", "number", "dimension"] = "auto", layer: int = 0,
               placement: str = "", capacity: Optional[int] = None, dedup: bool = False) -> LayerPlan:
    """Predict both modes (communication + local compute) for one layer and pick the faster (or apply the requested
    mode), saying why. `capacity`: number-wise runs as rows with that many ids per owner (padded, no host sync;
    owner pooling, which exchanges counts, is then not a candidate: the capacity was asked for to avoid that sync).
    `dedup`: number-wise runs as rows with distinct requests (priced without de-duplication, an upper bound)."""
    if dims.group_size == 1:
        return local_plan(dims, tokens_per_rank, layer, placement)
    traffic = {v: variant_traffic(v, dims, tokens_per_rank, capacity) for v in VARIANTS}
    compute = {v: calibration.compute.seconds(v, dims, tokens_per_rank, capacity) for v in VARIANTS}
    seconds = {v: calibration.seconds(t) + compute[v] for v, t in traffic.items()}
    sent = {v: round(t.total_sent()) for v, t in traffic.items()}
    problem = dimension_wise_problem(dims.value_dim, dims.num_cores, dims.group_size)
    rows_only = capacity is not None or dedup
    number = "pooled" if not rows_only and seconds["pooled"] < seconds["number"] else "number"
    if requested == "dimension" and problem:
        raise ConfigError("model.memory.sharding_mode", problem)
    elif requested != "auto":
        mode, reason = requested, f"{requested}-wise requested by model.memory.sharding_mode"
    elif problem:
        mode, reason = "number", f"number-wise: {problem}"
    else:
        chosen, rejected = ("dimension", number) if seconds["dimension"] < seconds[number] else (number, "dimension")
        mode = "dimension" if chosen == "dimension" else "number"
        reason = (f"{_describe(chosen, capacity)}: predicted {seconds[chosen] * 1e3:.3f} ms vs "
                  f"{seconds[rejected] * 1e3:.3f} ms {_describe(rejected, capacity)} ({_mb(sent[chosen])} vs "
                  f"{_mb(sent[rejected])} sent per rank{_compute_note(compute, chosen, rejected)}, forward + backward; "
                  f"calibration: {calibration.backend})")
    if dedup and mode == "number":
        reason += " (sharding_dedup: each distinct row once per rank; priced without de-duplication)"
    return LayerPlan(layer=layer, placement=placement, group_size=dims.group_size, tokens_per_rank=tokens_per_rank,
                     mode=mode, owner_pooling=mode == "number" and number == "pooled",
                     bytes_number_wise=sent[number], bytes_number_rows=sent["number"],
                     bytes_number_pooled=sent["pooled"], bytes_dimension_wise=None if problem else sent["dimension"],
                     seconds_number_wise=seconds[number],
                     seconds_dimension_wise=None if problem else seconds["dimension"], reason=reason,
                     compute_seconds_number_wise=compute[number],
                     compute_seconds_dimension_wise=None if problem else compute["dimension"],
                     capacity=capacity if mode == "number" else None, dedup=dedup and mode == "number")


def _compute_note(compute: dict[Variant, float], chosen: Variant, rejected: Variant) -> str:
    if not any(compute.values()):
        return ""
    return f"; local compute {compute[chosen] * 1e3:.3f} vs {compute[rejected] * 1e3:.3f} ms"


def _describe(variant: Variant, capacity: Optional[int] = None) -> str:
    if variant == "number" and capacity is not None:
        return f"number-wise (fixed capacity {capacity} ids per owner)"
    return {"number": "number-wise", "pooled": "number-wise (owner-pooled)", "dimension": "dimension-wise"}[variant]


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.3f} MB"


def tokens_per_rank(config: Config) -> int:
    """Tokens one rank of the memory group looks up per micro-batch: the whole micro-batch, or this rank's 1/TP of
    the sequence under sequence parallelism (umtrain.parallel.sequence)."""
    tokens = config.training.micro_batch_size * config.data.seq_length
    p = config.parallel
    return tokens // p.tensor_model_parallel_size if p.sequence_parallel else tokens


def table_gradient_tp_sum_bytes(config: Config) -> int:
    """Bytes of one memory layer's table-shard gradient (fp32) that each rank also all-reduces over TP per step: under
    sequence parallelism TP peers fill their replicas of a `memory_parallel_group: data` shard from different tokens
    (umtrain.parallel.memory_tables); 0 otherwise (`tensor_data` groups need no such sum)."""
    p, memory = config.parallel, config.model.memory
    if not (p.sequence_parallel and p.tensor_model_parallel_size > 1 and p.memory_parallel_group == "data"):
        return 0
    return 4 * memory.num_values * memory.value_dim // p.expert_model_parallel_size


def dims_from_config(config: Config, cuda: Optional[bool] = None) -> LookupDims:
    """Values and scores travel in the training dtype (`TrainingConfig.params_dtype`); `cuda`: whether the ranks
    train on GPUs (default: this machine's, as at start-up; a plan for another cluster passes the target's)."""
    memory = config.model.memory
    if memory is None:
        raise ConfigError("model.memory", f"family '{config.model.family}' has no memory layers to plan")
    float_bytes = config.training.params_dtype(cuda).itemsize
    return LookupDims(value_dim=memory.value_dim, topk=memory.num_heads * memory.topk,
                      num_blocks=memory.ive_expansion, num_cores=memory.num_cores,
                      group_size=config.parallel.expert_model_parallel_size, value_bytes=float_bytes,
                      score_bytes=float_bytes)


def plan_config(config: Config, calibration: Calibration = DEFAULT_CALIBRATION,
                cuda: Optional[bool] = None) -> list[LayerPlan]:
    """One plan per entry of model.memory.placements; `cuda` as in `dims_from_config`."""
    dims = dims_from_config(config, cuda)
    tokens = tokens_per_rank(config)
    memory = config.model.memory
    capacity = fixed_capacity(config, dims.group_size)
    return [plan_layer(dims, tokens, calibration, memory.sharding_mode, layer=i, placement=placement,
                       capacity=capacity, dedup=memory.sharding_dedup)
            for i, placement in enumerate(memory.placements)]


def fixed_capacity(config: Config, group_size: int) -> Optional[int]:
    """ids one rank may send to one owner per call in fixed-capacity number-wise mode: the balanced share T*K/P
    times model.memory.sharding_capacity_factor; None when the factor is unset (uneven all-to-alls)."""
    memory = config.model.memory
    if memory.sharding_capacity_factor is None:
        return None
    balanced = tokens_per_rank(config) * memory.num_heads * memory.topk / group_size
    return math.ceil(memory.sharding_capacity_factor * balanced)
