"""Sharded lookups (number-wise, owner-pooled, de-duplicated, dimension-wise) against the single-rank reference
lookup on the full table: outputs, score gradients and the gathered table gradient, on gloo groups of 2 and 4
processes; and every counted byte against the cost model. Each rank's shard is cut from the full table here, with
`torch.tensor_split` (sizes differing by at most one, larger first), not with the lookup's own offsets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from distributed_helpers import run_on_ranks

from umtrain.ops.host_sync import record_host_syncs
from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.comm import Communicator
from umtrain.parallel.cost_model import (DEFAULT_CALIBRATION, LookupDims, dimension_wise_traffic,
                                         number_wise_traffic, owner_pooled_traffic, plan_layer)
from umtrain.parallel.memory_sharding import (DimensionWiseLookup, LocalLookup, NumberWiseLookup, lookup_from_plan,
                                              make_sharded_lookup, mark_table_shard, row_offsets)

NUM_ROWS, VALUE_DIM, TOPK = 50, 8, 6          # 50 rows: uneven ranges at P = 4


@dataclass(frozen=True)
class Case:
    mode: str
    options: tuple = ()
    num_blocks: int = 1
    num_cores: int = 1
    scenario: str = "random"
    """random; skew: every request lands on the last rank (row 0, on rank 0, is inf); empty: rank 1 has no tokens;
    static: 3 tokens per rank."""

    def tokens(self, world: int) -> list[int]:
        if self.scenario == "static":
            return [3] * world
        tokens = [5, 3, 4, 2][:world]
        if self.scenario == "empty":
            tokens[1] = 0
        return tokens


def inputs(case: Case, world: int, seed: int = 0):
    """The full problem, identical on every process: table, and every rank's tokens concatenated."""
    g = torch.Generator().manual_seed(seed)
    total = sum(case.tokens(world))
    table = torch.randn(NUM_ROWS, VALUE_DIM, generator=g)
    low = row_offsets(NUM_ROWS, world)[-2] if case.scenario == "skew" else 0
    if case.scenario == "skew":
        table[0] = float("inf")                  # a row no token requests, on an owner without requests: never read
    rows = torch.randint(low, NUM_ROWS, (total, TOPK), generator=g)
    rows[:, 1] = rows[:, 0]                      # repeated indices (what de-duplication removes)
    blocks = torch.randint(0, case.num_blocks, (total, TOPK), generator=g)
    scores = torch.randn(case.num_cores, total, TOPK, generator=g)
    weight = torch.randn(total, case.num_blocks, VALUE_DIM, generator=g)
    return table, rows, blocks, scores, weight


def _sharded_worker(rank: int, world: int, cases: list[Case]) -> dict:
    return {"cases": [_run_case(rank, world, case) for case in cases], "overflow": _overflow_flags(rank, world)}


def _overflow_flags(rank: int, world: int) -> list[bool]:
    """`take_overflow` after a call where only rank 0 sends more than `capacity` ids to one owner, and again."""
    case = Case("number", (("capacity", 2),))
    _, rows, blocks, scores, _ = inputs(case, world)
    lookup = make_sharded_lookup("number", dist.group.WORLD, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, capacity=2)
    tokens = 3 if rank == 0 else 0
    lookup(rows[:tokens], blocks[:tokens], scores[:, :tokens], torch.zeros(lookup.local_table_shape()), 1)
    return [lookup.take_overflow(), lookup.take_overflow()]


def shard_of(table: torch.Tensor, lookup, rank: int, world: int) -> torch.Tensor:
    return torch.tensor_split(table, world, dim=lookup.shard_axis)[rank]


def _run_case(rank: int, world: int, case: Case) -> dict:
    table, rows, blocks, scores, weight = inputs(case, world)
    tokens = case.tokens(world)
    mine = slice(sum(tokens[:rank]), sum(tokens[:rank + 1]))
    comm = Communicator(dist.group.WORLD)
    options = dict(case.options)
    if case.mode == "dimension":
        options["num_cores"] = case.num_cores
    lookup = make_sharded_lookup(case.mode, dist.group.WORLD, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, comm=comm,
                                 **options)
    shard = mark_table_shard(torch.nn.Parameter(shard_of(table, lookup, rank, world).clone()))
    my_scores = scores[:, mine].clone().requires_grad_()
    with record_host_syncs() as host_syncs:
        pooled = lookup(rows[mine], blocks[mine], my_scores, shard, case.num_blocks)
        (pooled * weight[mine]).sum().backward()
    return {"pooled": pooled.detach(), "grad_scores": my_scores.grad, "grad_shard": shard.grad, "host_syncs": host_syncs,
            "shard_axis": lookup.shard_axis, "allreduce": shard.allreduce,
            "sent": dict(comm.bytes_sent), "received": dict(comm.bytes_received), "calls": dict(comm.calls)}


def reference(case: Case, world: int):
    table, rows, blocks, scores, weight = inputs(case, world)
    table.requires_grad_()
    scores.requires_grad_()
    pooled = lookup_reduce_reference(rows, blocks, scores, table, case.num_blocks)
    (pooled * weight).sum().backward()
    return pooled.detach(), scores.grad, table.grad


