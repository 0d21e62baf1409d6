"""Number- vs dimension-wise memory sharding: measured forward+backward time on a local gloo group, the cost
model's prediction beside each point, and the model's bytes checked against the bytes actually counted.

    python benchmarks/memory_sharding_sweep.py sweep [--quick] [--repeat N] [--json FILE]
    python benchmarks/memory_sharding_sweep.py crossover --png docs/memory_sharding_crossover.png

`sweep` calibrates alpha/beta and the local-compute term on each group first (as `umtrain calibrate-comm` does,
at sizes that are not sweep points), then times each point: the three variants take turns, and every repetition
keeps the group's step time (the slowest rank's). Between the two modes the model chose between, the measured
faster mode is the sign of the median per-repetition log ratio, and the point is resolved when a sign test of those
ratios rejects a tie (p < SIGNIFICANCE), indistinguishable otherwise. Per model (communication + compute, and
communication only) it reports the faster mode picked over all points and over resolved points, the number of
indistinguishable points, and the regret: the chosen mode's time over the faster one's, minus 1.
Requests are drawn balanced over owners (exactly T*K/P per owner, what the shuffle gives in expectation), so
the predicted bytes must equal the counted bytes exactly; the script fails if they do not.
`crossover` plots the paper's Figure 9 from the model: the d_v above which dimension-wise moves fewer bytes,
against P, for the paper's three model sizes (forward + backward, bf16 values and scores, int32 ids).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from common import write_result
from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.comm import Communicator, run_local_group
from umtrain.parallel.calibration import calibrate, calibrate_compute, step_seconds, time_lookup_variants
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


def _time_point(comm: Communicator, point: Point, iters: int) -> dict[str, tuple[list[float], dict, dict]]:
    """Per variant: (group step time of each repetition, bytes sent, bytes received)."""
    counted = {}

    def record(variant: str) -> None:
        counted[variant] = (dict(comm.bytes_sent), dict(comm.bytes_received))

    samples = time_lookup_variants(comm, point.dims(comm.size), point.tokens, NUM_ROWS, lookup_reduce_reference,
                                   iters, on_step=record)
    return {variant: (samples[variant], *counted[variant]) for variant in VARIANTS}


def _sweep_worker(rank: int, world: int, points: list[Point], iters: int, calibration_iters: int) -> list[dict]:
    torch.set_num_threads(1)                     # P processes share the machine's cores
    comm = Communicator(dist.group.WORLD)
    calibration = calibrate_compute(comm, calibrate(comm), iters=calibration_iters)
    results = []
    for point in points:
        row = {"P": world, "tokens": point.tokens, "topk": point.topk, "E": point.num_blocks,
               "d_v": point.value_dim, "alpha_s": calibration.alpha_s, "beta_s_per_byte": calibration.beta_s_per_byte,
               "compute": asdict(calibration.compute)}
        for variant, (samples, sent, received) in _time_point(comm, point, iters).items():
            predicted = variant_traffic(variant, point.dims(world), point.tokens)
            if sent != dict(predicted.sent) or received != dict(predicted.received):
                raise AssertionError(f"{variant} {point} P={world} rank {rank}: counted {sent} / {received}, "
                                     f"predicted {dict(predicted.sent)} / {dict(predicted.received)}")
            communication, compute = calibration.variant_seconds(variant, point.dims(world), point.tokens)
            row[f"samples_{variant}"] = samples
            row[f"measured_{variant}"] = step_seconds(samples)
            row[f"predicted_{variant}"] = communication + compute
            row[f"comm_{variant}"] = communication
            row[f"bytes_{variant}"] = predicted.total_sent()
        results.append(row)
    return results


SIGNIFICANCE = 0.01
"""A point is resolved when the two-sided sign test of its paired log ratios gives p below this (32 points per run:
about 0.3 false resolutions expected if every point were a tie)."""
Estimator = Literal["median", "minima"]
ESTIMATOR: Estimator = "median"
"""How the faster of two modes is read from paired samples: the sign of the median per-repetition log ratio, or of
the log ratio of the two modes' best times. The median was the more stable between back-to-back runs
(docs/memory_sharding.md)."""


def sign_test_p(positive: int, negative: int) -> float:
    """Two-sided exact sign test: the probability, if either sign were equally likely, of a split at least this
    uneven (ties are dropped before counting)."""
    n = positive + negative
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(positive, negative) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Verdict:
    """Which of two modes measured faster at a point, from samples paired by repetition."""

    faster: str
    slower: str
    log_ratio: float
    """log(t_slower / t_faster) by the estimator, >= 0."""
    p_value: float
    """Two-sided sign test of the paired log ratios."""
    resolved: bool
    """The sign test rejects a tie and agrees with the estimator on the direction."""

    def regret(self, choice: str) -> float:
        """Measured time of `choice` over the faster mode's, minus 1."""
        return 0.0 if choice == self.faster else math.expm1(self.log_ratio)


