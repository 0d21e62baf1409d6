"""Where one memory layer's time goes: forward and forward+backward timings and a per-operator profile.

    python benchmarks/memory_layer_profile.py [--tokens 32768] [--num-values 1048576] [--value-dim 512]
                                              [--rows 25] [--out docs/benchmarks/memory_layer_profile.json]

The default layer is UltraMem-151M's (hidden 1024, d_k 256, 2 heads x top-m 16, E = 4, r = 2, h = 2, query conv,
a 1M-value table of d_v 512) at 16 sequences of 2048 tokens, the size at which `benchmarks/memory_overlap.py
--preset gpu --micro-batch-size 16` measured it. On CUDA it runs in bfloat16 and the profile ranks the GPU kernels
by their time (operators' own device time would count each kernel twice, once as itself and once in the operator
that launched it); on CPU it runs in float32 and ranks operators by their own CPU time. It also counts the
host-device synchronisations per step (CUDA runtime calls that block the host), which stop the host from running
ahead of the GPU and so defeat the side-stream overlap, and lists, on any device, the operators and host reads of
one step that synchronise on CUDA (`umtrain.ops.host_sync`), with where they were called.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from common import synchronize, write_result
from umtrain.config.schema import MemoryConfig
from umtrain.model.memory import MemoryLayer
from umtrain.ops.host_sync import record_host_syncs

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""Runtime calls that block the host until the device catches up (device-to-host copies such as `.item()` and
`.tolist()` end in cudaStreamSynchronize). The profile's own closing synchronize is one cudaDeviceSynchronize per
profile, i.e. 1/steps per step."""


def build_layer(args: argparse.Namespace, device: str, dtype: torch.dtype) -> MemoryLayer:
    config = MemoryConfig(num_values=args.num_values, value_dim=args.value_dim, key_dim=args.key_dim,
                          num_heads=args.heads, topk=args.top_m, ive_expansion=4, tucker_rank=2, num_cores=2,
                          query_conv_kernel=5, lookup_impl=args.lookup_impl)
    return MemoryLayer(config, args.hidden, num_layers=12, seed=0, layer_index=0).to(device=device, dtype=dtype)


def step(layer: MemoryLayer, x: torch.Tensor, grad: torch.Tensor, backward: bool) -> None:
    out = layer(x)
    if backward:
        out.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None


