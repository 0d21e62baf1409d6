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

Host syncs (GPU): the number-wise modes exchange per-rank request counts and read them on the host (one
`.tolist()` per memory layer and micro-batch; the split sizes of an uneven all-to-all must be known on the host).
The dimension-wise mode needs none when `tokens_per_rank` is given (all ranks then hold that many tokens);
otherwise it exchanges token counts, which costs one such sync.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import LookupReduce
from umtrain.parallel.comm import Communicator, all_to_all
from umtrain.parallel.cost_model import LayerPlan, dimension_wise_problem

logger = logging.getLogger(__name__)

ShardingMode = Literal["local", "number", "dimension"]

INDEX_DTYPE = torch.int32
"""Dtype of every index that crosses ranks (4 bytes, the cost model's s_i)."""


def mark_table_shard(param: torch.nn.Parameter) -> torch.nn.Parameter:
    """Flag a value-table shard as an expert-parallel parameter: Megatron's DDP and distributed optimizer then
    reduce it over the expert-data-parallel group only (MEGATRON_EXTENSION_NOTES.md). Keep it at P = 1 too."""
    param.allreduce = False
    return param


def row_offsets(num_rows: int, parts: int) -> list[int]:
    """Boundaries of `parts` contiguous ranges of [0, num_rows), sizes differing by at most one."""
    base, extra = divmod(num_rows, parts)
    offsets = [0]
    for part in range(parts):
        offsets.append(offsets[-1] + base + (part < extra))
    return offsets


def _to_index(values: torch.Tensor, what: str) -> torch.Tensor:
    if values.numel() and int(values.max()) > torch.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{what} exceed {INDEX_DTYPE}; the table is too large for the index dtype")
    return values.to(INDEX_DTYPE)


def _check_inputs(rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                  expected_shape: tuple[int, int]) -> None:
    if rows.shape != blocks.shape or rows.dim() != 2:
        raise ValueError(f"rows {tuple(rows.shape)} and blocks {tuple(blocks.shape)} must both be [T, K]")
    if scores.dim() != 3 or tuple(scores.shape[1:]) != tuple(rows.shape):
        raise ValueError(f"scores {tuple(scores.shape)} must be [h, T, K] with [T, K] = {tuple(rows.shape)}")
    if tuple(table_shard.shape) != expected_shape:
        raise ValueError(f"table shard is {tuple(table_shard.shape)}, this rank's shard is {expected_shape}")


