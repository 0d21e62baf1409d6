"""Value tables sharded over the memory-parallel group (= Megatron-Core's expert-parallel group), [P] App. C/D.

Each class here is a lookup-reduce (`umtrain.ops.lookup_reduce`): called with this rank's tokens and this
rank's table shard, it returns the pooled [T, E, d_v] of this rank's tokens, exactly as the single-rank
lookup on the full table would. `rows` are global physical row ids in [0, N). The memory layer only needs
`local_table_shape()` to build its shard; it never sees a process group.

- `NumberWiseLookup`: rows split into P contiguous ranges. Requests travel to the owning ranks (an all-to-all of
  uneven sizes), owners gather the rows, the rows come back, and the source pools them (scores never move).
  With `owner_pooling`, owners instead pool their rows into per-token partial sums [T, E, d_v] and return those
  (the scores travel to the owners). With `dedup`, each distinct row is requested once per rank.
- `DimensionWiseLookup`: d_v split into P column slices. Every rank receives the indices of every token of the
  group (and the scores of the MCS cores its columns belong to), pools its slice for all of them, and the
  slices return to the tokens' ranks.

Backward needs no code of its own: every exchange is the differentiable all-to-all of `umtrain.parallel.comm`,
whose backward sends the gradient along the reverse path, so a shard's gradient is accumulated on its owner only.

Host syncs (GPU): an all-to-all of uneven sizes needs its split sizes on the host.
- Dimension-wise with `tokens_per_rank` (every rank holds that many tokens, known from the config): none.
  Without it, token counts are exchanged and read: one sync per call.
- Number-wise with `capacity` (ids per owner, e.g. ceil(c * T*K/P) for a factor c > 1): none; padded
  fixed-size exchanges, and an overflow flag on the device that `take_overflow()` reads where the host syncs
  anyway (`umtrain.parallel.memory_tables.check_table_overflow`). Without it (and always with `dedup` or `owner_pooling`), per-owner request counts are exchanged and
  read: one sync per call, which stalls the host until the GPU has computed the indices.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import LookupReduce, check_lookup_shapes
from umtrain.parallel.comm import Communicator, all_to_all
from umtrain.parallel.cost_model import LayerPlan, dimension_wise_problem

logger = logging.getLogger(__name__)

ShardingMode = Literal["local", "number", "dimension"]

INDEX_DTYPE = torch.int32
"""Dtype of every index that crosses ranks (4 bytes, the cost model's s_i)."""


def mark_table_shard(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Flag a value-table shard as an expert-parallel parameter: Megatron's DDP and distributed optimizer then
    reduce it over the expert-data-parallel group only (docs/parallelism.md). Keep it at P = 1 too."""
    param.allreduce = False
    return param


def row_offsets(num_rows: int, parts: int) -> list[int]:
    """Boundaries of `parts` contiguous ranges of [0, num_rows), sizes differing by at most one."""
    base, extra = divmod(num_rows, parts)
    offsets = [0]
    for part in range(parts):
        offsets.append(offsets[-1] + base + (part < extra))
    return offsets


def _to_index(values: torch.Tensor, bound: int, what: str) -> torch.Tensor:
    """values (all < bound, known from shapes: no look at the data, so no host sync) as INDEX_DTYPE."""
    if bound > torch.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{what} reach {bound}, beyond {INDEX_DTYPE}")
    return values.to(INDEX_DTYPE)


def _check_inputs(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                  expected_shape: tuple[int, int]) -> None:
    check_lookup_shapes(rows, blocks, scores)
    if tuple(table_shard.shape) != expected_shape:
        raise ValueError(f"table shard is {tuple(table_shard.shape)}, this rank's shard is {expected_shape}")


def _pool(local_impl: LookupReduce, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor,
          table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """local_impl, except that with nothing to pool the result stays attached to `table` and `scores`: a rank
    without tokens (or an owner without requests) must still take part in the backward's collectives."""
    if rows.numel() == 0:
        anchor = table[:0].sum() + scores.flatten()[:0].sum()      # 0, not 0 * sum (NaN where the table has an inf)
        return anchor + table.new_zeros(rows.shape[0], num_blocks, table.shape[1])
    return local_impl(rows, blocks, scores, table, num_blocks)


class ShardedLookup:
    """What both partitions share: the group, the full table shape and this rank's shard of it."""

    shard_axis: int
    """0: rows are split (number-wise); 1: columns are split (dimension-wise)."""

    def __init__(self, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int, local_impl: LookupReduce,
                 comm: Optional[Communicator] = None):
        self.comm = comm if comm is not None else Communicator(group)
        self.num_rows, self.value_dim, self.local_impl = num_rows, value_dim, local_impl
        self.rank, self.size = self.comm.rank, self.comm.size

    def local_table_shape(self) -> tuple[int, int]:
        raise NotImplementedError


class LocalLookup(ShardedLookup):
    """P = 1: the whole table is local; the lookup is local_impl itself."""

    shard_axis = 0

    def local_table_shape(self) -> tuple[int, int]:
        return self.num_rows, self.value_dim

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        return self.local_impl(rows, blocks, scores, table_shard, num_blocks)


def overflow_message() -> str:
    return ("number-wise sharding: a rank sent more ids to one owner than its fixed capacity, so the memory "
            "outputs of the step are wrong; raise model.memory.sharding_capacity_factor")


class NumberWiseLookup(ShardedLookup):
    """Rows split into P contiguous ranges (uneven when P does not divide N)."""

    shard_axis = 0

    def __init__(self, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int, local_impl: LookupReduce,
                 dedup: bool = False, owner_pooling: bool = False, capacity: Optional[int] = None,
                 comm: Optional[Communicator] = None):
        super().__init__(group, num_rows, value_dim, local_impl, comm)
        if num_rows < self.size:
            raise ValueError(f"number-wise sharding needs at least one row per rank: N={num_rows} < P={self.size}")
        if capacity is not None and (dedup or owner_pooling or capacity < 1):
            raise ValueError("capacity (>= 1) applies to plain number-wise sharding, without dedup or owner_pooling")
        self.dedup, self.owner_pooling, self.capacity = dedup, owner_pooling, capacity
        self.offsets = row_offsets(num_rows, self.size)
        self._device_offsets: dict[torch.device, torch.Tensor] = {}
        self.overflow: Optional[torch.Tensor] = None
        """With a capacity: a device flag, set when a rank sent more than `capacity` ids to one owner."""

    def local_table_shape(self) -> tuple[int, int]:
        return self.offsets[self.rank + 1] - self.offsets[self.rank], self.value_dim

    def offsets_on(self, device: torch.device) -> torch.Tensor:
        """The row offsets on `device`, copied once (a blocking host-to-device copy waits for the GPU)."""
        if device not in self._device_offsets:
            self._device_offsets[device] = torch.tensor(self.offsets, dtype=torch.int64, device=device)
        return self._device_offsets[device]

    def owners(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(rows, self.offsets_on(rows.device)[1:-1].to(rows.dtype), right=True)

    def requests_per_owner(self, owners: torch.Tensor) -> torch.Tensor:
        """[P] counts, on the device; not `torch.bincount`, which reads its input's min and max on the host (CUDA)."""
        return torch.zeros(self.size, dtype=torch.int64, device=owners.device).scatter_add_(
            0, owners, torch.ones_like(owners))

    def local_rows(self, rows: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        starts = self.offsets_on(rows.device)[:-1]
        return _to_index(rows - starts[owners], self.local_table_shape()[0], "local row ids")

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        _check_inputs(rows, blocks, scores, table_shard, self.local_table_shape())
        if self.owner_pooling:
            return self._pool_at_owners(rows, blocks, scores, table_shard, num_blocks)
        if self.capacity is not None:
            return self._fetch_rows_fixed(rows, blocks, scores, table_shard, num_blocks)
        return self._fetch_rows(rows, blocks, scores, table_shard, num_blocks)

    def take_overflow(self) -> bool:
        """Whether a capacity overflowed on this rank since the last call (reads a device flag: call it where the
        host syncs anyway; the outputs of an overflowed step are wrong)."""
        overflowed = self.overflow is not None and bool(self.overflow)
        self.overflow = None
        return overflowed

    def _requested_rows(self, flat_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ascending rows to fetch, position of each request among them); ascending = grouped by owner."""
        if self.dedup:
            return torch.unique(flat_rows, sorted=True, return_inverse=True)
        requested, order = flat_rows.sort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return requested, inverse

    def _fetch_rows(self, rows, blocks, scores, table_shard, num_blocks):
        requested, inverse = self._requested_rows(rows.reshape(-1))
        owners = self.owners(requested)
        send = self.requests_per_owner(owners)
        recv = self.comm.exchange_counts(send.view(-1, 1), "number.meta").view(-1)
        send_splits, recv_splits = send.tolist(), recv.tolist()             # host sync on GPU
        incoming = self.comm.all_to_all(self.local_rows(requested, owners), send_splits, recv_splits, "number.indices")
        gathered = table_shard[incoming.long()]                             # owner side
        fetched = all_to_all(self.comm, gathered, recv_splits, send_splits, "number.rows")
        return _pool(self.local_impl, inverse.view_as(rows), blocks, scores, fetched, num_blocks)

    def _fetch_rows_fixed(self, rows, blocks, scores, table_shard, num_blocks):
        """As _fetch_rows with `capacity` ids per owner (padded with local row 0): sizes known on the host, no count
        exchange and no host sync; more ids than that to one owner set `overflow` (see take_overflow)."""
        requested, inverse = self._requested_rows(rows.reshape(-1))
        owners = self.owners(requested)
        counts = self.requests_per_owner(owners)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(owners.numel(), device=rows.device) - first[owners]
        exceeded = (counts > self.capacity).any()
        self.overflow = exceeded if self.overflow is None else self.overflow | exceeded
        slot = owners * self.capacity + position.clamp(max=self.capacity - 1)
        send = torch.zeros(self.size * self.capacity, dtype=INDEX_DTYPE, device=rows.device)
        send.scatter_(0, slot, self.local_rows(requested, owners))
        fixed = [self.capacity] * self.size
        incoming = self.comm.all_to_all(send, fixed, fixed, "number.indices")
        fetched = all_to_all(self.comm, table_shard[incoming.long()], fixed, fixed, "number.rows")
        return _pool(self.local_impl, slot[inverse].view_as(rows), blocks, scores, fetched, num_blocks)

    def _pool_at_owners(self, rows, blocks, scores, table_shard, num_blocks):
        tokens, k = rows.shape
        flat_rows = rows.reshape(-1)
        owners = self.owners(flat_rows)
        order = torch.argsort(owners, stable=True)
        send = self.requests_per_owner(owners)
        meta = self.comm.exchange_counts(torch.stack([send, torch.full_like(send, tokens)], dim=1), "pooled.meta")
        send_splits, recv_splits = send.tolist(), meta[:, 0].tolist()      # host sync on GPU
        source_tokens = meta[:, 1].tolist()

        token_of_request = torch.arange(tokens, device=rows.device).repeat_interleave(k)
        slots = _to_index(token_of_request * num_blocks + blocks.reshape(-1), tokens * num_blocks, "token slots")
        in_rows = self.comm.all_to_all(self.local_rows(flat_rows, owners)[order], send_splits, recv_splits,
                                       "pooled.indices")
        in_slots = self.comm.all_to_all(slots[order], send_splits, recv_splits, "pooled.indices")
        in_scores = all_to_all(self.comm, scores.reshape(scores.shape[0], -1).t()[order], send_splits, recv_splits,
                               "pooled.scores")                              # [R_in, h]
        partial = self._partial_sums(in_rows, in_slots, in_scores, recv_splits, source_tokens, table_shard, num_blocks)
        returned = all_to_all(self.comm, partial, source_tokens, [tokens] * self.size, "pooled.partials")
        return returned.view(self.size, tokens, num_blocks, self.value_dim).sum(0)

    def _partial_sums(self, in_rows, in_slots, in_scores, recv_splits, source_tokens, table_shard, num_blocks):
        """Owner side: [sum_s T_s, E, d_v], every source token's sum over the requests it sent here. One lookup-
        reduce call with a single 'token' whose virtual blocks are (source token, IVE block) pairs."""
        device = in_rows.device
        first_token = torch.tensor([0] + source_tokens[:-1], device=device).cumsum(0)
        per_request = torch.repeat_interleave(first_token * num_blocks, torch.tensor(recv_splits, device=device))
        slots = in_slots.long() + per_request
        all_tokens = sum(source_tokens)
        partial = _pool(self.local_impl, in_rows.long().view(1, -1), slots.view(1, -1), in_scores.t().unsqueeze(1),
                        table_shard, all_tokens * num_blocks)
        return partial.view(all_tokens, num_blocks, self.value_dim)


class DimensionWiseLookup(ShardedLookup):
    """Columns split into P slices of d_v / P; with MCS, each slice must lie within whole cores or hold whole cores."""

    shard_axis = 1

    def __init__(self, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int, local_impl: LookupReduce,
                 num_cores: int = 1, tokens_per_rank: Optional[int] = None, comm: Optional[Communicator] = None):
        super().__init__(group, num_rows, value_dim, local_impl, comm)
        problem = dimension_wise_problem(value_dim, num_cores, self.size)
        if problem:
            raise ValueError(problem)
        self.num_cores, self.tokens_per_rank = num_cores, tokens_per_rank
        self.cols = value_dim // self.size

    def local_table_shape(self) -> tuple[int, int]:
        return self.num_rows, self.cols

    def cores_of(self, rank: int) -> slice:
        """The MCS cores whose value slices overlap rank's columns."""
        first = rank * self.num_cores // self.size
        return slice(first, max(first + 1, (rank + 1) * self.num_cores // self.size))

    def token_counts(self, tokens: int, device: torch.device) -> list[int]:
        """Token counts of the group's ranks. Training micro-batches have the configured size on every rank, so no
        exchange is needed; any other size (evaluation or generation batches) is exchanged, which requires every rank
        of the group to be off the configured size in the same call."""
        if self.tokens_per_rank is not None and tokens == self.tokens_per_rank:
            return [tokens] * self.size
        counts = torch.full((self.size, 1), tokens, dtype=torch.int64, device=device)
        return self.comm.exchange_counts(counts, "dimension.meta").view(-1).tolist()      # host sync on GPU

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        _check_inputs(rows, blocks, scores, table_shard, self.local_table_shape())
        if scores.shape[0] != self.num_cores:
            raise ValueError(f"scores carry {scores.shape[0]} MCS cores; the lookup was built for {self.num_cores}")
        tokens = rows.shape[0]
        counts = self.token_counts(tokens, rows.device)
        mine = [tokens] * self.size

        ids = _to_index(rows * num_blocks + blocks, self.num_rows * num_blocks, "virtual ids").repeat(self.size, 1)
        all_ids = self.comm.all_to_all(ids, mine, counts, "dimension.indices").long()
        per_rank_scores = torch.cat([scores[self.cores_of(r)].transpose(0, 1) for r in range(self.size)])
        all_scores = all_to_all(self.comm, per_rank_scores, mine, counts, "dimension.scores")   # [sum T, h_loc, K]
        pooled = _pool(self.local_impl, all_ids // num_blocks, all_ids % num_blocks, all_scores.transpose(0, 1),
                       table_shard, num_blocks)                                                  # [sum T, E, d_v/P]
        slices = all_to_all(self.comm, pooled, counts, mine, "dimension.outputs")               # [P*T, E, d_v/P]
        return slices.view(self.size, tokens, num_blocks, self.cols).permute(1, 2, 0, 3).reshape(
            tokens, num_blocks, self.value_dim)


def make_sharded_lookup(mode: ShardingMode, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int,
                        local_impl: LookupReduce, num_cores: int = 1, tokens_per_rank: Optional[int] = None,
                        dedup: bool = False, owner_pooling: bool = False, capacity: Optional[int] = None,
                        comm: Optional[Communicator] = None) -> ShardedLookup:
    """The lookup for a concrete mode ('auto' is resolved per layer by `umtrain.parallel.cost_model.plan_layer`)."""
    if mode == "local":
        comm = comm if comm is not None else Communicator(group)
        if comm.size != 1:
            raise ValueError(f"mode 'local' is for a group of one rank, this group has {comm.size}")
        return LocalLookup(group, num_rows, value_dim, local_impl, comm)
    if mode == "number":
        return NumberWiseLookup(group, num_rows, value_dim, local_impl, dedup=dedup, owner_pooling=owner_pooling,
                                capacity=capacity, comm=comm)
    if mode == "dimension":
        return DimensionWiseLookup(group, num_rows, value_dim, local_impl, num_cores=num_cores,
                                   tokens_per_rank=tokens_per_rank, comm=comm)
    raise ValueError(f"sharding mode must be 'local', 'number' or 'dimension' (resolve 'auto' with the cost model), "
                     f"got {mode!r}")


def lookup_from_plan(plan: LayerPlan, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int,
                     local_impl: LookupReduce, num_cores: int = 1) -> ShardedLookup:
    """The lookup the cost model chose for one memory layer (`cost_model.plan_config`); logs the reason (on global
    rank 0: every rank builds the same plan)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info("memory layer %d (%s), P=%d: %s", plan.layer, plan.placement, plan.group_size, plan.reason)
    return make_sharded_lookup(plan.mode, group, num_rows, value_dim, local_impl, num_cores=num_cores,
                               tokens_per_rank=plan.tokens_per_rank, dedup=plan.dedup, owner_pooling=plan.owner_pooling,
                               capacity=plan.capacity)
