"""`umtrain plan` (per memory layer: communication volumes, predicted times, sharding mode) and
`umtrain calibrate-comm` (measure the alpha-beta model of the collectives, and the local compute of each sharding
mode, on this machine)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from umtrain.cli.main import positive_int
from umtrain.config import load_config
from umtrain.config.base import ConfigError
from umtrain.ops.lookup_reduce import get_lookup_reduce
from umtrain.parallel.calibration import calibrate_world
from umtrain.parallel.comm import run_local_group
from umtrain.parallel.cost_model import (DEFAULT_CALIBRATION, VARIANTS, Calibration, LayerPlan, crossover_value_dim,
                                         dims_from_config, plan_config, table_gradient_tp_sum_bytes)
from umtrain.parallel.state import resolve_backend


TARGET_HAS_CUDA = True
"""The plan is for a GPU cluster, whatever machine it runs on: training.precision auto means bf16 there."""


def register(subparsers: argparse._SubParsersAction) -> None:
    plan = subparsers.add_parser("plan", help="predict memory-table communication per layer and pick the sharding mode")
    plan.add_argument("config", help="YAML config")
    plan.add_argument("overrides", nargs="*", help="key.path=value overrides")
    plan.add_argument("--world", type=int, required=True, help="world size to plan for (nothing is launched)")
    plan.add_argument("--json", action="store_true", help="print a JSON list, one object per memory layer")
    plan.add_argument("--calibration", default=None,
                      help="alpha/beta (and compute) JSON from `umtrain calibrate-comm` (default: the config's "
                           "parallel.comm_calibration, as the run uses, else an assumed NCCL-over-InfiniBand guess)")
    plan.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                      help="training dtype of the planned run, which sets the bytes of the values and scores sent "
                           "(auto: training.precision, its auto taken as on the GPU cluster planned for: bf16; "
                           "fp32 or bf16 override it, e.g. fp32 for a CPU cluster)")
    plan.set_defaults(func=run_plan)

    cal = subparsers.add_parser("calibrate-comm", help="measure all-to-all latency (alpha) and seconds/byte (beta), "
                                                       "and each sharding mode's local compute")
    cal.add_argument("--output", default="comm_calibration.json", help="where to write the JSON")
    cal.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto",
                     help="auto: nccl when CUDA is available, gloo otherwise")
    cal.add_argument("--nproc", type=int, default=2, help="local processes to spawn when not launched by torchrun")
    cal.add_argument("--iters", type=positive_int, default=5, help="timed repetitions per message size and lookup size")
    cal.add_argument("--lookup-impl", choices=["auto", "reference", "fused", "triton"], default="auto",
                     help="lookup-reduce the compute term is measured with, as model.memory.lookup_impl (auto: triton "
                          "on GPU, fused on CPU)")
    cal.add_argument("--no-compute", dest="compute", action="store_false",
                     help="communication only (the plan then predicts zero local compute)")
    cal.set_defaults(func=run_calibrate)


def run_plan(args: argparse.Namespace) -> int:
    try:
        if args.world < 1:
            raise ConfigError("--world", f"must be >= 1, got {args.world}")
        overrides = list(args.overrides) + ([f"training.precision={args.dtype}"] if args.dtype != "auto" else [])
        config = load_config(args.config, overrides, world_size=args.world, check_files=False)
        calibration = planned_calibration(args.calibration, config.parallel.comm_calibration)
        plans = plan_config(config, calibration, cuda=TARGET_HAS_CUDA)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        dtype = planned_dtype(config)
        print(json.dumps([{**asdict(p), "dtype": dtype} for p in plans], indent=2))
    else:
        print(format_plan(plans, config, args.world, calibration))
    return 0


def planned_calibration(option: str | None, configured: str | None) -> Calibration:
    """`--calibration`, else the file the run itself prices with (`parallel.comm_calibration`), else the guess."""
    if option is not None:
        if configured is not None and Path(option).resolve() != Path(configured).resolve():
            print(f"warning: --calibration {option} replaces the config's parallel.comm_calibration {configured}, "
                  f"which the run itself will use", file=sys.stderr)
        return Calibration.load(option)
    if configured is not None:
        try:
            return Calibration.load(configured)
        except ConfigError as err:
            raise ConfigError("parallel.comm_calibration", str(err)) from None
    return DEFAULT_CALIBRATION


def planned_dtype(config) -> str:
    """The training dtype the plan assumes ('bf16' or 'fp32')."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[config.training.params_dtype(TARGET_HAS_CUDA)]


def _precision_source(config) -> str:
    precision = config.training.precision
    return "training.precision auto, as on GPUs" if precision == "auto" else f"training.precision {precision}"


def _group_ranks(memory_parallel_group: str, tp: int) -> str:
    if memory_parallel_group == "tensor_data":
        return f"consecutive ranks in TP-then-DP order, TP={tp}"
    return f"data-parallel ranks of equal TP rank, each of the TP={tp} ranks with a replica" if tp > 1 else \
        "data-parallel ranks"


