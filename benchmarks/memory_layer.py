"""One UltraMem layer vs the dense MLP of the same activated FLOPs on CPU: forward+backward time and memory.

    python benchmarks/memory_layer.py [--points 2048x16384x16,...] [--threads 1] [--out PATH.json]

A point is TOKENSxNxTOP_M (tokens per step, physical values N, top-m per head). Each point benchmarks three
cases side by side: the UltraMem layer with the reference lookup-reduce, with the fused one, and the dense MLP
(D -> F -> D, GELU, no biases) whose F gives it the layer's activated FLOPs per token under the paper's
counting (`umtrain.model.accounting.memory_layer_components`: 2 x activated parameters + value pooling +
TDQKR re-scoring), i.e. F = FLOPs / (4 D).

Time: medians of interleaved repeats (every repeat runs each case back to back) after warm-up, forward and
forward+backward (backward of the layer output against a fixed random gradient; parameter gradients are
freed between repeats, as `zero_grad(set_to_none=True)` does). One intra-op thread unless --threads: on a shared
machine OpenMP barriers waiting on descheduled threads inflate multi-thread times many-fold.

Memory, two measures per case:
- saved activations: the distinct storages autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks),
  minus parameters and the input. Exact and load-independent; it is the quantity that grows with
  top-m x d_v per token when the [T, K, d_v] gathered values are saved.
- peak RSS of one forward+backward in a process of its own, forked from a fresh interpreter that has only
  imported the libraries: VmHWM after resetting it (/proc/self/clear_refs) minus VmRSS before the step, after
  a few-token warm-up that sets the libraries up. Linux only. It includes the transient
  buffers and the parameter gradients (the value table's dense gradient dominates for large N).

THP_MEM_ALLOC_ENABLE=1 (PyTorch's 2 MiB pages for allocations >= 2 MiB, as in benchmarks/lookup_reduce.py) is
set unless --small-pages.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if "--small-pages" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # read by the allocator, so before torch is imported

import torch                                                          # noqa: E402
import torch.nn as nn                                                 # noqa: E402

from common import machine, torch_threads, write_result                # noqa: E402
from umtrain.config.base import ConfigError                           # noqa: E402
from umtrain.config.schema import MemoryConfig                        # noqa: E402
from umtrain.model.accounting import memory_layer_components          # noqa: E402
from umtrain.model.memory import MemoryLayer                          # noqa: E402
from umtrain.ops.lookup_reduce import get_lookup_reduce               # noqa: E402

CASES = ("ultramem_reference", "ultramem_fused", "dense_mlp")
LOOKUP_OF_CASE = {"ultramem_reference": "reference", "ultramem_fused": "fused"}
DEFAULT_POINTS = "2048x16384x16,2048x16384x32,2048x16384x64,2048x262144x16,8192x16384x16"
WARMUP_TOKENS = 8
MIB = 2 ** 20


@dataclass(frozen=True)
class Point:
    tokens: int
    num_values: int
    top_m: int

    @classmethod
    def parse(cls, text: str) -> "Point":
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--points: {text!r} is not TOKENSxNxTOP_M with positive integers (e.g. 2048x65536x16)")
        return cls(*(int(p) for p in parts))

    def __str__(self) -> str:
        return f"{self.tokens}x{self.num_values}x{self.top_m}"


def memory_config(args: argparse.Namespace, point: Point) -> MemoryConfig:
    """The UltraMem layer of a point (Table 1's switches at benchmark scale); improved init off: it only sets scales."""
    config = MemoryConfig(num_values=point.num_values, value_dim=args.value_dim, key_dim=args.key_dim,
                          num_heads=args.heads, topk=point.top_m, ive_expansion=args.ive_expansion,
                          tucker_rank=args.tucker_rank, num_cores=args.cores, query_conv_kernel=args.conv_kernel,
                          improved_init=False, lookup_impl="reference")
    config.validate("memory")
    return config


def memory_flops_per_token(config: MemoryConfig, hidden_size: int) -> int:
    return sum(c.flops_per_token for c in memory_layer_components(config, hidden_size))


def dense_ffn_size(flops_per_token: int, hidden_size: int) -> int:
    """F such that the D -> F -> D MLP's 2 x 2DF FLOPs per token match `flops_per_token` (nearest integer)."""
    return max(1, round(flops_per_token / (4 * hidden_size)))


def build_module(case: str, args: argparse.Namespace, point: Point) -> nn.Module:
    config = memory_config(args, point)
    if case == "dense_mlp":
        ffn = dense_ffn_size(memory_flops_per_token(config, args.hidden), args.hidden)
        module = nn.Sequential(nn.Linear(args.hidden, ffn, bias=False), nn.GELU(),
                               nn.Linear(ffn, args.hidden, bias=False))
    else:
        module = MemoryLayer(config, args.hidden, num_layers=12, seed=0, layer_index=0,
                             lookup=get_lookup_reduce(LOOKUP_OF_CASE[case]))
    return module.to(getattr(torch, args.dtype))


def value_row_bytes(args: argparse.Namespace) -> int:
    return args.value_dim * torch.finfo(getattr(torch, args.dtype)).bits // 8


def make_batch(args: argparse.Namespace, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input x [tokens, 1, D] (requires grad: the previous block needs it) and the output gradient."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(tokens, 1, args.hidden, generator=gen, dtype=dtype).requires_grad_()
    grad = torch.randn(tokens, 1, args.hidden, generator=gen, dtype=dtype)
    return x, grad


def forward_backward(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[float, float]:
    """Seconds of the forward and of forward+backward, parameter and input gradients freed first."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    start = time.perf_counter()
    out = module(x)
    forward_s = time.perf_counter() - start
    out.backward(grad)
    return forward_s, time.perf_counter() - start


def time_cases(modules: Dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, warmup: int,
               repeats: int) -> Dict[str, Dict[str, List[float]]]:
    """Interleaved repeats: every repeat runs each case back to back, so machine load hits all cases alike."""
    samples = {case: {"forward_ms": [], "forward_backward_ms": []} for case in modules}
    for repeat in range(warmup + repeats):
        for case, module in modules.items():
            forward_s, forward_backward_s = forward_backward(module, x, grad)
            if repeat >= warmup:
                samples[case]["forward_ms"].append(1e3 * forward_s)
                samples[case]["forward_backward_ms"].append(1e3 * forward_backward_s)
    return samples


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward, parameters and input excluded."""
    excluded = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(saved.values())


def peak_rss_bytes(args: argparse.Namespace, cases: Sequence[str]) -> Dict[str, Dict[str, int]]:
    """{point: {case: peak RSS bytes of one forward+backward above the state before it}}.

    Each (point, case) runs in its own process, forked from a fresh interpreter that has only imported the
    libraries (no tensor work, no thread pool): clean allocator state, and torch is imported once, not per case.
    """
    env = os.environ.copy()
    if args.small_pages:
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    command = [sys.executable, __file__, f"--measure-peaks={','.join(cases)}",
               f"--points={','.join(map(str, args.points))}", *_layer_flags(args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"peak-memory process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def _layer_flags(args: argparse.Namespace) -> List[str]:
    return [f"--hidden={args.hidden}", f"--value-dim={args.value_dim}", f"--key-dim={args.key_dim}",
            f"--heads={args.heads}", f"--ive-expansion={args.ive_expansion}", f"--tucker-rank={args.tucker_rank}",
            f"--cores={args.cores}", f"--conv-kernel={args.conv_kernel}", f"--dtype={args.dtype}",
            f"--threads={args.threads}",
            *(["--small-pages"] if args.small_pages else [])]


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: peak RSS needs Linux")


def measure_peaks_here(args: argparse.Namespace) -> None:
    """Zygote: fork one child per (point, case), collect each child's peak, print them as one JSON line."""
    peaks: Dict[str, Dict[str, int]] = {}
    for point in args.points:
        for case in args.measure_peaks.split(","):
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_end)
                _measure_peak_child(args, point, case, write_end)
            os.close(write_end)
            with os.fdopen(read_end) as reader:
                reported = reader.read()
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) or not reported:
                raise RuntimeError(f"peak-memory child for {case} at {point} failed (exit status {status})")
            peaks.setdefault(str(point), {})[case] = int(reported)
    print(json.dumps(peaks))


def _measure_peak_child(args: argparse.Namespace, point: Point, case: str, write_end: int) -> None:
    """Warm up on a few tokens, reset the RSS high-water mark, run one full step, report the peak; never returns."""
    code = 1
    try:
        torch.set_num_threads(args.threads)
        module = build_module(case, args, point)
        forward_backward(module, *make_batch(args, WARMUP_TOKENS))
        x, grad = make_batch(args, point.tokens)
        module.zero_grad(set_to_none=True)
        gc.collect()
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")                # resets VmHWM to the current RSS
        forward_backward(module, x, grad)
        os.write(write_end, str((_proc_status_kib("VmHWM") - before) * 1024).encode())
        code = 0
    except BaseException:                                             # noqa: BLE001  (report, then leave the fork)
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def benchmark_point(args: argparse.Namespace, point: Point, cases: Sequence[str], peaks: Dict[str, int]) -> Dict:
    config = memory_config(args, point)
    flops = memory_flops_per_token(config, args.hidden)
    ffn = dense_ffn_size(flops, args.hidden)
    modules = {case: build_module(case, args, point) for case in cases}
    x, grad = make_batch(args, point.tokens)
    saved = {case: saved_activation_bytes(module, x) for case, module in modules.items()}
    samples = time_cases(modules, x, grad, args.warmup, args.repeats)
    results = {}
    for case in cases:
        results[case] = {
            "forward_ms": statistics.median(samples[case]["forward_ms"]),
            "forward_backward_ms": statistics.median(samples[case]["forward_backward_ms"]),
            "forward_backward_min_ms": min(samples[case]["forward_backward_ms"]),
            "saved_activation_mib": saved[case] / MIB,
            "saved_activation_bytes_per_token": saved[case] / point.tokens,
            "peak_rss_mib": peaks[case] / MIB,
            "samples": samples[case],
        }
    return {
        "tokens": point.tokens, "num_values": point.num_values, "top_m": point.top_m, "k": args.heads * point.top_m,
        "memory_flops_per_token": flops, "dense_ffn_size": ffn, "dense_flops_per_token": 4 * args.hidden * ffn,
        "value_table_mib": point.num_values * value_row_bytes(args) / MIB,
        "results": results,
        "ratios": _ratios(results),
    }


def _ratios(results: Dict[str, Dict]) -> Dict[str, float]:
    """Side-by-side ratios from the same run: each UltraMem case over the dense MLP, and reference over fused."""
    ratios = {}
    pairs = [(case, "dense_mlp") for case in LOOKUP_OF_CASE] + [("ultramem_reference", "ultramem_fused")]
    for numerator, denominator in pairs:
        if numerator in results and denominator in results:
            for key in ("forward_backward_ms", "peak_rss_mib", "saved_activation_mib"):
                ratios[f"{numerator}/{denominator}.{key}"] = results[numerator][key] / results[denominator][key]
    return ratios


def top_m_growth(points: List[Dict], value_row_bytes: int) -> List[Dict]:
    """Memory per token added per added selected value (K = H * top-m), between points differing only in top-m.

    This is the baseline a lookup-reduce must beat: one saved gathered value row costs d_v x element bytes
    (`value_row_bytes`), so memory that grows with top-m x d_v shows as a growth of the order of a row or more;
    memory that grows only with top-m (indices, per-entry scores) shows as a d_v-independent few tens of bytes.
    """
    growth = []
    for low in points:
        for high in points:
            if (low["tokens"], low["num_values"]) != (high["tokens"], high["num_values"]) or \
                    high["top_m"] <= low["top_m"]:
                continue
            added = low["tokens"] * (high["k"] - low["k"])
            for case in high["results"]:
                if case == "dense_mlp":
                    continue
                lo, hi = low["results"][case], high["results"][case]
                saved = (hi["saved_activation_mib"] - lo["saved_activation_mib"]) * MIB / added
                peak = (hi["peak_rss_mib"] - lo["peak_rss_mib"]) * MIB / added
                growth.append({
                    "case": case, "tokens": low["tokens"], "num_values": low["num_values"],
                    "top_m": [low["top_m"], high["top_m"]], "value_row_bytes": value_row_bytes,
                    "saved_bytes_per_added_value": saved, "peak_rss_bytes_per_added_value": peak,
                    "saved_in_value_rows": saved / value_row_bytes, "peak_rss_in_value_rows": peak / value_row_bytes,
                })
    return growth


def fused_status() -> Optional[str]:
    """None when the fused lookup-reduce imports, else the error (the benchmark then skips that case)."""
    try:
        get_lookup_reduce("fused")
    except Exception as error:                                        # noqa: BLE001  (any import failure)
        return f"{type(error).__name__}: {error}"
    return None


def print_table(summary: Dict) -> None:
    machine = summary["machine"]
    print(f"{machine['cpu']}, {machine['threads']} of {machine['cpus']} CPUs, load average "
          f"{machine['load_average_1m_before_after']} (other work on the machine inflates every time below)")
    if summary["fused_error"]:
        print(f"fused lookup-reduce unavailable: {summary['fused_error']}")
    print(f"{'point TxNxm':<18}{'case':<20}{'fwd ms':>9}{'f+b ms':>9}{'f+b min':>9}{'saved MiB':>11}{'B/token':>9}"
          f"{'peak MiB':>10}{'f+b x dense':>12}{'peak x dense':>13}")
    for p in summary["points"]:
        for case, r in p["results"].items():
            label = f"{p['tokens']}x{p['num_values']}x{p['top_m']}" if case == next(iter(p["results"])) else ""
            time_x = p["ratios"].get(f"{case}/dense_mlp.forward_backward_ms", 1.0 if case == "dense_mlp" else 0)
            peak_x = p["ratios"].get(f"{case}/dense_mlp.peak_rss_mib", 1.0 if case == "dense_mlp" else 0)
            print(f"{label:<18}{case:<20}{r['forward_ms']:>9.1f}{r['forward_backward_ms']:>9.1f}"
                  f"{r['forward_backward_min_ms']:>9.1f}"
                  f"{r['saved_activation_mib']:>11.1f}{r['saved_activation_bytes_per_token']:>9.0f}"
                  f"{r['peak_rss_mib']:>10.1f}{time_x:>12.2f}{peak_x:>13.2f}")
        print(f"{'':<18}dense F={p['dense_ffn_size']} for {p['memory_flops_per_token'] / 1e6:.2f} MFLOPs/token; "
              f"value table {p['value_table_mib']:.0f} MiB")
    for g in summary["top_m_growth"]:
        print(f"top-m {g['top_m'][0]}->{g['top_m'][1]} at T={g['tokens']} N={g['num_values']} {g['case']:<20}"
              f" per added selected value: saved {g['saved_bytes_per_added_value']:.0f} B "
              f"({g['saved_in_value_rows']:.2f} rows), peak {g['peak_rss_bytes_per_added_value']:.0f} B "
              f"({g['peak_rss_in_value_rows']:.2f} rows of {g['value_row_bytes']} B)")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=DEFAULT_POINTS, help="comma-separated TOKENSxNxTOP_M")
    parser.add_argument("--hidden", type=int, default=256, help="D")
    parser.add_argument("--value-dim", type=int, default=128, help="d_v (UltraMem: D/2)")
    parser.add_argument("--key-dim", type=int, default=64, help="d_k")
    parser.add_argument("--heads", type=int, default=2, help="H; K = H * top-m")
    parser.add_argument("--ive-expansion", type=int, default=4, help="E")
    parser.add_argument("--tucker-rank", type=int, default=2, help="r")
    parser.add_argument("--cores", type=int, default=2, help="MCS cores h")
    parser.add_argument("--conv-kernel", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads; 1 by default: on a shared machine OpenMP barriers wait on descheduled "
                             "threads and inflate times many-fold")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/memory_layer.json"))
    parser.add_argument("--small-pages", action="store_true", help="do not set THP_MEM_ALLOC_ENABLE=1")
    parser.add_argument("--measure-peaks", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.points = [Point.parse(text) for text in args.points.split(",")]
        for point in args.points:
            memory_config(args, point)
    except (ValueError, ConfigError) as error:
        parser.error(str(error))
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error(f"--repeats and --threads must be >= 1 and --warmup >= 0, got {args.repeats}, {args.threads} "
                     f"and {args.warmup}")
    return args


def run(args: argparse.Namespace) -> Dict:
    """Every point's measurements and the top-m growth, as the JSON summary."""
    fused_error = fused_status()
    cases = [case for case in CASES if not (case == "ultramem_fused" and fused_error)]
    load_before = os.getloadavg()[0]
    peaks = peak_rss_bytes(args, cases)
    points = [benchmark_point(args, point, cases, peaks[str(point)]) for point in args.points]
    return {
        "machine": machine() | {"huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
                                "load_average_1m_before_after": [load_before, os.getloadavg()[0]]},
        "layer": {"hidden": args.hidden, "value_dim": args.value_dim, "key_dim": args.key_dim, "heads": args.heads,
                  "ive_expansion": args.ive_expansion, "tucker_rank": args.tucker_rank, "cores": args.cores,
                  "conv_kernel": args.conv_kernel, "dtype": args.dtype},
        "timing": {"warmup": args.warmup, "repeats": args.repeats, "statistic": "median of interleaved repeats"},
        "memory_methods": {
            "saved_activation": "torch.autograd.graph.saved_tensors_hooks: distinct storages saved for backward, "
                                "parameters and input excluded",
            "peak_rss": "one process per (point, case), forked from a fresh interpreter that only imported the "
                        "libraries: VmHWM after a /proc/self/clear_refs reset minus VmRSS before one "
                        "forward+backward (includes parameter gradients and transients)"},
        "fused_error": fused_error,
        "points": points,
        "top_m_growth": top_m_growth(points, value_row_bytes(args)),
    }


def main(argv: Optional[Sequence[str]] = None) -> Optional[Dict]:
    """Run the benchmark, print the table, write the JSON; returns the summary (None in a peak-memory zygote)."""
    args = parse_args(argv)
    if args.measure_peaks:
        measure_peaks_here(args)
        return None
    with torch_threads(args.threads):
        summary = run(args)
    print_table(summary)
    return write_result(args.out, summary, __file__, argv)


if __name__ == "__main__":
    main()
