"""The memory layer's selection kernels on a GPU: the Triton top-k against `torch.topk`, and the pair scores'
custom backward against einsum's autograd, side by side in one run.

    python benchmarks/selection_cuda.py [--tokens 32768] [--out docs/benchmarks/selection_cuda.json]

Shapes are the profiled layer's at 16 x 2048 tokens (`benchmarks/memory_layer_profile.py`, N = 2^20 values:
sqrt(E x N) = 2,048 keys per side; UltraMem-151M's config has 2,200, `--keys 2200`): candidates are the top 16
of 2 heads x `--keys` factor scores per side, read as the [T, H, n] view of an [H, T, n] GEMM output as in the layer;
the grid's top-m is the top 16 of 16 x 16 candidate pairs; the pair scores take [T, H, r=2, m=16] sub-key scores
and 2 cores. bfloat16; CUDA-event medians (`triton.testing.do_bench`). The top-k kernel's rows per program and
warps are swept; the layer uses `umtrain.ops.triton_topk`'s defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import triton
import triton.testing

from common import machine, write_result
from umtrain.model.memory.retrieval import pair_scores
from umtrain.ops.triton_topk import NUM_WARPS, ROW_ELEMENTS_PER_PROGRAM, triton_topk_indices

DTYPE = torch.bfloat16


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--keys", type=int, default=2048, help="keys per side, sqrt(E x N)")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--top-m", type=int, default=16)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/selection_cuda.json"))
    return parser.parse_args(argv)


def milliseconds(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def check_topk(scores: torch.Tensor, k: int, **tuning) -> None:
    """The kernel's indices pick the values torch.topk picks (indices may differ on ties)."""
    got = scores.gather(-1, triton_topk_indices(scores, k, **tuning))
    if not torch.equal(got, scores.topk(k, dim=-1).values):
        raise AssertionError(f"Triton top-k differs from torch.topk at {tuple(scores.shape)}, k={k}, {tuning}")


def topk_rows(name: str, scores: torch.Tensor, k: int) -> dict:
    check_topk(scores, k)
    torch_ms = milliseconds(lambda: scores.topk(k, dim=-1))
    triton_ms = milliseconds(lambda: triton_topk_indices(scores, k))
    return {"case": name, "shape": list(scores.shape), "k": k, "torch_ms": torch_ms, "triton_ms": triton_ms,
            "speedup": torch_ms / triton_ms}


def tuning_sweep(scores: torch.Tensor, k: int) -> list[dict]:
    rows = []
    for row_elements in (1024, 2048, 4096, 8192):
        for num_warps in (4, 8):
            tuning = {"row_elements": row_elements, "num_warps": num_warps}
            check_topk(scores, k, **tuning)
            rows.append(tuning | {"ms": milliseconds(lambda: triton_topk_indices(scores, k, **tuning))})
    return rows


def einsum_pair_scores(f_row, f_col, cores):
    return torch.einsum("tjxm,jixy,tjym->itjm", f_row, cores, f_col)


def pair_score_rows(args: argparse.Namespace) -> dict:
    shape = (args.tokens, args.heads, args.rank, args.top_m)
    f_row = torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True)
    f_col = torch.randn(shape, device="cuda", dtype=DTYPE, requires_grad=True)
    cores = torch.rand(args.heads, args.cores, args.rank, args.rank, device="cuda", dtype=DTYPE, requires_grad=True)
    grad = torch.randn(args.cores, args.tokens, args.heads, args.top_m, device="cuda", dtype=DTYPE)
    inputs = (f_row, f_col, cores)

    def forward_backward(fn):
        return torch.autograd.grad(fn(*inputs), inputs, grad)

    exact = torch.autograd.grad(einsum_pair_scores(*(x.double() for x in inputs)), inputs, grad.double())
    errors = {}
    for name, fn in (("einsum", einsum_pair_scores), ("custom", pair_scores)):
        got = forward_backward(fn)
        errors[name] = max(((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, exact))
    einsum_ms, custom_ms = milliseconds(lambda: forward_backward(einsum_pair_scores)), milliseconds(
        lambda: forward_backward(pair_scores))
    return {"case": "pair scores forward+backward", "einsum_ms": einsum_ms, "custom_ms": custom_ms,
            "speedup": einsum_ms / custom_ms, "relative_error_vs_float64": errors}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("selection_cuda.py needs a CUDA device")
    generator = torch.Generator(device="cuda").manual_seed(0)
    factor = torch.randn(args.heads, args.tokens, args.keys, device="cuda", dtype=DTYPE, generator=generator)
    candidates = factor.transpose(0, 1)
    grid = torch.randn(args.tokens, args.heads, args.candidates ** 2, device="cuda", dtype=DTYPE,
                       generator=generator)
    topk = [topk_rows("candidates per side", candidates, args.candidates),
            topk_rows("grid top-m", grid, args.top_m)]
    sweep = tuning_sweep(candidates, args.candidates)
    pairs = pair_score_rows(args)
    print(f"{torch.cuda.get_device_name()}, triton {triton.__version__}, {args.tokens} tokens, bfloat16")
    print("| case | shape | k | torch.topk ms | Triton ms | speedup |\n|---|---|---|---|---|---|")
    for row in topk:
        print(f"| {row['case']} | {row['shape']} | {row['k']} | {row['torch_ms']:.3f} | {row['triton_ms']:.3f} | "
              f"{row['speedup']:.2f}x |")
    print(f"\ntop-k tuning (candidates; default {ROW_ELEMENTS_PER_PROGRAM} elements, {NUM_WARPS} warps):")
    for row in sweep:
        print(f"  {row['row_elements']:5d} elements per program, {row['num_warps']} warps: {row['ms']:.3f} ms")
    print(f"\npair scores forward+backward: einsum {pairs['einsum_ms']:.3f} ms, custom {pairs['custom_ms']:.3f} ms "
          f"({pairs['speedup']:.2f}x); relative error vs float64 {pairs['relative_error_vs_float64']}")
    summary = {"shape": vars(args) | {"out": str(args.out)}, "machine": machine() | {"triton": triton.__version__},
               "topk": topk, "topk_tuning": sweep, "pair_scores": pairs}
    return write_result(args.out, summary, __file__, argv)


if __name__ == "__main__":
    main()