def paired_verdict(first: str, first_times: Sequence[float], second: str, second_times: Sequence[float],
                   estimator: Estimator = ESTIMATOR) -> Verdict:
    """The faster of two modes timed in turns: sample i of each ran in the same repetition, so their ratio cancels
    the load both saw."""
    if len(first_times) != len(second_times) or not first_times:
        raise ValueError(f"paired samples need equal, non-zero counts: {len(first_times)} vs {len(second_times)}")
    ratios = [math.log(b / a) for a, b in zip(first_times, second_times)]   # > 0: first is faster
    if estimator == "median":
        estimate = statistics.median(ratios)
    else:
        estimate = math.log(min(second_times) / min(first_times))
    positive, negative = sum(r > 0 for r in ratios), sum(r < 0 for r in ratios)
    p_value = sign_test_p(positive, negative)
    agrees = (positive > negative) == (estimate > 0) and estimate != 0
    faster, slower = (first, second) if estimate >= 0 else (second, first)
    return Verdict(faster, slower, abs(estimate), p_value, p_value < SIGNIFICANCE and agrees)


def _choice(times: dict) -> tuple[str, str]:
    """(number-wise variant, mode) with the smaller time; the mode is 'dimension' or the variant."""
    variant = "pooled" if times["pooled"] < times["number"] else "number"
    return variant, ("dimension" if times["dimension"] < times[variant] else variant)


def judge(row: dict, predicted: dict) -> tuple[str, str, Verdict]:
    """(number-wise variant, the model's choice, the measured verdict between the two modes it chose between).
    Number-wise is its cheaper variant by the prediction, as the plan has it."""
    variant, choice = _choice(predicted)
    return variant, choice, paired_verdict(variant, row[f"samples_{variant}"], "dimension", row["samples_dimension"])


def summarize(rows: list[dict], refit: Calibration) -> list[dict]:
    """Each point with every model's choice and the paired verdict between the modes it chose between: the full
    model (communication + compute, calibrated on the group before the sweep), communication only, and alpha,
    beta refitted to the sweep's own timings (communication only, in-sample)."""
    out = []
    for row in rows:
        judged = dict(row)
        for prefix, predicted in (("", {v: row[f"predicted_{v}"] for v in VARIANTS}),
                                  ("comm_", {v: row[f"comm_{v}"] for v in VARIANTS}),
                                  ("refit_", {v: refit.seconds(_traffic(row, v)) for v in VARIANTS})):
            variant, choice, verdict = judge(row, predicted)
            judged.update({f"{prefix}number_variant": variant, f"{prefix}choice": choice,
                           f"{prefix}verdict": asdict(verdict), f"{prefix}correct": choice == verdict.faster,
                           f"{prefix}regret": verdict.regret(choice)})
        out.append(judged)
    return out


def _traffic(row: dict, variant: str):
    point = Point(row["tokens"], row["topk"], row["E"], row["d_v"])
    return variant_traffic(variant, point.dims(row["P"]), point.tokens)


def refit_calibration(rows: list[dict]) -> Calibration:
    observations = [(_traffic(r, v), r[f"measured_{v}"]) for r in rows for v in VARIANTS]
    return fit_calibration(observations, source=f"least squares on {len(observations)} timings of this sweep")


MODELS = (("communication + compute (calibrated on the group first, out-of-sample)", "predicted", ""),
          ("communication only (microbenchmark alpha, beta)", "comm", "comm_"))