def median_ms(layer, x, grad, backward: bool, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        step(layer, x, grad, backward)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def timed_event(event, device: str) -> bool:
    """GPU kernels on CUDA; CPU operators on CPU (each piece of work counted once)."""
    if device == "cuda":
        return event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
    return event.device_type == DeviceType.CPU


def own_time_us(event, device: str) -> float:
    return event.self_device_time_total if device == "cuda" else event.self_cpu_time_total


def operators_by_shape(prof, device: str, steps: int) -> list[dict]:
    """The operators that did the work, with their input shapes, ranked by the time of what each launched itself
    (its kernels on CUDA, its own CPU time on CPU): which line of the layer a kernel of the first ranking is."""
    rows = []
    for e in prof.key_averages(group_by_input_shape=True):
        own_us = own_time_us(e, device)
        if e.device_type == DeviceType.CPU and own_us > 0:
            rows.append({"name": e.key, "input_shapes": str(e.input_shapes), "calls_per_step": e.count / steps,
                         "self_ms_per_step": own_us / 1000 / steps})
    return sorted(rows, key=lambda r: r["self_ms_per_step"], reverse=True)


def profile_steps(layer, x, grad, device: str, steps: int) -> tuple[list[dict], list[dict], list[dict], float]:
    """(kernels or operators with their calls and own time per forward+backward step, ranked; the same time by
    operator and input shapes; host-blocking runtime calls per step; wall milliseconds per profiled step, profiler
    overhead included)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(layer, x, grad, backward=True)
        synchronize(device)
        wall_ms = 1000 * (time.perf_counter() - start) / steps
    events = prof.key_averages()
    ops = [{"name": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": own_time_us(e, device) / 1000 / steps}
           for e in events if timed_event(e, device) and not e.key.startswith(SYNC_CALLS)]
    syncs = [{"name": e.key, "calls_per_step": e.count / steps} for e in events if e.key.startswith(SYNC_CALLS)]
    ranked = sorted(ops, key=lambda r: r["self_ms_per_step"], reverse=True)
    return ranked, operators_by_shape(prof, device, steps), syncs, wall_ms


def print_report(result: dict, rows: int) -> None:
    print(f"{result['device_name']}, {result['dtype']}, {result['tokens']} tokens, N={result['shape']['num_values']}, "
          f"d_v={result['shape']['value_dim']}, lookup {result['lookup']}")
    print(f"forward {result['forward_ms']:.2f} ms, forward+backward {result['forward_backward_ms']:.2f} ms "
          f"(medians); under the profiler {result['profiled_wall_ms_per_step']:.2f} ms per step, of which the "
          f"ranked {result['ranked']}s' own time {result['profiled_ms_per_step']:.2f} ms")
    print("host-blocking runtime calls per step: "
          + (", ".join(f"{op['name']} x{op['calls_per_step']:g}" for op in result["host_syncs"]) or "none"))
    print("operators and host reads that synchronise on CUDA, per step: "
          + ("; ".join(result["host_sync_operators"]) or "none"))
    total = result["profiled_ms_per_step"] or 1.0
    print(f"{result['ranked']:<60} {'calls':>7} {'ms/step':>9} {'share':>6}")
    for op in result["ops"][:rows]:
        print(f"{op['name'][:60]:<60} {op['calls_per_step']:>7g} {op['self_ms_per_step']:>9.3f} "
              f"{op['self_ms_per_step'] / total:>6.1%}")
    print(f"\n{'operator (input shapes)':<100} {'calls':>7} {'ms/step':>9}")
    for op in result["ops_by_shape"][:rows]:
        print(f"{(op['name'] + ' ' + op['input_shapes'])[:100]:<100} {op['calls_per_step']:>7g} "
              f"{op['self_ms_per_step']:>9.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens = seq_length x batch (query conv)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--num-values", type=int, default=1 << 20)
    parser.add_argument("--value-dim", type=int, default=512)
    parser.add_argument("--key-dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--top-m", type=int, default=16)
    parser.add_argument("--lookup-impl", default="auto", choices=("auto", "reference", "fused", "triton"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="operators printed")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/memory_layer_profile.json"))
    args = parser.parse_args(argv)
    if args.tokens % args.seq_length:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --seq-length ({args.seq_length})")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = build_layer(args, device, dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.seq_length, args.tokens // args.seq_length, args.hidden)
    x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_()
    grad = torch.randn(shape, generator=gen, device=device).to(dtype)
    for _ in range(2):
        step(layer, x, grad, backward=True)
    forward = median_ms(layer, x, grad, False, device, args.repeats)
    forward_backward = median_ms(layer, x, grad, True, device, args.repeats)
    ops, ops_by_shape, syncs, profiled_wall_ms = profile_steps(layer, x, grad, device, args.profile_steps)
    with record_host_syncs() as sync_operators:
        step(layer, x, grad, backward=True)
    result = {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens,
        "shape": {k: v for k, v in vars(args).items() if k not in ("out", "rows")},
        "lookup": getattr(layer.lookup, "__name__", type(layer.lookup).__name__),
        "forward_ms": forward, "forward_backward_ms": forward_backward,
        "profiled_ms_per_step": sum(op["self_ms_per_step"] for op in ops),
        "profiled_wall_ms_per_step": profiled_wall_ms,
        "ranked": "GPU kernel" if device == "cuda" else "operator", "ops": ops, "ops_by_shape": ops_by_shape,
        "host_syncs": syncs,
        "host_sync_operators": sync_operators,
    }
    print_report(result, args.rows)
    return write_result(args.out, result, __file__, argv)


if __name__ == "__main__":
    main()
