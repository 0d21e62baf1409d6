"""Lookup-reduce on CPU: fused vs naive gather-then-sum, side by side in one run.

    PYTHONPATH=. python benchmarks/lookup_reduce.py [--out docs/benchmarks/lookup_reduce.json] [--threads 2]

Reports medians of interleaved repeats (the machine is shared): forward and forward+backward times, the
forward's fraction of the measured copy bandwidth counting the bytes it must read (the T*K gathered rows), the
forward+backward time over its bytes floor (rows read twice, row gradients read and written: 4*T*K*d_v
elements), and peak memory above the inputs, each measured in a fresh process (peak RSS).

PyTorch's CPU allocator backs large tensors with fresh pages; without huge pages the first touch of the
table's [N, d_v] gradient costs more than the kernels themselves. THP_MEM_ALLOC_ENABLE=1 (PyTorch's switch
for 2 MiB pages on allocations >= 2 MiB) is set unless --small-pages; the JSON records which.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

if "--small-pages" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # read by the allocator, so before torch is imported

import torch                                                          # noqa: E402
import torch.nn.functional as F                                       # noqa: E402

from common import lookup_reduce_benchmark_inputs, machine, write_result  # noqa: E402
from umtrain.ops.fused_lookup_reduce import fused_lookup_reduce       # noqa: E402
from umtrain.ops.lookup_reduce import lookup_reduce_reference         # noqa: E402

COPY_BYTES = 256 << 20


def gather_onehot_einsum(rows, blocks, scores, table, num_blocks):
    """The naive baseline of the issue: gather [T, K, d_v], then pool with a one-hot [T, K, E] einsum."""
    num_cores, (tokens, k) = scores.shape[0], rows.shape
    gathered = table[rows].view(tokens, k, num_cores, -1)
    onehot = F.one_hot(blocks, num_blocks).to(table.dtype)
    pooled = torch.einsum("tke,htk,tkhd->tehd", onehot, scores, gathered)
    return pooled.reshape(tokens, num_blocks, -1)


def bag_sum(keys: torch.Tensor, num_keys: int, source_rows: torch.Tensor, weights: torch.Tensor,
            source: torch.Tensor) -> torch.Tensor:
    """out[key, slice_i] = sum_{m: keys[m]=key} weights[i, m] * source[source_rows[m], slice_i]; out is [num_keys, d].

    The embedding_bag baseline. keys, source_rows: [M] int64; weights: [h, M]; source: [R, d] with d divisible
    by h. Entries are sorted by key and laid out one bag per (key, slice), in that order, so embedding_bag writes
    `out` in place with no permute; empty bags give zeros.
    """
    num_cores = weights.shape[0]
    core = torch.arange(num_cores, device=keys.device)
    sorted_keys, order = torch.sort(keys, stable=True)
    counts = torch.bincount(keys, minlength=num_keys)
    starts = counts.cumsum(0) - counts
    offsets = num_cores * starts[:, None] + core * counts[:, None]          # [num_keys, h]: where bag (key, i) begins
    # Sorted entry s is the (s - starts[key])-th of its key: its slice-i term goes to offsets[key, i] + that.
    position = (offsets - starts[:, None])[sorted_keys] + torch.arange(keys.numel(), device=keys.device)[:, None]
    position = position.view(-1)
    slice_rows = source_rows[order][:, None] * num_cores + core             # rows of `source` viewed [R * h, d / h]
    indices = torch.empty_like(position).scatter_(0, position, slice_rows.view(-1))
    bag_weights = torch.empty(position.shape, dtype=source.dtype, device=source.device)
    bag_weights.scatter_(0, position, weights.t()[order].to(source.dtype).reshape(-1))
    slices = source.contiguous().view(-1, source.shape[1] // num_cores)
    pooled = F.embedding_bag(indices, slices, offsets.view(-1), mode="sum", per_sample_weights=bag_weights)
    return pooled.view(num_keys, source.shape[1])


def bag_keys(blocks: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[T*K]: t*E + blocks[t, k], the output row of [T*E, d_v] that entry (t, k) pools into."""
    token = torch.arange(blocks.shape[0], device=blocks.device).unsqueeze(1)
    return (token * num_blocks + blocks).view(-1)


def embedding_bag_autograd(rows, blocks, scores, table, num_blocks):
    """(token, block, core) bags through `embedding_bag`, differentiated by PyTorch's own embedding_bag backward."""
    pooled = bag_sum(bag_keys(blocks, num_blocks), rows.shape[0] * num_blocks, rows.reshape(-1),
                     scores.reshape(scores.shape[0], -1), table)
    return pooled.view(rows.shape[0], num_blocks, table.shape[1])


IMPLS: Dict[str, Callable] = {
    "gather_onehot_einsum": gather_onehot_einsum,
    "reference_scatter_add": lookup_reduce_reference,
    "embedding_bag_autograd": embedding_bag_autograd,
    "fused": fused_lookup_reduce,
}
BASELINE = "gather_onehot_einsum"


