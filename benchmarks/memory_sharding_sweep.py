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
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.comm import Communicator, run_local_group
from umtrain.parallel.cost_model import (Calibration, LookupDims, calibrate, crossover_value_dim, fit_calibration,
                                         variant_traffic)
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


def _build(comm: Communicator, variant: str, point: Point):
    mode, options = VARIANTS[variant]
    if mode == "dimension":
        options = {**options, "tokens_per_rank": point.tokens}
    lookup = make_sharded_lookup(mode, comm.group, NUM_ROWS, point.value_dim, lookup_reduce_reference, comm=comm,
                                 **options)
    return lookup, torch.nn.Parameter(torch.randn(lookup.local_table_shape()))


def _time_point(comm: Communicator, point: Point, iters: int) -> dict[str, tuple[float, dict, dict]]:
    """Per variant: (slowest rank's best time, bytes sent, bytes received). Variants take turns within each
    repetition, and the best of `iters` is kept, so that load from other processes hits them alike."""
    built = {variant: _build(comm, variant, point) for variant in VARIANTS}
    rows, blocks, scores = balanced_inputs(point, comm.rank, comm.size)
    scores.requires_grad_()
    times = {variant: [] for variant in VARIANTS}
    counted = {}
    for step in range(iters + 1):
        for variant, (lookup, shard) in built.items():
            comm.reset_counters()
            dist.barrier(comm.group)
            start = time.perf_counter()
            lookup(rows, blocks, scores, shard, point.num_blocks).sum().backward()
            if step:
                times[variant].append(time.perf_counter() - start)
            counted[variant] = (dict(comm.bytes_sent), dict(comm.bytes_received))
    best = torch.tensor([min(times[variant]) for variant in VARIANTS], dtype=torch.float64)
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=comm.group)
    return {variant: (float(best[i]), *counted[variant]) for i, variant in enumerate(VARIANTS)}


def _sweep_worker(rank: int, world: int, points: list[Point], iters: int) -> list[dict]:
    torch.set_num_threads(1)                     # P processes share the machine's cores
    comm = Communicator(dist.group.WORLD)
    calibration = calibrate(comm)
    results = []
    for point in points:
        row = {"P": world, "tokens": point.tokens, "topk": point.topk, "E": point.num_blocks,
               "d_v": point.value_dim, "alpha_s": calibration.alpha_s, "beta_s_per_byte": calibration.beta_s_per_byte}
        for variant, (measured, sent, received) in _time_point(comm, point, iters).items():
            predicted = variant_traffic(variant, point.dims(world), point.tokens)
            if sent != dict(predicted.sent) or received != dict(predicted.received):
                raise AssertionError(f"{variant} {point} P={world} rank {rank}: counted {sent} / {received}, "
                                     f"predicted {dict(predicted.sent)} / {dict(predicted.received)}")
            row[f"measured_{variant}"] = measured
            row[f"predicted_{variant}"] = calibration.seconds(predicted)
            row[f"bytes_{variant}"] = predicted.total_sent()
        results.append(row)
    return results


def _choice(times: dict) -> tuple[str, str]:
    """(number-wise variant, mode) with the smaller time; the mode is 'dimension' or the variant."""
    variant = "pooled" if times["pooled"] < times["number"] else "number"
    return variant, ("dimension" if times["dimension"] < times[variant] else variant)


def summarize(rows: list[dict], refit: Calibration) -> list[dict]:
    """The model's choice (number-wise = its cheaper variant) against the measured faster mode, with the
    microbenchmark calibration and with alpha, beta refitted to the sweep's own timings."""
    out = []
    for row in rows:
        measured = {v: row[f"measured_{v}"] for v in VARIANTS}
        variant, choice = _choice({v: row[f"predicted_{v}"] for v in VARIANTS})
        faster = "dimension" if measured["dimension"] < measured[variant] else variant
        other = measured["dimension"] if choice != "dimension" else measured[variant]
        refit_variant, refit_choice = _choice({v: refit.seconds(_traffic(row, v)) for v in VARIANTS})
        refit_faster = "dimension" if measured["dimension"] < measured[refit_variant] else refit_variant
        near_tie = abs(measured[choice] - other) < 0.1 * min(measured[choice], other)
        out.append({**row, "number_variant": variant, "choice": choice, "faster": faster,
                    "correct": choice == faster, "near_tie": near_tie,
                    "refit_choice": refit_choice, "refit_correct": refit_choice == refit_faster})
    return out