"""(name, row key prefix of its predicted seconds, row key prefix of its judgement)."""


def accuracy(rows: list[dict], prefix: str = "") -> dict:
    """Strict accuracy over all points, accuracy over resolved points, the indistinguishable count and the regret
    (measured time of the choice / the faster mode's - 1) of one model's choices."""
    resolved = [r for r in rows if r[f"{prefix}verdict"]["resolved"]]
    regrets = [r[f"{prefix}regret"] for r in rows]
    return {"points": len(rows), "correct": sum(r[f"{prefix}correct"] for r in rows),
            "resolved": len(resolved), "resolved_correct": sum(r[f"{prefix}correct"] for r in resolved),
            "indistinguishable": len(rows) - len(resolved),
            "regret_mean": statistics.fmean(regrets), "regret_max": max(regrets)}


def run_sweep(args: argparse.Namespace) -> int:
    runs = []
    for repeat in range(args.repeat):
        rows = []
        for world in (2, 4):
            measured = run_local_group(_sweep_worker, world, sweep_points(args.quick), args.iters,
                                       args.calibration_iters)[0]
            rows += summarize(measured, refit_calibration(measured))
        if repeat == args.repeat - 1:
            _print_table(rows)
        print(f"\nrun {repeat + 1}/{args.repeat}:")
        _print_accuracy(rows)
        runs.append(rows)
    report = {"iters": args.iters, "calibration_iters": args.calibration_iters, "significance": SIGNIFICANCE,
              "estimator": ESTIMATOR, "runs": runs,
              "accuracy": [{prefix or "full": accuracy(rows, prefix) for _, _, prefix in MODELS} for rows in runs]}
    if args.repeat > 1:
        report["agreement"] = label_agreement(runs)
        report["pooled"] = pooled_accuracy(runs)
        _print_agreement(report["agreement"])
        _print_pooled(report["pooled"])
    print("counted bytes equalled the predicted bytes at every point and rank")
    if args.json:
        write_result(Path(args.json), report, __file__, args.argv, compact=True)   # compact: every repetition's time
    return 0


NUMBER_WISE = ("number", "pooled")


def label_agreement(runs: list[list[dict]]) -> dict:
    """For each pair of runs and each estimator, how often the two runs name the same faster mode: over every
    point and number-wise variant (rows vs dimension, pooled vs dimension), over those resolved in both, and over
    the pair the full model chose between in the earlier run."""
    out = {}
    for estimator in ("median", "minima"):
        same = both = same_resolved = model_pair = model_pair_same = total = 0
        for first, second in itertools.combinations(runs, 2):
            for a, b in zip(first, second):
                for variant in NUMBER_WISE:
                    va, vb = (paired_verdict(variant, r[f"samples_{variant}"], "dimension", r["samples_dimension"],
                                             estimator) for r in (a, b))
                    total += 1
                    same += va.faster == vb.faster
                    if va.resolved and vb.resolved:
                        both += 1
                        same_resolved += va.faster == vb.faster
                    if variant == a["number_variant"]:
                        model_pair += 1
                        model_pair_same += va.faster == vb.faster
        out[estimator] = {"labels": total, "same": same, "resolved_in_both": both, "same_resolved": same_resolved,
                          "model_pair": model_pair, "model_pair_same": model_pair_same}
    return out


def pooled_accuracy(runs: list[list[dict]]) -> dict:
    """Every run's choices against the verdict from all runs' samples of the point together (pairs stay within a
    run): a label that one burst of load does not flip."""
    out = {}
    for _, _, prefix in MODELS:
        correct = resolved = resolved_correct = 0
        for index in range(len(runs[0])):
            for rows in runs:
                variant = rows[index][f"{prefix}number_variant"]
                verdict = paired_verdict(variant, [t for r in runs for t in r[index][f"samples_{variant}"]],
                                         "dimension", [t for r in runs for t in r[index]["samples_dimension"]])
                hit = rows[index][f"{prefix}choice"] == verdict.faster
                correct += hit
                resolved += verdict.resolved
                resolved_correct += hit and verdict.resolved
        out[prefix or "full"] = {"choices": len(runs) * len(runs[0]), "correct": correct, "resolved": resolved,
                                 "resolved_correct": resolved_correct}
    return out


