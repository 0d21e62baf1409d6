"""How much of a memory layer's time the overlap runner hides: forward+backward of one training step, with and
without `model.memory.overlap`. On CPU: a local gloo group (DP=2, memory-parallel P=2), `ThreadRunner`. On GPUs:
one process per GPU (NCCL; P=1 by default, `--world-size N` for N GPUs), `StreamRunner` (the lookup on a side CUDA
stream), with the `--preset gpu` model. Results and their reading: docs/benchmarks/memory_overlap.md.

    python benchmarks/memory_overlap.py [--preset cpu|gpu|quick] [--world-size N] [--placement 1:4] [--steps 60]
                                        [--sharding-mode auto|number|dimension] [--added-latency-ms 0]
                                        [--out docs/benchmarks/memory_overlap.json]

Three models are built side by side in each process, from the same seed and layout: `dense` (the same blocks, no
memory layer), `sync` (UltraMem, one memory layer `a:b`, overlap off) and `async` (overlap on). Each step runs
forward+backward of one micro-batch (no optimizer step, so weights and losses stay fixed, and sync and async
must give bit-identical losses); variants take turns within each round, in rotating order, so that load from
other processes hits them alike. A step is timed between two barriers, i.e. it is the slower rank's time.

    synchronous time = sync - dense       the memory layer's cost without overlap
    exposed time     = async - dense      what is left of it with overlap
    ratio            = exposed / synchronous              (the issue's target: <= 0.30)

The ratio is taken per round, relative to the round's dense step, then medians over rounds (so that load from
other processes that comes and goes between rounds cancels), and also from the fastest round of each variant.

Communication vs compute: every all-to-all of the memory layer goes through its lookup's `Communicator`; the
benchmark swaps in a `TimedCommunicator` (same group, same calls) that sums the wall time spent inside them,
forward and backward (tags ending in `.grad`) apart. That time includes waiting for the other rank. The CPU
time of each process (all threads) per step is recorded too: overlap must not change it, only the wall time.
`--added-latency-ms` emulates a slower network (each all-to-all also sleeps that long).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from common import quartiles, synchronize, write_result
from umtrain.config import config_from_dict
from umtrain.parallel.comm import GRAD_SUFFIX, Communicator, run_local_group

VARIANTS = ("dense", "sync", "async")
DEFAULT_OUT = "docs/benchmarks/memory_overlap.json"
SEGMENTS = 3
"""The timed rounds are also split into this many consecutive segments, each giving its own ratio (their spread
shows how much the machine's load moved the result during the run)."""


@dataclass(frozen=True)
class Setting:
    num_layers: int = 4
    placement: str = "1:4"
    hidden_size: int = 256
    num_heads: int = 4
    seq_length: int = 256
    micro_batch_size: int = 2
    num_values: int = 65536
    value_dim: int = 128
    key_dim: int = 64
    topk: int = 16
    lookup_impl: str = "fused"
    sharding_mode: str = "auto"
    warmup: int = 3
    steps: int = 60
    added_latency_ms: float = 0.0
    world_size: int = 2
    """Processes, = DP = memory-parallel P. 1 on a GPU machine with one GPU (NCCL refuses two ranks per GPU)."""


PRESETS = {
    "cpu": Setting(),
    "quick": Setting(hidden_size=64, seq_length=32, num_values=1024, value_dim=32, key_dim=16, topk=4,
                     lookup_impl="reference", warmup=1, steps=2),
    # A 151M-like block stack (hidden 1024, sequence 2048) with one memory layer of 1M values, d_v 512.
    "gpu": Setting(hidden_size=1024, num_heads=16, seq_length=2048, micro_batch_size=4, num_values=1 << 20,
                   value_dim=512, key_dim=256, topk=16, lookup_impl="triton", warmup=5, steps=30, world_size=1),
}
QUICK = PRESETS["quick"]


def variant_config(setting: Setting, variant: str) -> dict:
    """Config of one variant: DP=2 and P=2 for all three, so they share one Megatron parallel state."""
    s = setting
    model = {"family": "dense", "num_layers": s.num_layers, "hidden_size": s.hidden_size,
             "num_attention_heads": s.num_heads}
    if variant != "dense":
        model.update(family="ultramem", memory={
            "placements": [s.placement], "num_values": s.num_values, "value_dim": s.value_dim,
            "key_dim": s.key_dim, "topk": s.topk, "lookup_impl": s.lookup_impl, "sharding_mode": s.sharding_mode,
            "overlap": variant == "async"})
    batch = s.micro_batch_size * s.world_size
    return {
        "model": model,
        "parallel": {"expert_model_parallel_size": s.world_size},
        "data": {"mock": True, "seq_length": s.seq_length, "mock_vocab_size": 256},
        "training": {"micro_batch_size": s.micro_batch_size, "global_batch_size": batch, "train_iters": 1,
                     "eval_interval": 100, "eval_iters": 1},
        "logging": {"log_interval": 100, "progress_bar": False, "memory_stats": False},
    }


class TimedCommunicator(Communicator):
    """A Communicator that also sums the wall time spent inside its all-to-alls, forward and backward apart.

    `added_latency_s` > 0 emulates a slower network: each all-to-all then also sleeps that long (waiting
    without using the CPU, as a rank waiting on its NIC does).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], added_latency_s: float = 0.0):
        super().__init__(group)
        self.added_latency_s = added_latency_s
        self.seconds = {"forward": 0.0, "backward": 0.0}

    def reset_counters(self) -> None:
        super().reset_counters()
        self.seconds = {"forward": 0.0, "backward": 0.0}

    def all_to_all(self, x: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int],
                   tag: str) -> torch.Tensor:
        start = time.perf_counter()
        out = super().all_to_all(x, send_splits, recv_splits, tag)
        if self.added_latency_s:
            time.sleep(self.added_latency_s)
        self.seconds["backward" if tag.endswith(GRAD_SUFFIX) else "forward"] += time.perf_counter() - start
        return out


def time_communication(trainer, added_latency_s: float) -> TimedCommunicator:
    """Route the memory layer's collectives through one TimedCommunicator (same group, same calls)."""
    (memory,) = trainer.memory_layers
    timed = TimedCommunicator(memory.lookup.comm.group, added_latency_s)
    memory.lookup.comm = timed
    return timed


def forward_backward(model, batch: dict[str, torch.Tensor]) -> float:
    """One micro-batch through Megatron's DDP-wrapped chunk and back (gradients land in its grad buffer)."""
    from umtrain.train.runner import forward_step

    model.zero_grad_buffer()
    output, loss_fn = forward_step(iter([batch]), model)
    loss, _ = loss_fn(output)
    loss.backward()
    return float(loss.detach())


def timed_step(model, batch: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(wall seconds of the slower rank, CPU seconds of this process in all its threads, loss)."""
    synchronize("cuda" if torch.cuda.is_available() else "cpu")
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss = forward_backward(model, batch)
    cpu = time.process_time() - cpu_start
    synchronize("cuda" if torch.cuda.is_available() else "cpu")
    dist.barrier()
    return time.perf_counter() - start, cpu, loss


def _time_rounds(trainers: dict, comms: dict[str, TimedCommunicator], setting: Setting) -> dict:
    """Warm-up, then timed rounds of one step per variant (order rotating per round); per variant and round:
    group step time, this process's CPU time, loss, and the memory layer's communication time."""
    from umtrain.train.runner import to_device

    batch = to_device(next(trainers["dense"].train_batches.iterators(0, 1)[0]))
    times = {v: [] for v in VARIANTS}
    cpu_times = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    comm = {v: {"forward": [], "backward": []} for v in comms}
    for step in range(setting.warmup + setting.steps):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(step + i) % len(VARIANTS)]
            if variant in comms:
                comms[variant].reset_counters()
            seconds, cpu, loss = timed_step(trainers[variant].model[0], batch)
            if step < setting.warmup:
                continue
            times[variant].append(seconds)
            cpu_times[variant].append(cpu)
            losses[variant].append(loss)
            for phase, value in (comms[variant].seconds.items() if variant in comms else ()):
                comm[variant][phase].append(value)
    return {"times": times, "cpu_times": cpu_times, "losses": losses, "comm": comm}


def _worker(rank: int, world: int, setting: Setting) -> dict:
    from megatron.core import parallel_state
    from umtrain.train.trainer import Trainer

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        trainers = {v: Trainer(config_from_dict(variant_config(setting, v), world_size=world)) for v in VARIANTS}
        comms = {v: time_communication(trainers[v], setting.added_latency_ms / 1000) for v in ("sync", "async")}
        result = _time_rounds(trainers, comms, setting)
        result["lookup"] = type(trainers["sync"].memory_layers[0].lookup).__name__
        result["bytes_sent"] = sum(comms["sync"].bytes_sent.values())   # one step's: counters are reset per step
        return result
    finally:
        parallel_state.destroy_model_parallel()


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole > 0 else float("nan")


def _paired(times: dict[str, list[float]], variant: str) -> list[float]:
    """Per round: the variant's step minus the dense step of the same round, as a fraction of the latter."""
    return [t / dense - 1 for t, dense in zip(times[variant], times["dense"])]


def _paired_ratio(times: dict[str, list[float]]) -> float:
    """exposed / synchronous from per-round costs relative to the round's dense step (medians over rounds): load
    from other processes slows all three steps of a round alike and cancels, even when it switches between
    rounds (a bimodal step time, whose median of absolute times would fall anywhere in the gap)."""
    return _fraction(statistics.median(_paired(times, "async")), statistics.median(_paired(times, "sync")))


def _segments(times: dict[str, list[float]]) -> list[float]:
    rounds = len(times["dense"])
    if rounds < 2 * SEGMENTS:
        return []
    bounds = [rounds * i // SEGMENTS for i in range(SEGMENTS + 1)]
    return [_paired_ratio({v: times[v][lo:hi] for v in VARIANTS}) for lo, hi in zip(bounds, bounds[1:])]


def _mean_over_ranks(ranks: list[dict], select) -> float:
    return statistics.fmean(statistics.median(select(rank)) for rank in ranks)


def summarize(ranks: list[dict], setting: Setting) -> dict:
    """Step times are the group's (rank 0 holds them); CPU and communication times are per rank (medians over
    rounds), averaged over the ranks. Seconds of the memory layer: median over rounds of the paired difference to
    dense, and the difference of the fastest rounds (the machine as if nothing else ran)."""
    times = ranks[0]["times"]
    median_cost = {v: statistics.median(t - d for t, d in zip(times[v], times["dense"])) for v in ("sync", "async")}
    best_cost = {v: min(times[v]) - min(times["dense"]) for v in ("sync", "async")}
    cpu = {v: _mean_over_ranks(ranks, lambda r: r["cpu_times"][v]) for v in VARIANTS}
    comm = {v: {phase: _mean_over_ranks(ranks, lambda r: r["comm"][v][phase]) for phase in ("forward", "backward")}
            for v in ("sync", "async")}
    sync_comm = comm["sync"]["forward"] + comm["sync"]["backward"]
    synchronous = best_cost["sync"]
    return {
        "setting": asdict(setting),
        "world_size": setting.world_size,
        "lookup": ranks[0]["lookup"],
        "rounds": len(times["dense"]),
        "round_s": times,
        "step_s": {v: statistics.median(times[v]) for v in VARIANTS},
        "step_quartiles_s": {v: quartiles(times[v]) for v in VARIANTS},
        "step_best_s": {v: min(times[v]) for v in VARIANTS},
        "synchronous_s": median_cost["sync"],
        "exposed_s": median_cost["async"],
        "synchronous_best_s": best_cost["sync"],
        "exposed_best_s": best_cost["async"],
        "exposed_ratio": _paired_ratio(times),
        "exposed_ratio_by_segment": _segments(times),
        "exposed_ratio_best": _fraction(best_cost["async"], best_cost["sync"]),
        "comm_s": comm,
        "memory_comm_s": sync_comm,
        "comm_bytes_sent_per_step": statistics.fmean(r["bytes_sent"] for r in ranks),
        "memory_compute_s": synchronous - sync_comm,
        "comm_fraction": _fraction(sync_comm, synchronous),
        "expected_ratio_waiting_only": _fraction(synchronous - sync_comm, synchronous),
        "cpu_s": cpu,
        "memory_cpu_s": {v: cpu[v] - cpu["dense"] for v in ("sync", "async")},
        "losses_identical": all(r["losses"]["sync"] == r["losses"]["async"] for r in ranks),
    }


def format_table(result: dict) -> str:
    ms = lambda seconds: f"{1000 * seconds:.1f}"  # noqa: E731
    header = ("variant", "median ms", "p25 ms", "p75 ms", "fastest ms", "CPU ms/rank", "comm fwd ms", "comm bwd ms")
    rows = []
    for v in VARIANTS:
        low, high = result["step_quartiles_s"][v]
        comm = result["comm_s"].get(v)
        comm_cells = (ms(comm["forward"]), ms(comm["backward"])) if comm else ("-", "-")
        rows.append((v, ms(result["step_s"][v]), ms(low), ms(high), ms(result["step_best_s"][v]),
                     ms(result["cpu_s"][v]), *comm_cells))
    lines = ["  ".join(f"{cell:>11}" for cell in row) for row in (header, *rows)]
    segments = ", ".join(f"{r:.2f}" for r in result["exposed_ratio_by_segment"]) or "-"
    cpu = result["memory_cpu_s"]
    lines += [
        f"memory layer, overlap off: {ms(result['synchronous_s'])} ms (median over rounds), "
        f"{ms(result['synchronous_best_s'])} ms (fastest rounds) = communication {ms(result['memory_comm_s'])} ms "
        f"({100 * result['comm_fraction']:.0f}%, {result['comm_bytes_sent_per_step'] / 2**10:.0f} KiB sent per rank) "
        f"+ the rest; CPU {ms(cpu['sync'])} ms per rank",
        f"memory layer, overlap on:  {ms(result['exposed_s'])} ms (median over rounds), "
        f"{ms(result['exposed_best_s'])} ms (fastest rounds) exposed; CPU {ms(cpu['async'])} ms per rank",
        f"exposed / synchronous: {result['exposed_ratio']:.2f} (per round; thirds of the run: {segments}), "
        f"{result['exposed_ratio_best']:.2f} (fastest rounds); target <= 0.30",
        f"expected on a saturated CPU (only the waiting in communication hidden): "
        f"{result['expected_ratio_waiting_only']:.2f}",
        f"losses identical (overlap off vs on): {result['losses_identical']}; lookup: {result['lookup']}; "
        f"{result['rounds']} rounds",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = parser.add_mutually_exclusive_group()
    presets.add_argument("--preset", choices=tuple(PRESETS),
                        help="cpu: the default on CPU (2 gloo processes); gpu: the default with CUDA (1 process); "
                             "quick: tiny model, 2 steps (smoke test)")
    presets.add_argument("--quick", action="store_true", help="same as --preset quick")
    parser.add_argument("--placement", help=f"memory placement a:b (default {Setting.placement})")
    parser.add_argument("--steps", type=int, help=f"timed steps per variant (default {Setting.steps})")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per rank and step (default: the preset's)")
    parser.add_argument("--world-size", type=int,
                        help="processes = DP = memory-parallel P, one GPU each under CUDA (default: the preset's; "
                             "2 or more GPUs measure the all-to-alls the side stream is meant to hide)")
    parser.add_argument("--lookup-impl", choices=("reference", "fused", "triton"))
    parser.add_argument("--sharding-mode", choices=("auto", "number", "dimension"))
    parser.add_argument("--added-latency-ms", type=float,
                        help="emulated network latency added to each all-to-all of the memory layer (default 0)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file for the results")
    return parser.parse_args(argv)


def setting_from_args(args: argparse.Namespace) -> Setting:
    preset = "quick" if args.quick else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    setting = PRESETS[preset]
    overrides = {"placement": args.placement, "steps": args.steps, "micro_batch_size": args.micro_batch_size,
                 "world_size": args.world_size, "lookup_impl": args.lookup_impl,
                 "sharding_mode": args.sharding_mode, "added_latency_ms": args.added_latency_ms}
    setting = replace(setting, **{k: v for k, v in overrides.items() if v is not None})
    if setting.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {setting.steps}")
    if setting.world_size < 1:
        raise SystemExit(f"--world-size must be >= 1, got {setting.world_size}")
    if setting.micro_batch_size < 1:
        raise SystemExit(f"--micro-batch-size must be >= 1, got {setting.micro_batch_size}")
    if setting.added_latency_ms < 0:
        raise SystemExit(f"--added-latency-ms must be >= 0, got {setting.added_latency_ms}")
    return setting


def backend_for(setting: Setting) -> str:
    """NCCL with one GPU per rank where there is CUDA (the trainer then puts the model on the GPU), else gloo."""
    if not torch.cuda.is_available():
        if setting.lookup_impl == "triton":
            raise SystemExit("the triton lookup-reduce (--preset gpu) needs CUDA; use --preset cpu")
        return "gloo"
    if setting.world_size > torch.cuda.device_count():
        raise SystemExit(f"--world-size {setting.world_size} needs {setting.world_size} GPUs (NCCL refuses two ranks "
                         f"on one GPU), this machine has {torch.cuda.device_count()}")
    return "nccl"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    setting = setting_from_args(args)
    for variant in VARIANTS:  # bad settings fail here, before any process starts
        config_from_dict(variant_config(setting, variant), world_size=setting.world_size)
    backend = backend_for(setting)
    started = time.perf_counter()
    result = summarize(run_local_group(_worker, setting.world_size, setting, backend=backend), setting)
    result.update(wall_s=time.perf_counter() - started)
    print(format_table(result))
    return write_result(Path(args.out), result, __file__, argv)


if __name__ == "__main__":
    main()