def _traffic(row: dict, variant: str):
    point = Point(row["tokens"], row["topk"], row["E"], row["d_v"])
    return variant_traffic(variant, point.dims(row["P"]), point.tokens)


def refit_calibration(rows: list[dict]) -> Calibration:
    observations = [(_traffic(r, v), r[f"measured_{v}"]) for r in rows for v in VARIANTS]
    return fit_calibration(observations, source=f"least squares on {len(observations)} timings of this sweep")


def run_sweep(args: argparse.Namespace) -> int:
    rows = []
    for world in (2, 4):
        measured = run_local_group(_sweep_worker, world, sweep_points(args.quick), args.iters)[0]
        rows += summarize(measured, refit_calibration(measured))
    print("| P | T | K | E | d_v | bytes number / pooled / dimension (sent per rank) | measured ms number / pooled / "
          "dimension | predicted ms | choice | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        miss = "" if r["correct"] else (" (miss, within 10%)" if r["near_tie"] else " (miss)")
        print(f"| {r['P']} | {r['tokens']} | {r['topk']} | {r['E']} | {r['d_v']} | "
              f"{r['bytes_number']:.0f} / {r['bytes_pooled']:.0f} / {r['bytes_dimension']:.0f} | "
              f"{_ms(r, 'measured')} | {_ms(r, 'predicted')} | {r['choice']} | {r['faster']}{miss} |")
    n = len(rows)
    correct = sum(r["correct"] for r in rows)
    print(f"\nmodel (microbenchmark alpha, beta) picked the faster mode at {correct}/{n} points ({correct / n:.0%}); "
          f"{sum(r['correct'] or r['near_tie'] for r in rows)}/{n} counting misses within 10% of each other as ties")
    print(f"model recalibrated on the sweep (alpha, beta refitted per P, in-sample): "
          f"{sum(r['refit_correct'] for r in rows)}/{n}")
    print("counted bytes equalled the predicted bytes at every point and rank")
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
        line, = ax.plot(group_sizes, curve, marker="o", markersize=3, label=f"{name}: K={k}, d_v={value_dim}")
        ax.axhline(value_dim, color=line.get_color(), linestyle=":", linewidth=1)
    k = PAPER_MODELS["UltraMem-1.6B"][0]
    forward_only = [crossover_value_dim(k, 4, p, backward=False) for p in group_sizes]
    ax.plot(group_sizes, forward_only, color="gray", linestyle="--", label="1.6B, forward volume only ([P] App. D)")
    ax.fill_between(group_sizes, [crossover_value_dim(k, 4, p) for p in group_sizes], 2 ** 13, color="tab:green",
                    alpha=0.08, label="number / dimension bytes > 1 (1.6B)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("memory-parallel group size P")
    ax.set_ylabel("value dim d_v")
    ax.set_ylim(2, 2 ** 13)
    ax.set_title("Figure 9 from the cost model: number/dimension bytes = 1 (fwd+bwd, E=4, bf16, int32 ids)\n"
                 "dimension-wise moves fewer bytes above the curve; dotted: each model's d_v", fontsize=8)
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
    sweep.add_argument("--iters", type=int, default=10)
    sweep.add_argument("--json", default=None, help="write every point to this JSON file")
    sweep.set_defaults(func=run_sweep)
    crossover = sub.add_parser("crossover")
    crossover.add_argument("--png", default="docs/memory_sharding_crossover.png")
    crossover.set_defaults(func=run_crossover)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