def inputs_for(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """The seeded inputs of the command line's shape (see common.lookup_reduce_benchmark_inputs)."""
    return lookup_reduce_benchmark_inputs(tokens=args.tokens, k=args.top_m * args.heads, cores=args.cores,
                                          d_v=args.d_v, blocks=args.blocks, rows=args.rows,
                                          dtype=getattr(torch, args.dtype))


def tiny_slice(inputs, tokens: int = 2, rows: int = 16):
    """The first tokens of the inputs over a table of `rows` rows, as fresh leaves."""
    index_rows, blocks, scores, table, grad = inputs
    return (index_rows[:tokens] % rows, blocks[:tokens], scores[:, :tokens].detach().clone().requires_grad_(),
            table[:rows].detach().clone().requires_grad_(), grad[:tokens])


def run_once(fn, inputs, num_blocks: int, backward: bool) -> float:
    rows, blocks, scores, table, grad = inputs
    scores.grad = table.grad = None
    start = time.perf_counter()
    pooled = fn(rows, blocks, scores, table, num_blocks)
    if backward:
        pooled.backward(grad)
    return time.perf_counter() - start


def copy_seconds(src: torch.Tensor, dst: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - start


def time_all(args: argparse.Namespace, impls: List[str]) -> Dict[str, Dict[str, List[float]]]:
    """Interleaved repeats: every repeat times the copy and each implementation back to back."""
    inputs = inputs_for(args)
    src = torch.randn(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    samples = {name: {"forward_s": [], "forward_backward_s": []} for name in impls}
    samples["copy"] = {"seconds": []}
    for repeat in range(args.repeats + 1):                               # repeat 0 warms up
        copy_s = copy_seconds(src, dst)
        timed = {name: (run_once(IMPLS[name], inputs, args.blocks, False),
                        run_once(IMPLS[name], inputs, args.blocks, True)) for name in impls}
        if repeat:
            samples["copy"]["seconds"].append(copy_s)
            for name, (forward_s, forward_backward_s) in timed.items():
                samples[name]["forward_s"].append(forward_s)
                samples[name]["forward_backward_s"].append(forward_backward_s)
    return samples


def peak_memory_bytes(args: argparse.Namespace, impl: str, backward: bool) -> int:
    """Peak RSS above the inputs of one call in a fresh process (an upper bound on the live peak)."""
    command = [sys.executable, __file__, "--measure-peak", impl, *(["--backward"] if backward else []),
               *_shape_flags(args)]
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ.copy())
    return int(result.stdout.split()[-1])


def _shape_flags(args: argparse.Namespace) -> List[str]:
    return [f"--tokens={args.tokens}", f"--top-m={args.top_m}", f"--heads={args.heads}", f"--cores={args.cores}",
            f"--d-v={args.d_v}", f"--blocks={args.blocks}", f"--rows={args.rows}", f"--dtype={args.dtype}"]


def measure_peak_here(args: argparse.Namespace) -> None:
    impl = IMPLS[args.measure_peak]
    inputs = inputs_for(args)
    run_once(impl, tiny_slice(inputs), args.blocks, args.backward)         # one-time library set-up, not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_once(impl, inputs, args.blocks, args.backward)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)


def summarise(args: argparse.Namespace, samples, peaks) -> Dict:
    element = torch.finfo(getattr(torch, args.dtype)).bits // 8
    gathered_bytes = args.tokens * args.top_m * args.heads * args.d_v * element
    copy_bandwidth = 2 * COPY_BYTES / statistics.median(samples["copy"]["seconds"])   # bytes read + written
    floor_s = 4 * gathered_bytes / copy_bandwidth
    table_grad_bytes = args.rows * args.d_v * element      # the dense [N, d_v] result every implementation returns
    results = {}
    for name, peak in peaks.items():
        forward_s = statistics.median(samples[name]["forward_s"])
        forward_backward_s = statistics.median(samples[name]["forward_backward_s"])
        results[name] = {
            "forward_ms": 1e3 * forward_s,
            "forward_backward_ms": 1e3 * forward_backward_s,
            "forward_ms_min": 1e3 * min(samples[name]["forward_s"]),
            "forward_backward_ms_min": 1e3 * min(samples[name]["forward_backward_s"]),
            "forward_fraction_of_copy_bandwidth": gathered_bytes / forward_s / copy_bandwidth,
            "forward_fraction_of_copy_read_rate": gathered_bytes / forward_s / (copy_bandwidth / 2),
            "forward_backward_over_bytes_floor": forward_backward_s / floor_s,
            "peak_forward_mib": peak["forward"] / 2 ** 20,
            "peak_forward_backward_mib": peak["forward_backward"] / 2 ** 20,
            "peak_forward_backward_beyond_table_grad_mib": (peak["forward_backward"] - table_grad_bytes) / 2 ** 20,
            "samples": samples[name],
        }
    baseline = results.get(BASELINE)
    if baseline:
        for result in results.values():
            result["vs_baseline"] = {key: baseline[key] / result[key] if result[key] else None for key in
                                     ("forward_ms", "forward_backward_ms", "peak_forward_mib",
                                      "peak_forward_backward_mib", "peak_forward_backward_beyond_table_grad_mib")}
    return {
        "machine": machine() | {"huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"},
        "shape": {"tokens": args.tokens, "top_m": args.top_m, "heads": args.heads, "k": args.top_m * args.heads,
                  "cores": args.cores, "d_v": args.d_v, "blocks": args.blocks, "rows": args.rows,
                  "dtype": args.dtype, "repeats": args.repeats},
        "copy_bandwidth_gb_s": copy_bandwidth / 1e9,
        "copy_bandwidth_gb_s_best": 2 * COPY_BYTES / min(samples["copy"]["seconds"]) / 1e9,
        "gathered_bytes": gathered_bytes,
        "forward_backward_floor_ms": 1e3 * floor_s,
        "copy_samples_s": samples["copy"]["seconds"],
        "results": results,
    }


def print_table(summary: Dict) -> None:
    print(f"load average {summary['machine']['load_average_1m_before_after']} on "
          f"{summary['machine']['cpus']} cpus: other work on the machine inflates every time below")
    print(f"copy bandwidth {summary['copy_bandwidth_gb_s']:.1f} GB/s (read + write), "
          f"forward+backward floor {summary['forward_backward_floor_ms']:.1f} ms, shape {summary['shape']}")
    print("fwd %copy: the forward's T*K*d_v row bytes per second over the copy's bytes read + written per second; "
          "%c.read: over the copy's bytes read per second")
    print(f"peak memory: MiB above the inputs; 'f+b net' also leaves out the [N, d_v] table gradient; "
          f"'x' columns: {BASELINE} / impl")
    header = (f"{'impl':<24}{'fwd ms':>8}{'f+b ms':>8}{'fwd %copy':>10}{'%c.read':>8}{'f+b/floor':>10}{'peak fwd':>9}"
              f"{'peak f+b':>9}{'f+b net':>8}{'fwd x':>7}{'f+b x':>7}{'fwd mem x':>10}{'f+b mem x':>10}"
              f"{'net mem x':>10}")
    print(header)
    for name, r in summary["results"].items():
        ratio = r.get("vs_baseline", {})
        print(f"{name:<24}{r['forward_ms']:>8.1f}{r['forward_backward_ms']:>8.1f}"
              f"{100 * r['forward_fraction_of_copy_bandwidth']:>9.0f}%"
              f"{100 * r['forward_fraction_of_copy_read_rate']:>7.0f}%{r['forward_backward_over_bytes_floor']:>10.2f}"
              f"{r['peak_forward_mib']:>9.0f}{r['peak_forward_backward_mib']:>9.0f}"
              f"{r['peak_forward_backward_beyond_table_grad_mib']:>8.0f}"
              + "".join(f"{ratio.get(key) or math.nan:>{width}.1f}" for key, width in (
                  ("forward_ms", 7), ("forward_backward_ms", 7), ("peak_forward_mib", 10),
                  ("peak_forward_backward_mib", 10), ("peak_forward_backward_beyond_table_grad_mib", 10))))


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The lookup's shape, the issue's defaults: K = 32 x 2, d_v 256, E 4, h 2, 262,144 rows (--tokens: the caller's)."""
    parser.add_argument("--top-m", type=int, default=32, help="values per head; K = top_m * heads")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2, help="MCS cores h: scores are [h, T, K]")
    parser.add_argument("--d-v", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4, help="IVE virtual blocks E")
    parser.add_argument("--rows", type=int, default=262_144)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    add_shape_arguments(parser)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/lookup_reduce.json"))
    parser.add_argument("--small-pages", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1")
    parser.add_argument("--measure-peak", choices=list(IMPLS), help=argparse.SUPPRESS)
    parser.add_argument("--backward", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = sorted(set(args.impls.split(",")) - set(IMPLS))
    if unknown:
        parser.error(f"--impls: unknown {unknown}; have {sorted(IMPLS)}")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_peak:
        measure_peak_here(args)
        return
    impls = args.impls.split(",")
    peaks = {name: {"forward": peak_memory_bytes(args, name, False),
                    "forward_backward": peak_memory_bytes(args, name, True)} for name in impls}
    load_before = os.getloadavg()
    summary = summarise(args, time_all(args, impls), peaks)
    summary["machine"]["load_average_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    print_table(summary)
    write_result(args.out, summary, __file__)


if __name__ == "__main__":
    main()
