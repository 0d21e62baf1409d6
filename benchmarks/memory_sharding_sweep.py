"""Number- vs dimension-wise memory sharding: measured forward+backward time on a local gloo group, the cost
model's prediction beside each point, and the model's bytes checked against the bytes actually counted.

    python benchmarks/memory_sharding_sweep.py sweep [--quick] [--json FILE]
    python benchmarks/memory_sharding_sweep.py crossover --png docs/memory_sharding_crossover.png

`sweep` calibrates alpha/beta on each group first (as `umtrain calibrate-comm` does), then times each point.
Requests are drawn balanced over owners (exactly T*K/P per owner, what the shuffle gives in expectation), so
the predicted bytes must equal the counted bytes exactly; the script fails if they do not.
`crossover` plots the paper's Figure 9 from the model: the d_v above which dimension-wise moves fewer bytes,
against P, for the paper's three model sizes (forward + backward, bf16 values and scores, int32 ids).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.comm import Communicator, run_local_group
from umtrain.parallel.cost_model import LookupDims, calibrate, crossover_value_dim, variant_traffic
from umtrain.parallel.memory_sharding import make_sharded_lookup, row_offsets

NUM_ROWS, NUM_CORES = 4096, 2
VARIANTS = {"number": ("number", {}), "pooled": ("number", {"owner_pooling": True}),
            "dimension": ("dimension", {"num_cores": NUM_CORES})}
"""variant -> (sharding mode, lookup options)."""


@dataclass(frozen=True)
class Point:
    tokens: int
    topk: int
    num_blocks: int
    value_dim: int

    def dims(self, group_size: int) -> LookupDims:
        return LookupDims(value_dim=self.value_dim, topk=self.topk, num_blocks=self.num_blocks, num_cores=NUM_CORES,
                          group_size=group_size, value_bytes=4, score_bytes=4)


def sweep_points(quick: bool) -> list[Point]:
    if quick:
        return [Point(64, 8, 1, 16), Point(64, 32, 4, 256)]
    return [Point(*p) for p in itertools.product((32, 256), (8, 32), (1, 4), (16, 256))]


def balanced_inputs(point: Point, rank: int, world: int, seed: int = 0):
    """This rank's rows with exactly tokens*topk/world requests per owner, and random blocks and scores."""
    g = torch.Generator().manual_seed(seed + rank)
    requests = point.tokens * point.topk
    owners = (torch.arange(requests) % world)[torch.randperm(requests, generator=g)]
    offsets = torch.tensor(row_offsets(NUM_ROWS, world))
    sizes = offsets[1:] - offsets[:-1]
    rows = offsets[owners] + (torch.rand(requests, generator=g) * sizes[owners]).long()
    rows = rows.view(point.tokens, point.topk)
    blocks = torch.randint(0, point.num_blocks, rows.shape, generator=g)
    scores = torch.randn(NUM_CORES, point.tokens, point.topk, generator=g)
    return rows, blocks, scores


def _time_variant(comm: Communicator, variant: str, point: Point, iters: int) -> tuple[float, dict, dict]:
    mode, options = VARIANTS[variant]
    if mode == "dimension":
        options = {**options, "tokens_per_rank": point.tokens}
    lookup = make_sharded_lookup(mode, comm.group, NUM_ROWS, point.value_dim, lookup_reduce_reference, comm=comm,
                                 **options)
    shard = torch.nn.Parameter(torch.randn(lookup.local_table_shape()))
    rows, blocks, scores = balanced_inputs(point, comm.rank, comm.size)
    scores.requires_grad_()
    times = []
    for step in range(iters + 1):
        comm.reset_counters()
        dist.barrier(comm.group)
        start = time.perf_counter()
        lookup(rows, blocks, scores, shard, point.num_blocks).sum().backward()
        elapsed = time.perf_counter() - start
        if step:
            times.append(elapsed)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=comm.group)
    return float(slowest), dict(comm.bytes_sent), dict(comm.bytes_received)