def _print_table(rows: list[dict]) -> None:
    print("| P | T | K | E | d_v | bytes number / pooled / dimension (sent per rank) | median ms number / pooled / "
          "dimension | predicted ms (comm + compute) | comm only ms | choice | comm-only choice | faster "
          "(median paired ratio, sign test p) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        verdict = r["verdict"]
        miss = "" if r["correct"] else f" (miss, +{r['regret']:.0%})"
        status = "" if verdict["resolved"] else ", indistinguishable"
        print(f"| {r['P']} | {r['tokens']} | {r['topk']} | {r['E']} | {r['d_v']} | "
              f"{r['bytes_number']:.0f} / {r['bytes_pooled']:.0f} / {r['bytes_dimension']:.0f} | "
              f"{_ms(r, 'measured')} | {_ms(r, 'predicted')} | {_ms(r, 'comm')} | {r['choice']}{miss} | "
              f"{r['comm_choice']} | {verdict['faster']} by {math.expm1(verdict['log_ratio']):.0%}, "
              f"p {verdict['p_value']:.2g}{status} |")


def _print_accuracy(rows: list[dict]) -> None:
    for name, kind, prefix in MODELS:
        a = accuracy(rows, prefix)
        error = statistics.fmean(abs(r[f"{kind}_{v}"] / r[f"measured_{v}"] - 1) for r in rows for v in VARIANTS)
        print(f"  {name}: faster mode picked at {a['correct']}/{a['points']} points, at {a['resolved_correct']}/"
              f"{a['resolved']} resolved points ({a['indistinguishable']} indistinguishable); regret mean "
              f"{a['regret_mean']:.1%}, max {a['regret_max']:.1%}; mean |predicted / median - 1| = {error:.0%}")
    refit = accuracy(rows, "refit_")
    print(f"  communication only, alpha, beta refitted per P on the sweep (in-sample): {refit['correct']}/"
          f"{refit['points']}, {refit['resolved_correct']}/{refit['resolved']} resolved")


def _print_agreement(agreement: dict) -> None:
    print("\nsame faster mode in two runs (every pair of runs; rows vs dimension and pooled vs dimension):")
    for estimator, a in agreement.items():
        print(f"  {estimator}: {a['same']}/{a['labels']} labels; {a['same_resolved']}/{a['resolved_in_both']} of "
              f"those resolved in both runs; {a['model_pair_same']}/{a['model_pair']} for the pair the full model "
              f"chose between")


def _print_pooled(pooled: dict) -> None:
    print("\nevery run's choices against the verdict of all runs' samples together:")
    for name, _, prefix in MODELS:
        a = pooled[prefix or "full"]
        print(f"  {name}: {a['correct']}/{a['choices']}; {a['resolved_correct']}/{a['resolved']} resolved")


def _ms(row: dict, kind: str) -> str:
    return " / ".join(f"{row[f'{kind}_{v}'] * 1e3:.2f}" for v in VARIANTS)


PAPER_MODELS = {"UltraMem-151M": (32, 512), "UltraMem-680M": (70, 768), "UltraMem-1.6B": (84, 1024)}
"""K = H*m and d_v (the paper's configs, configs/paper/); E = 4, h = 2 throughout."""


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
    sweep.add_argument("--iters", type=int, default=50,
                       help="paired repetitions per point (the sign test at p < 0.01 resolves nothing below 8)")
    sweep.add_argument("--calibration-iters", type=int, default=10,
                       help="repetitions per calibration size and pass (`calibrate-comm --iters`)")
    sweep.add_argument("--repeat", type=int, default=1,
                       help="whole sweeps (calibration included); with > 1, also scores every run's choices against "
                            "the median timing of all runs")
    sweep.add_argument("--json", default=None, help="write every point to this JSON file")
    sweep.set_defaults(func=run_sweep)
    crossover = sub.add_parser("crossover")
    crossover.add_argument("--png", default="docs/memory_sharding_crossover.png")
    crossover.set_defaults(func=run_crossover)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv     # the JSON's command
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
