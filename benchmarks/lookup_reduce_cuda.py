"""Lookup-reduce on a GPU: the Triton kernel vs gather-then-sum and `embedding_bag`, side by side in one run.

    python benchmarks/lookup_reduce_cuda.py [--tokens 4096 16384] [--out docs/benchmarks/lookup_reduce_cuda.json]

The CPU benchmark's shapes and baselines (benchmarks/lookup_reduce.py): K = 32 x 2 heads, d_v = 256, E = 4,
262,144 rows, h = 2, at several token counts, in float32 and bfloat16 (`embedding_bag` has no bf16 backward
with per-sample weights on CUDA, so it runs in float32 only). Times are CUDA-event medians (`triton.testing.do_bench`).
Two bandwidths are measured in the same run: a device-to-device copy's traffic (bytes read + written per second)
and a read-only reduction's. The forward's floor is the bytes it must read (T*K rows of d_v) at the read rate;
forward+backward's is its 4*T*K*d_v elements (rows read twice, row gradients read and written) at the copy's rate.
Peak memory is `max_memory_allocated` above the inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Dict

import torch
import triton.testing

from common import lookup_reduce_benchmark_inputs, machine, write_result
from lookup_reduce import add_shape_arguments, embedding_bag_autograd, gather_onehot_einsum
from umtrain.ops.lookup_reduce import get_lookup_reduce

IMPLS: Dict[str, Callable] = {
    "gather_onehot_einsum": gather_onehot_einsum,
    "embedding_bag_autograd": embedding_bag_autograd,
    "triton": get_lookup_reduce("triton"),
}
BASELINE = "gather_onehot_einsum"
NO_BF16 = {"embedding_bag_autograd"}


def bandwidths() -> dict[str, float]:
    """Bytes per second over 1 GiB: a copy's traffic (read + written) and a sum's reads."""
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    size = src.numel() * src.element_size()
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    read_ms = triton.testing.do_bench(lambda: src.sum(), return_mode="median")
    return {"copy": 2 * size / (copy_ms / 1000), "read": size / (read_ms / 1000)}


def step(fn, inputs, num_blocks: int, backward: bool) -> Callable[[], None]:
    rows, blocks, scores, table, grad = inputs

    def run() -> None:
        scores.grad = table.grad = None
        pooled = fn(rows, blocks, scores, table, num_blocks)
        if backward:
            pooled.backward(grad)
    return run


def peak_bytes(run: Callable[[], None]) -> int:
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(args: argparse.Namespace, tokens: int, dtype: torch.dtype, name: str, bandwidth: dict) -> dict:
    inputs = lookup_reduce_benchmark_inputs(tokens=tokens, k=args.top_m * args.heads, cores=args.cores, d_v=args.d_v,
                                            blocks=args.blocks, rows=args.rows, dtype=dtype, device="cuda")
    fn = IMPLS[name]
    row_bytes = tokens * args.top_m * args.heads * args.d_v * inputs[3].element_size()
    result = {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "impl": name}
    floors = {"forward": row_bytes / bandwidth["read"], "forward_backward": 4 * row_bytes / bandwidth["copy"]}
    for phase, backward in (("forward", False), ("forward_backward", True)):
        run = step(fn, inputs, args.blocks, backward)
        ms = triton.testing.do_bench(run, warmup=5, rep=50, return_mode="median")
        result[f"{phase}_ms"] = ms
        result[f"{phase}_peak_mib"] = peak_bytes(run) / 2**20
        result[f"{phase}_over_floor"] = (ms / 1000) / floors[phase]
    result["forward_fraction_of_read_bw"] = 1 / result["forward_over_floor"]
    return result


def print_table(rows: list[dict]) -> None:
    header = ("tokens", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd % read bw", "f+b / floor", "peak MiB f+b")
    print("  ".join(f"{h:>22}" if i == 2 else f"{h:>12}" for i, h in enumerate(header)))
    for r in rows:
        cells = (r["tokens"], r["dtype"], r["impl"], f"{r['forward_ms']:.3f}", f"{r['forward_backward_ms']:.3f}",
                 f"{100 * r['forward_fraction_of_read_bw']:.0f}%", f"{r['forward_backward_over_floor']:.2f}",
                 f"{r['forward_backward_peak_mib']:.0f}")
        print("  ".join(f"{c:>22}" if i == 2 else f"{c:>12}" for i, c in enumerate(cells)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    add_shape_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/lookup_reduce_cuda.json"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lookup_reduce_cuda.py needs a CUDA device (benchmarks/lookup_reduce.py is the CPU one)")
    bandwidth = bandwidths()
    rows = [measure(args, tokens, dtype, name, bandwidth)
            for tokens in args.tokens for dtype in (torch.float32, torch.bfloat16) for name in IMPLS
            if not (dtype == torch.bfloat16 and name in NO_BF16)]
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth['copy'] / 1e9:.0f} GB/s (read + written), "
          f"read {bandwidth['read'] / 1e9:.0f} GB/s")
    print_table(rows)
    summary = {"shape": vars(args) | {"out": str(args.out)}, "machine": machine() | {"triton": triton.__version__},
               "bandwidth_bytes_per_s": bandwidth, "baseline": BASELINE, "results": rows}
    write_result(args.out, summary, __file__)


if __name__ == "__main__":
    main()