def requests_matrix(case: Case, world: int) -> list[list[int]]:
    """requests[i][j]: ids rank i sends to owner j (distinct ids per rank when de-duplicating), counted here."""
    _, rows, _, _, _ = inputs(case, world)
    tokens = case.tokens(world)
    offsets = row_offsets(NUM_ROWS, world)
    matrix = []
    for i in range(world):
        mine = rows[sum(tokens[:i]):sum(tokens[:i + 1])].flatten().tolist()
        if dict(case.options).get("dedup"):
            mine = sorted(set(mine))
        matrix.append([sum(offsets[j] <= r < offsets[j + 1] for r in mine) for j in range(world)])
    return matrix


def predicted_traffic(case: Case, world: int, rank: int):
    dims = LookupDims(value_dim=VALUE_DIM, topk=TOPK, num_blocks=case.num_blocks, num_cores=case.num_cores,
                      group_size=world, value_bytes=4, score_bytes=4)
    tokens = case.tokens(world)
    options = dict(case.options)
    if case.mode == "dimension":
        return dimension_wise_traffic(dims, tokens, rank, static_tokens="tokens_per_rank" in options)
    if options.get("owner_pooling"):
        return owner_pooled_traffic(dims, tokens, requests_matrix(case, world), rank)
    return number_wise_traffic(dims, requests_matrix(case, world), rank, capacity=options.get("capacity"))


def cases_for(world: int) -> list[Case]:
    most_ids_to_one_owner = 5 * TOPK
    modes = [("number", ()), ("number", (("dedup", True),)), ("number", (("owner_pooling", True),)),
             ("number", (("capacity", most_ids_to_one_owner),)), ("dimension", ())]
    cases = [Case(mode, options, num_blocks, num_cores, scenario)
             for mode, options in modes for num_blocks in (1, 4) for num_cores in (1, 2)
             for scenario in ("random", "skew", "empty")]
    cases.append(Case("dimension", (("tokens_per_rank", 3),), 4, 2, "static"))
    cases.append(Case("dimension", (), 4, 4 if world == 2 else 8, "random"))   # several whole cores per rank
    return cases


@pytest.fixture(scope="module", params=[2, 4])
def sharded_runs(request):
    world = request.param
    cases = cases_for(world)
    results = run_on_ranks(_sharded_worker, world, cases)
    return world, cases, [r["cases"] for r in results], [r["overflow"] for r in results]


def _gathered_table_grad(results: list[dict]) -> torch.Tensor:
    return torch.cat([result["grad_shard"] for result in results], dim=results[0]["shard_axis"])


@pytest.mark.slow
def test_sharded_equals_single_rank_reference(sharded_runs):
    world, cases, runs, _ = sharded_runs
    for index, case in enumerate(cases):
        per_rank = [runs[rank][index] for rank in range(world)]
        pooled, grad_scores, grad_table = reference(case, world)
        label = f"P={world} {case}"
        torch.testing.assert_close(torch.cat([r["pooled"] for r in per_rank]), pooled, rtol=1e-6, atol=1e-6, msg=label)
        torch.testing.assert_close(torch.cat([r["grad_scores"] for r in per_rank], dim=1), grad_scores, rtol=1e-6,
                                   atol=1e-6, msg=label)
        torch.testing.assert_close(_gathered_table_grad(per_rank), grad_table, rtol=1e-6, atol=1e-6, msg=label)


@pytest.mark.slow
def test_counted_bytes_equal_cost_model(sharded_runs):
    world, cases, runs, _ = sharded_runs
    for index, case in enumerate(cases):
        for rank in range(world):
            counted = runs[rank][index]
            predicted = predicted_traffic(case, world, rank)
            label = f"P={world} rank {rank} {case}"
            assert counted["sent"] == {k: v for k, v in predicted.sent.items()}, label
            assert counted["received"] == {k: v for k, v in predicted.received.items()}, label
            assert counted["calls"] == dict(predicted.calls), label


@pytest.mark.slow
def test_each_rank_holds_one_pth_of_every_table(sharded_runs):
    world, cases, runs, _ = sharded_runs
    total_bytes = NUM_ROWS * VALUE_DIM * 4
    for index, case in enumerate(cases):
        shard_bytes = [runs[rank][index]["grad_shard"].numel() * 4 for rank in range(world)]
        assert sum(shard_bytes) == total_bytes
        largest = (NUM_ROWS + world - 1) // world * VALUE_DIM * 4 if case.mode == "number" else total_bytes // world
        assert max(shard_bytes) == largest, case
        assert all(not runs[rank][index]["allreduce"] for rank in range(world))