def format_plan(plans: list[LayerPlan], config, world: int, calibration: Calibration) -> str:
    dims = dims_from_config(config, TARGET_HAS_CUDA)
    p = config.parallel
    groups = world // (p.pipeline_model_parallel_size * dims.group_size)
    crossover = crossover_value_dim(dims.topk, dims.num_blocks, dims.group_size, float_bytes=dims.value_bytes,
                                    cores_per_rank=dims.cores_per_rank)
    lines = [
        f"world {world}: {groups} memory-parallel group(s) of P={dims.group_size} per pipeline stage "
        f"({_group_ranks(p.memory_parallel_group, p.tensor_model_parallel_size)}); "
        f"K={dims.topk}, E={dims.num_blocks}, h={dims.num_cores}, d_v={dims.value_dim}, "
        f"{planned_dtype(config)} ({dims.value_bytes}-byte) values and scores ({_precision_source(config)}; "
        f"--dtype sets it)",
        f"calibration: alpha {calibration.alpha_s * 1e6:.1f} us, {1 / calibration.beta_s_per_byte / 1e9:.2f} GB/s "
        f"({calibration.source})",
        _describe_compute(calibration) if calibration.compute.calibrated else
        "local compute: not calibrated (taken as 0; `umtrain calibrate-comm` measures it)",
        f"crossover d_v* = {crossover:.1f} (dimension-wise moves fewer bytes above it)" if dims.group_size > 1 else
        "crossover: none (P=1, every table is local)",
        "bytes: sent per rank per micro-batch, forward + backward; t: predicted communication + local compute "
        "(of which c: compute)",
        "",
        f"{'layer':>5} {'placement':>9} {'tokens':>7} {'number rows':>12} {'number pooled':>14} {'dimension':>12} "
        f"{'t number':>10} {'t dimension':>12} {'c number':>10} {'c dimension':>12}  mode",
    ]
    for plan in plans:
        mode = plan.mode + (" (owner-pooled)" if plan.owner_pooling else "")
        lines.append(f"{plan.layer:>5} {plan.placement:>9} {plan.tokens_per_rank:>7} {_mb(plan.bytes_number_rows):>12} "
                     f"{_mb(plan.bytes_number_pooled):>14} {_mb(plan.bytes_dimension_wise):>12} "
                     f"{_ms(plan.seconds_number_wise):>10} {_ms(plan.seconds_dimension_wise):>12} "
                     f"{_ms(plan.compute_seconds_number_wise):>10} {_ms(plan.compute_seconds_dimension_wise):>12}  "
                     f"{mode}")
    lines.append("")
    tp_sum = table_gradient_tp_sum_bytes(config)
    if tp_sum:
        lines.append(f"sequence parallel with memory_parallel_group data: each step also all-reduces every memory "
                     f"layer's table-shard gradient ({_mb(tp_sum)}) over TP={p.tensor_model_parallel_size}; "
                     f"memory_parallel_group: tensor_data holds 1/P per rank without it")
    reasons = {plan.reason for plan in plans}
    if len(reasons) == 1:
        lines.append(f"every layer: {reasons.pop()}")
    else:
        lines += [f"layer {plan.layer}: {plan.reason}" for plan in plans]
    return "\n".join(lines)


def _mb(num_bytes) -> str:
    return "-" if num_bytes is None else f"{num_bytes / 1e6:.2f} MB"


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f} ms"


def run_calibrate(args: argparse.Namespace) -> int:
    backend = resolve_backend(args.backend)
    options = (args.iters, args.lookup_impl if args.compute else None)
    try:
        check_calibrate_options(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        calibration = calibrate_world(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), *options, backend)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        if args.nproc < 2:
            print("error: --nproc: calibration needs at least 2 processes", file=sys.stderr)
            return 2
        if backend == "nccl" and args.nproc > torch.cuda.device_count():
            print(f"error: --nproc: {args.nproc} NCCL processes need a GPU each, this machine has "
                  f"{torch.cuda.device_count()}", file=sys.stderr)
            return 2
        calibration = run_local_group(calibrate_world, args.nproc, *options, None, backend=backend)[0]
    calibration.save(args.output)
    print(f"alpha {calibration.alpha_s * 1e6:.1f} us, beta {calibration.beta_s_per_byte * 1e9:.4f} ns/byte "
          f"({1 / calibration.beta_s_per_byte / 1e9:.2f} GB/s), {backend}, {calibration.world_size} ranks "
          f"-> {args.output}")
    if calibration.compute.calibrated:
        print(_describe_compute(calibration))
    return 0


def check_calibrate_options(args: argparse.Namespace) -> None:
    """Before measuring, not after: a writable --output file and a lookup-reduce this machine can run."""
    output = Path(args.output)
    if output.is_dir():
        raise ConfigError("--output", f"{output} is a directory; name the JSON file to write")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("--output", f"cannot create {output.parent}: {err.strerror}") from None
    if not os.access(output.parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise ConfigError("--output", f"{output} is not writable")
    if args.compute:
        try:
            get_lookup_reduce(args.lookup_impl)
        except ConfigError as err:
            raise ConfigError("--lookup-impl", str(err).removeprefix(f"{err.key}: ")) from None


def _describe_compute(calibration: Calibration) -> str:
    """One line per variant: compute seconds = c . [1, n_index, b_gathered, b_pooled]."""
    lines = ["local compute per rank, forward + backward = c0 + c1 * index entries + c2 * gathered bytes + "
             "c3 * pooled-output bytes:"]
    for variant in VARIANTS:
        c0, c1, c2, c3 = getattr(calibration.compute, variant)
        lines.append(f"  {variant:>9}: {c0 * 1e6:.1f} us + {c1 * 1e9:.2f} ns/index + {c2 * 1e9:.4f} ns/B gathered "
                     f"+ {c3 * 1e9:.4f} ns/B pooled")
    return "\n".join(lines)
