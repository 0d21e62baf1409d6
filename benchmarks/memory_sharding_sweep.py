"""Number- vs dimension-wise memory sharding: measured forward+backward time on a local gloo group, the cost
model's prediction beside each point, and the model's bytes checked against the bytes actually counted.

    python benchmarks/memory_sharding_sweep.py sweep [--quick] [--repeat N] [--json FILE]
    python benchmarks/memory_sharding_sweep.py crossover --png docs/memory_sharding_crossover.png

`sweep` calibrates alpha/beta and the local-compute term on each group first (as `umtrain calibrate-comm` does,
at sizes that are not sweep points), then times each point, and reports how often the model (communication +
compute, and communication only) picks the measured faster mode.
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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.comm import Communicator, run_local_group
from umtrain.parallel.calibration import calibrate, calibrate_compute, time_lookup_variants
from umtrain.parallel.cost_model import (VARIANTS, Calibration, LookupDims, crossover_value_dim, fit_calibration,
                                         variant_traffic)

NUM_ROWS, NUM_CORES = 4096, 2


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


def _time_point(comm: Communicator, point: Point, iters: int) -> dict[str, tuple[float, dict, dict]]:
    """Per variant: (slowest rank's best time, bytes sent, bytes received)."""
    counted = {}

    def record(variant: str) -> None:
        counted[variant] = (dict(comm.bytes_sent), dict(comm.bytes_received))

    best = time_lookup_variants(comm, point.dims(comm.size), point.tokens, NUM_ROWS, lookup_reduce_reference, iters,
                                on_step=record)
    return {variant: (best[variant], *counted[variant]) for variant in VARIANTS}


def _sweep_worker(rank: int, world: int, points: list[Point], iters: int) -> list[dict]:
    torch.set_num_threads(1)                     # P processes share the machine's cores
    comm = Communicator(dist.group.WORLD)
    calibration = calibrate_compute(comm, calibrate(comm), iters=iters)
    results = []
    for point in points:
        row = {"P": world, "tokens": point.tokens, "topk": point.topk, "E": point.num_blocks,
               "d_v": point.value_dim, "alpha_s": calibration.alpha_s, "beta_s_per_byte": calibration.beta_s_per_byte,
               "compute": asdict(calibration.compute)}
        for variant, (measured, sent, received) in _time_point(comm, point, iters).items():
            predicted = variant_traffic(variant, point.dims(world), point.tokens)
            if sent != dict(predicted.sent) or received != dict(predicted.received):
                raise AssertionError(f"{variant} {point} P={world} rank {rank}: counted {sent} / {received}, "
                                     f"predicted {dict(predicted.sent)} / {dict(predicted.received)}")
            communication, compute = calibration.variant_seconds(variant, point.dims(world), point.tokens)
            row[f"measured_{variant}"] = measured
            row[f"predicted_{variant}"] = communication + compute
            row[f"comm_{variant}"] = communication
            row[f"bytes_{variant}"] = predicted.total_sent()
        results.append(row)
    return results


def _choice(times: dict) -> tuple[str, str]:
    """(number-wise variant, mode) with the smaller time; the mode is 'dimension' or the variant."""
    variant = "pooled" if times["pooled"] < times["number"] else "number"
    return variant, ("dimension" if times["dimension"] < times[variant] else variant)


def _judge(row: dict, predicted: dict) -> tuple[str, str, bool]:
    """(choice, measured faster of the two modes the choice was made between, whether they were within 10%).
    Number-wise is its cheaper variant by the prediction, as the plan has it."""
    measured = {v: row[f"measured_{v}"] for v in VARIANTS}
    variant, choice = _choice(predicted)
    faster = "dimension" if measured["dimension"] < measured[variant] else variant
    other = measured["dimension"] if choice != "dimension" else measured[variant]
    return choice, faster, abs(measured[choice] - other) < 0.1 * min(measured[choice], other)


def summarize(rows: list[dict], refit: Calibration) -> list[dict]:
    """The choice against the measured faster mode: with the full model (communication + compute, calibrated on
    the group before the sweep), with communication only, and with alpha, beta refitted to the sweep's own
    timings (communication only, in-sample)."""
    out = []
    for row in rows:
        choice, faster, near_tie = _judge(row, {v: row[f"predicted_{v}"] for v in VARIANTS})
        comm_choice, comm_faster, comm_near_tie = _judge(row, {v: row[f"comm_{v}"] for v in VARIANTS})
        refit_choice, refit_faster, _ = _judge(row, {v: refit.seconds(_traffic(row, v)) for v in VARIANTS})
        out.append({**row, "choice": choice, "faster": faster, "correct": choice == faster, "near_tie": near_tie,
                    "comm_choice": comm_choice, "comm_correct": comm_choice == comm_faster,
                    "comm_near_tie": comm_near_tie,
                    "refit_choice": refit_choice, "refit_correct": refit_choice == refit_faster})
    return out


def _traffic(row: dict, variant: str):
    point = Point(row["tokens"], row["topk"], row["E"], row["d_v"])
    return variant_traffic(variant, point.dims(row["P"]), point.tokens)


def refit_calibration(rows: list[dict]) -> Calibration:
    observations = [(_traffic(r, v), r[f"measured_{v}"]) for r in rows for v in VARIANTS]
    return fit_calibration(observations, source=f"least squares on {len(observations)} timings of this sweep")


MODELS = (("communication + compute (calibrated on the group first, out-of-sample)", "predicted"),
          ("communication only (microbenchmark alpha, beta)", "comm"))
"""(name, row key prefix of its predicted seconds)."""


def run_sweep(args: argparse.Namespace) -> int:
    runs = []
    for repeat in range(args.repeat):
        rows = []
        for world in (2, 4):
            measured = run_local_group(_sweep_worker, world, sweep_points(args.quick), args.iters)[0]
            rows += summarize(measured, refit_calibration(measured))
        if repeat == args.repeat - 1:
            _print_table(rows)
        print(f"\nrun {repeat + 1}/{args.repeat}:")
        _print_accuracy(rows)
        runs.append(rows)
    if args.repeat > 1:
        _print_consensus(runs)
    print("counted bytes equalled the predicted bytes at every point and rank")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(runs if args.repeat > 1 else runs[0], out, indent=1)
    return 0


def _print_table(rows: list[dict]) -> None:
    print("| P | T | K | E | d_v | bytes number / pooled / dimension (sent per rank) | measured ms number / pooled / "
          "dimension | predicted ms (comm + compute) | comm only ms | choice | comm-only choice | faster |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        miss = "" if r["correct"] else (" (miss, within 10%)" if r["near_tie"] else " (miss)")
        print(f"| {r['P']} | {r['tokens']} | {r['topk']} | {r['E']} | {r['d_v']} | "
              f"{r['bytes_number']:.0f} / {r['bytes_pooled']:.0f} / {r['bytes_dimension']:.0f} | "
              f"{_ms(r, 'measured')} | {_ms(r, 'predicted')} | {_ms(r, 'comm')} | {r['choice']} | "
              f"{r['comm_choice']} | {r['faster']}{miss} |")


def _print_accuracy(rows: list[dict]) -> None:
    n = len(rows)
    for (name, kind), prefix in zip(MODELS, ("", "comm_")):
        correct = sum(r[f"{prefix}correct"] for r in rows)
        ties = sum(r[f"{prefix}correct"] or r[f"{prefix}near_tie"] for r in rows)
        error = sum(abs(r[f"{kind}_{v}"] / r[f"measured_{v}"] - 1) for r in rows for v in VARIANTS) / (3 * n)
        print(f"  {name}: picked the faster mode at {correct}/{n} points ({correct / n:.0%}), {ties}/{n} counting "
              f"misses within 10% of each other as ties; mean |predicted / measured - 1| = {error:.0%}")
    print(f"  communication only, alpha, beta refitted per P on the sweep (in-sample): "
          f"{sum(r['refit_correct'] for r in rows)}/{n}")


def _print_consensus(runs: list[list[dict]]) -> None:
    """Each run's choices against the faster mode by the median of all runs' timings: a label that one burst of
    load from other processes does not flip."""
    median = [{f"measured_{v}": statistics.median(rows[i][f"measured_{v}"] for rows in runs) for v in VARIANTS}
              for i in range(len(runs[0]))]
    total = len(runs) * len(median)
    print(f"\nagainst the median timing of the {len(runs)} runs:")
    for name, kind in MODELS:
        correct = 0
        for rows in runs:
            for row, consensus in zip(rows, median):
                choice, faster, _ = _judge(consensus, {v: row[f"{kind}_{v}"] for v in VARIANTS})
                correct += choice == faster
        print(f"  {name}: {correct}/{total} ({correct / total:.0%})")


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
    sweep.add_argument("--iters", type=int, default=10, help="repetitions per point (the best is kept)")
    sweep.add_argument("--repeat", type=int, default=1,
                       help="whole sweeps (calibration included); with > 1, also scores every run's choices against "
                            "the median timing of all runs")
    sweep.add_argument("--json", default=None, help="write every point to this JSON file")
    sweep.set_defaults(func=run_sweep)
    crossover = sub.add_parser("crossover")
    crossover.add_argument("--png", default="docs/memory_sharding_crossover.png")
    crossover.set_defaults(func=run_crossover)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