@pytest.mark.slow
def test_only_the_exact_size_exchanges_synchronise_the_host(sharded_runs):
    """With sizes known from the config (dimension-wise with the training micro-batch's tokens per rank,
    number-wise with a fixed capacity) nothing reads device data on the host. Without them the exchanged counts
    are read on the host (documented; the trainer passes tokens_per_rank, sharding_capacity_factor sets a
    capacity)."""
    world, cases, runs, _ = sharded_runs
    for index, case in enumerate(cases):
        sync_free = bool({"tokens_per_rank", "capacity"} & dict(case.options).keys())
        for rank in range(world):
            found = runs[rank][index]["host_syncs"]
            assert (found == []) == sync_free, f"P={world} rank {rank} {case}: {found}"


@pytest.mark.slow
def test_capacity_overflow_is_flagged_on_its_rank_until_taken(sharded_runs):
    _, _, _, overflow = sharded_runs
    assert overflow[0] == [True, False]
    assert all(flags == [False, False] for flags in overflow[1:])


def test_table_overflow_check_raises_after_an_overflow_only():
    from umtrain.parallel.memory_tables import check_table_overflow   # not at the top: spawned ranks import this file

    case = Case("number", (("capacity", 2),))
    table, rows, blocks, scores, _ = inputs(case, 1)
    lookup = NumberWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, capacity=3 * TOPK)
    memories = [SimpleNamespace(lookup=lookup)]
    lookup(rows[:3], blocks[:3], scores[:, :3], table, 1)
    check_table_overflow(memories)
    lookup(rows[:4], blocks[:4], scores[:, :4], table, 1)
    with pytest.raises(RuntimeError, match="sharding_capacity_factor"):
        check_table_overflow(memories)
    check_table_overflow(memories)            # the flag was taken: the next check starts clean


def test_row_offsets_cover_the_table_evenly():
    assert row_offsets(50, 4) == [0, 13, 26, 38, 50]
    assert row_offsets(8, 2) == [0, 4, 8]


def test_shard_shapes_without_a_process_group():
    number = NumberWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference)
    assert number.local_table_shape() == (NUM_ROWS, VALUE_DIM)
    dimension = DimensionWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, num_cores=2)
    assert dimension.local_table_shape() == (NUM_ROWS, VALUE_DIM)


def test_single_rank_lookups_equal_the_reference():
    case = Case("number", num_blocks=4, num_cores=2)
    table, rows, blocks, scores, _ = inputs(case, 1)
    expected = lookup_reduce_reference(rows, blocks, scores, table, 4)
    for mode, options in (("number", {}), ("number", {"dedup": True}), ("number", {"owner_pooling": True}),
                          ("number", {"capacity": 5 * TOPK}), ("dimension", {"num_cores": 2}), ("local", {})):
        lookup = make_sharded_lookup(mode, None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, **options)
        torch.testing.assert_close(lookup(rows, blocks, scores, table, 4), expected, rtol=1e-6, atol=1e-6)
        if options.get("capacity"):
            assert not lookup.take_overflow()


def test_lookup_from_plan_builds_the_chosen_mode_and_logs_why(caplog):
    dims = LookupDims(value_dim=VALUE_DIM, topk=TOPK, num_blocks=4, num_cores=2, group_size=1)
    with caplog.at_level(logging.INFO, logger="umtrain.parallel.memory_sharding"):
        lookup = lookup_from_plan(plan_layer(dims, 16, DEFAULT_CALIBRATION, placement="2:3"), None, NUM_ROWS,
                                  VALUE_DIM, lookup_reduce_reference, num_cores=2)
    assert isinstance(lookup, LocalLookup) and "(2:3), P=1: the whole table is local" in caplog.text
    plan = plan_layer(replace(dims, group_size=2), 16, DEFAULT_CALIBRATION, "number", dedup=True)
    lookup = lookup_from_plan(plan, None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, num_cores=2)
    assert isinstance(lookup, NumberWiseLookup) and lookup.dedup and not lookup.owner_pooling


def test_bad_shapes_and_modes_are_named():
    lookup = NumberWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference)
    rows = torch.zeros(3, TOPK, dtype=torch.long)
    with pytest.raises(ValueError, match="table shard"):
        lookup(rows, rows, torch.zeros(1, 3, TOPK), torch.zeros(NUM_ROWS + 1, VALUE_DIM), 1)
    with pytest.raises(ValueError, match="scores"):
        lookup(rows, rows, torch.zeros(1, 4, TOPK), torch.zeros(NUM_ROWS, VALUE_DIM), 1)
    with pytest.raises(ValueError, match="'auto'"):
        make_sharded_lookup("auto", None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference)
    with pytest.raises(ValueError, match="capacity"):
        NumberWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, dedup=True, capacity=4)
    table, scores = torch.randn(NUM_ROWS, VALUE_DIM), torch.randn(1, 3, TOPK)
    off_size = DimensionWiseLookup(None, NUM_ROWS, VALUE_DIM, lookup_reduce_reference, tokens_per_rank=4)(
        rows, rows, scores, table, 1)                               # 3 tokens, not 4: counts are exchanged instead
    torch.testing.assert_close(off_size, lookup_reduce_reference(rows, rows, scores, table, 1))