def _pool(local_impl: LookupReduce, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor,
          table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """local_impl, except that with nothing to pool the result stays attached to `table` and `scores`: a rank
    without tokens (or an owner without requests) must still take part in the backward's collectives."""
    if rows.numel() == 0:
        anchor = (table.sum() + scores.sum()) * 0
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

    def shard_offset(self) -> tuple[int, int]:
        """(row, column) of this rank's shard inside the full [N, d_v] table."""
        raise NotImplementedError

    def shard_of(self, full_table: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a full table (for initialisation from a full table, and tests)."""
        rows, cols = self.local_table_shape()
        row, col = self.shard_offset()
        return full_table[row:row + rows, col:col + cols]


class LocalLookup(ShardedLookup):
    """P = 1: the whole table is local; the lookup is local_impl itself."""

    shard_axis = 0

    def local_table_shape(self) -> tuple[int, int]:
        return self.num_rows, self.value_dim

    def shard_offset(self) -> tuple[int, int]:
        return 0, 0

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        return self.local_impl(rows, blocks, scores, table_shard, num_blocks)


class NumberWiseLookup(ShardedLookup):
    """Rows split into P contiguous ranges (uneven when P does not divide N)."""

    shard_axis = 0

    def __init__(self, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int, local_impl: LookupReduce,
                 dedup: bool = False, owner_pooling: bool = False, comm: Optional[Communicator] = None):
        super().__init__(group, num_rows, value_dim, local_impl, comm)
        if num_rows < self.size:
            raise ValueError(f"number-wise sharding needs at least one row per rank: N={num_rows} < P={self.size}")
        self.dedup, self.owner_pooling = dedup, owner_pooling
        self.offsets = row_offsets(num_rows, self.size)

    def local_table_shape(self) -> tuple[int, int]:
        return self.offsets[self.rank + 1] - self.offsets[self.rank], self.value_dim

    def shard_offset(self) -> tuple[int, int]:
        return self.offsets[self.rank], 0

    def owners(self, rows: torch.Tensor) -> torch.Tensor:
        boundaries = torch.tensor(self.offsets[1:-1], dtype=rows.dtype, device=rows.device)
        return torch.bucketize(rows, boundaries, right=True)

    def local_rows(self, rows: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        starts = torch.tensor(self.offsets[:-1], dtype=rows.dtype, device=rows.device)
        return _to_index(rows - starts[owners], "local row ids")

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        _check_inputs(rows, blocks, scores, table_shard, self.local_table_shape())
        if self.owner_pooling:
            return self._pool_at_owners(rows, blocks, scores, table_shard, num_blocks)
        return self._fetch_rows(rows, blocks, scores, table_shard, num_blocks)

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
        send = torch.bincount(owners, minlength=self.size)
        recv = self.comm.exchange_counts(send.view(-1, 1), "number.meta").view(-1)
        send_splits, recv_splits = send.tolist(), recv.tolist()             # host sync on GPU
        incoming = self.comm.all_to_all(self.local_rows(requested, owners), send_splits, recv_splits, "number.indices")
        gathered = table_shard[incoming.long()]                             # owner side
        fetched = all_to_all(self.comm, gathered, recv_splits, send_splits, "number.rows")
        return _pool(self.local_impl, inverse.view_as(rows), blocks, scores, fetched, num_blocks)

    def _pool_at_owners(self, rows, blocks, scores, table_shard, num_blocks):
        tokens, k = rows.shape
        flat_rows = rows.reshape(-1)
        owners = self.owners(flat_rows)
        order = torch.argsort(owners, stable=True)
        send = torch.bincount(owners, minlength=self.size)
        meta = torch.stack([send, torch.full_like(send, tokens)], dim=1)
        recv = self.comm.exchange_counts(meta, "pooled.meta")
        send_splits, recv_splits = send.tolist(), recv[:, 0].tolist()      # host sync on GPU
        source_tokens = recv[:, 1].tolist()

        token_of_request = torch.arange(tokens, device=rows.device).repeat_interleave(k)
        slots = token_of_request * num_blocks + blocks.reshape(-1)
        in_rows = self.comm.all_to_all(self.local_rows(flat_rows, owners)[order], send_splits, recv_splits,
                                       "pooled.indices")
        in_slots = self.comm.all_to_all(_to_index(slots[order], "token slots"), send_splits, recv_splits,
                                        "pooled.indices")
        in_scores = all_to_all(self.comm, scores.reshape(scores.shape[0], -1).t()[order], send_splits, recv_splits,
                               "pooled.scores")                              # [R_in, h]

        first_token = torch.tensor([0] + source_tokens[:-1], device=rows.device).cumsum(0)
        in_slots = in_slots.long() + torch.repeat_interleave(first_token * num_blocks,
                                                             torch.tensor(recv_splits, device=rows.device))
        all_tokens = sum(source_tokens)
        partial = _pool(self.local_impl, in_rows.long().view(1, -1), in_slots.view(1, -1), in_scores.t().unsqueeze(1),
                                  table_shard, all_tokens * num_blocks)      # [1, sum_s T_s * E, d_v]
        partial = partial.view(all_tokens, num_blocks, self.value_dim)
        returned = all_to_all(self.comm, partial, source_tokens, [tokens] * self.size, "pooled.partials")
        return returned.view(self.size, tokens, num_blocks, self.value_dim).sum(0)


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

    def shard_offset(self) -> tuple[int, int]:
        return 0, self.rank * self.cols

    def cores_of(self, rank: int) -> slice:
        """The MCS cores whose value slices overlap rank's columns."""
        first = rank * self.num_cores // self.size
        return slice(first, max(first + 1, (rank + 1) * self.num_cores // self.size))

    def token_counts(self, tokens: int) -> list[int]:
        if self.tokens_per_rank is not None:
            if tokens != self.tokens_per_rank:
                raise ValueError(f"this rank has {tokens} tokens; the lookup was built for tokens_per_rank="
                                 f"{self.tokens_per_rank}")
            return [tokens] * self.size
        counts = torch.full((self.size, 1), tokens, dtype=torch.int64)
        return self.comm.exchange_counts(counts, "dimension.meta").view(-1).tolist()

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table_shard: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        _check_inputs(rows, blocks, scores, table_shard, self.local_table_shape())
        if scores.shape[0] != self.num_cores:
            raise ValueError(f"scores carry {scores.shape[0]} MCS cores; the lookup was built for {self.num_cores}")
        tokens = rows.shape[0]
        counts = self.token_counts(tokens)
        mine = [tokens] * self.size

        ids = _to_index(rows * num_blocks + blocks, "virtual ids").repeat(self.size, 1)
        all_ids = self.comm.all_to_all(ids, mine, counts, "dimension.indices").long()
        per_rank_scores = torch.cat([scores[self.cores_of(r)].transpose(0, 1) for r in range(self.size)])
        all_scores = all_to_all(self.comm, per_rank_scores, mine, counts, "dimension.scores")   # [sum T, h_loc, K]
        pooled = _pool(self.local_impl, all_ids // num_blocks, all_ids % num_blocks, all_scores.transpose(0, 1), table_shard,
                                 num_blocks)                                                     # [sum T, E, d_v/P]
        slices = all_to_all(self.comm, pooled, counts, mine, "dimension.outputs")               # [P*T, E, d_v/P]
        return slices.view(self.size, tokens, num_blocks, self.cols).permute(1, 2, 0, 3).reshape(
            tokens, num_blocks, self.value_dim)


def make_sharded_lookup(mode: ShardingMode, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int,
                        local_impl: LookupReduce, num_cores: int = 1, tokens_per_rank: Optional[int] = None,
                        dedup: bool = False, owner_pooling: bool = False,
                        comm: Optional[Communicator] = None) -> ShardedLookup:
    """The lookup for a concrete mode ('auto' is resolved per layer by `umtrain.parallel.cost_model.plan_layer`)."""
    if mode == "local":
        comm = comm if comm is not None else Communicator(group)
        if comm.size != 1:
            raise ValueError(f"mode 'local' is for a group of one rank, this group has {comm.size}")
        return LocalLookup(group, num_rows, value_dim, local_impl, comm)
    if mode == "number":
        return NumberWiseLookup(group, num_rows, value_dim, local_impl, dedup=dedup, owner_pooling=owner_pooling,
                                comm=comm)
    if mode == "dimension":
        return DimensionWiseLookup(group, num_rows, value_dim, local_impl, num_cores=num_cores,
                                   tokens_per_rank=tokens_per_rank, comm=comm)
    raise ValueError(f"sharding mode must be 'local', 'number' or 'dimension' (resolve 'auto' with the cost model), "
                     f"got {mode!r}")


def lookup_from_plan(plan: LayerPlan, group: Optional[dist.ProcessGroup], num_rows: int, value_dim: int,
                     local_impl: LookupReduce, num_cores: int = 1, dedup: bool = False) -> ShardedLookup:
    """The lookup the cost model chose for one memory layer (`cost_model.plan_config`); logs the reason."""
    logger.info("memory layer %d (%s), P=%d: %s", plan.layer, plan.placement, plan.group_size, plan.reason)
    return make_sharded_lookup(plan.mode, group, num_rows, value_dim, local_impl, num_cores=num_cores,
                               tokens_per_rank=plan.tokens_per_rank, dedup=dedup, owner_pooling=plan.owner_pooling)