def _sweep_worker(rank: int, world: int, points: list[Point], iters: int) -> list[dict]:
    comm = Communicator(dist.group.WORLD)
    calibration = calibrate(comm)
    results = []
    for point in points:
        row = {"P": world, "tokens": point.tokens, "topk": point.topk, "E": point.num_blocks,
               "d_v": point.value_dim, "alpha_s": calibration.alpha_s, "beta_s_per_byte": calibration.beta_s_per_byte}
        for variant in VARIANTS:
            measured, sent, received = _time_variant(comm, variant, point, iters)
            predicted = variant_traffic(variant, point.dims(world), point.tokens)
            if sent != dict(predicted.sent) or received != dict(predicted.received):
                raise AssertionError(f"{variant} {point} P={world} rank {rank}: counted {sent} / {received}, "
                                     f"predicted {dict(predicted.sent)} / {dict(predicted.received)}")
            row[f"measured_{variant}"] = measured
            row[f"predicted_{variant}"] = calibration.seconds(predicted)
            row[f"bytes_{variant}"] = predicted.total_sent()
        results.append(row)
    return results


def summarize(row: dict) -> dict:
    """The model's choice (number-wise = its cheaper variant) against the measured faster mode."""
    variant = "pooled" if row["predicted_pooled"] < row["predicted_number"] else "number"
    predicted = "dimension" if row["predicted_dimension"] < row[f"predicted_{variant}"] else variant
    measured = "dimension" if row["measured_dimension"] < row[f"measured_{variant}"] else variant
    return {**row, "number_variant": variant, "choice": predicted, "faster": measured, "correct": predicted == measured}


def run_sweep(args: argparse.Namespace) -> int:
    rows = []
    for world in (2, 4):
        rows += [summarize(r) for r in run_local_group(_sweep_worker, world, sweep_points(args.quick), args.iters)[0]]
    print("| P | T | K | E | d_v | bytes number / pooled / dimension (sent per rank) | measured ms number / pooled / "
          "dimension | predicted ms | choice | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['P']} | {r['tokens']} | {r['topk']} | {r['E']} | {r['d_v']} | "
              f"{r['bytes_number']:.0f} / {r['bytes_pooled']:.0f} / {r['bytes_dimension']:.0f} | "
              f"{_ms(r, 'measured')} | {_ms(r, 'predicted')} | {r['choice']} | {r['faster']}"
              f"{'' if r['correct'] else ' (miss)'} |")
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(f"\nmodel picked the faster mode in {accuracy:.0%} of {len(rows)} points; counted bytes equalled the "
          f"predicted bytes at every point")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


def _ms(row: dict, kind: str) -> str:
    return " / ".join(f"{row[f'{kind}_{v}'] * 1e3:.2f}" for v in VARIANTS)


PAPER_MODELS = {"UltraMem-151M": (32, 512), "UltraMem-680M": (70, 768), "UltraMem-1.6B": (84, 1024)}
"""K = H*m and d_v (ULTRAMEM_SPEC.md section 3); E = 4, h = 2 throughout."""


def run_crossover(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group_sizes = [2 ** i for i in range(1, 11)]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    print("| P | " + " | ".join(f"d_v* {name} (K={k})" for name, (k, _) in PAPER_MODELS.items()) + " |")
    print("|---|" + "---|" * len(PAPER_MODELS))
    for p in group_sizes:
        print(f"| {p} | " + " | ".join(f"{crossover_value_dim(k, 4, p):.1f}" for k, _ in PAPER_MODELS.values()) + " |")
    for name, (k, value_dim) in PAPER_MODELS.items():
        curve = [crossover_value_dim(k, 4, p) for p in group_sizes]
        line, = ax.plot(group_sizes, curve, marker="o", label=f"{name}: d_v* (K={k}, E=4)")
        ax.axhline(value_dim, color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("memory-parallel group size P")
    ax.set_ylabel("value dim d_v")
    ax.set_title("dimension-wise moves fewer bytes above d_v* (dotted: model's d_v)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nwrote {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sweep = sub.add_parser("sweep")
    sweep.add_argument("--quick", action="store_true", help="two points per P (a smoke run)")
    sweep.add_argument("--iters", type=int, default=5)
    sweep.add_argument("--json", default=None, help="write every point to this JSON file")
    sweep.set_defaults(func=run_sweep)
    crossover = sub.add_parser("crossover")
    crossover.add_argument("--png", default="docs/memory_sharding_crossover.png")
    crossover.set_defaults(func=run_crossover)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
