"""What the number-wise lookup's host synchronisation costs: forward+backward of one micro-batch of an UltraMem model
in one process (world size 1: gloo on CPU, NCCL on a GPU), with each memory layer's lookup swapped between four
variants. Results and their reading: docs/benchmarks/memory_host_sync.md.

    python benchmarks/memory_host_sync.py [--config configs/paper/ultramem-151m-x12.yaml] [--preset default|quick]
                                          [--warmup 5] [--rounds 20] [--out docs/benchmarks/memory_host_sync.json]
                                          [key.path=value ...]

Variants (same weights, same batch, same dropout masks; swapped into every memory layer's `lookup` between steps):

    local            the lookup the plan builds at P = 1 (`LocalLookup`: the lookup-reduce on the whole table)
    local_sync       local, preceded by a device-to-host read of `rows.amax()`: a bare sync at that point
    number           `NumberWiseLookup` over the 1-rank group, exact sizes: per-owner counts read with `.tolist()`
                     (the sync under study), then its all-to-alls, which at P = 1 are local copies
    number_capacity  `NumberWiseLookup` with the capacity `sharding_capacity_factor: 1.0` gives (T*K ids, so no
                     padding at P = 1): the same gather and copies, no sync

    cost per memory layer = median over rounds of (t_variant - t_local) / memory layers
    sync of the real path = median over rounds of (t_number - t_number_capacity) / memory layers

A sync costs the host's lost run-ahead: while the host waits for the GPU to finish the layer's indices, it cannot
queue the kernels that follow, so the GPU idles for their launch latency until the queue fills again. That needs
one GPU, not several: at P > 1 the same sync waits the same way, plus one count all-to-all of 8*(P-1) bytes.
On CPU there is no asynchronous device for the host to run ahead of: the numbers there test the method only.

Each step is timed between two `torch.cuda.synchronize()` (memory_overlap.timed_step), variants taking turns in
rotating order. On CUDA one more step per variant runs under torch.profiler, counting the host-blocking runtime
calls (memory_layer_profile.SYNC_CALLS) inside it; every step ends with one: the loss read after the backward is
queued (memory_overlap.forward_backward), so `local` shows 1 and a variant's syncs per memory layer are counted
relative to it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from memory_layer_profile import SYNC_CALLS
from common import quartiles, write_result
from memory_overlap import forward_backward, timed_step
from umtrain.config import Config, ConfigError, load_config
from umtrain.parallel.cost_model import fixed_capacity
from umtrain.parallel.memory_sharding import LocalLookup, ShardedLookup, make_sharded_lookup

VARIANTS = ("local", "local_sync", "number", "number_capacity")
DEFAULT_CONFIG = "configs/paper/ultramem-151m-x12.yaml"
DEFAULT_OUT = "docs/benchmarks/memory_host_sync.json"
STEP_RANGE = "memory_host_sync.step"
"""The profiler range around one forward+backward (syncs outside it, e.g. the profiler's own, are not counted)."""

BENCH_OVERRIDES = ("training.micro_batch_size=4", "training.global_batch_size=4", "training.train_iters=1",
                   "training.eval_iters=1", "logging.progress_bar=false", "logging.memory_stats=false",
                   "checkpoint.save=null", "checkpoint.load=null")
"""One micro-batch of 4 sequences per step; small datasets; nothing read from or written to checkpoints."""
QUICK_OVERRIDES = ("model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=256",
                   "model.num_attention_heads=4", "model.vocab_size=256", "data.mock_vocab_size=256",
                   "data.seq_length=32", "training.micro_batch_size=2", "training.global_batch_size=2",
                   "model.memory.placements=['1:2','3:4']", "model.memory.num_values=1024",
                   "model.memory.value_dim=32", "model.memory.key_dim=16", "model.memory.topk=4")
PRESETS = {"default": BENCH_OVERRIDES, "quick": BENCH_OVERRIDES + QUICK_OVERRIDES}
CPU_NOTE = ("CPU run: there is no asynchronous device for the host to run ahead of, so a sync costs next to nothing "
            "here; these numbers test the method only. The cost of a host sync is measured on a GPU.")


# ----------------------------------------------------------------------------------------- configuration

def load_bench_config(path: str, preset: str, overrides: Sequence[str]) -> Config:
    """The model config with the preset's overrides, then the user's; raises ConfigError before anything starts."""
    config = load_config(path, [*PRESETS[preset], *overrides], world_size=1)
    if config.model.memory is None or config.model.family not in ("pkm", "ultramem"):
        raise ConfigError("model.family", f"'{config.model.family}' has no memory layers to benchmark")
    return config


def capacity_at_factor_one(config: Config) -> int:
    """Ids per owner that `model.memory.sharding_capacity_factor: 1.0` gives at P = 1: T*K, no padding."""
    memory = replace(config.model.memory, sharding_capacity_factor=1.0)
    return fixed_capacity(replace(config, model=replace(config.model, memory=memory)), group_size=1)


def model_summary(config: Config) -> dict:
    m, memory, t = config.model, config.model.memory, config.training
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size, "seq_length": config.data.seq_length,
            "micro_batch_size": t.micro_batch_size, "precision": t.precision, "placements": memory.placements,
            "num_values": memory.num_values, "value_dim": memory.value_dim, "num_heads": memory.num_heads,
            "topk": memory.topk, "lookup_impl": memory.lookup_impl}


# ----------------------------------------------------------------------------------------- variants

class SyncedLookup:
    """A lookup preceded by a device-to-host read of a value computed from `rows` (a host sync at that point)."""

    def __init__(self, lookup: ShardedLookup):
        self.lookup = lookup

    def __call__(self, rows: torch.Tensor, blocks: torch.Tensor, scores: torch.Tensor, table: torch.Tensor,
                 num_blocks: int) -> torch.Tensor:
        rows.amax().item()
        return self.lookup(rows, blocks, scores, table, num_blocks)


def variant_lookups(memory: torch.nn.Module, capacity: int) -> dict:
    """The four lookups of one memory layer (module docstring), all for its existing table parameter."""
    local = memory.lookup
    if not isinstance(local, LocalLookup):
        raise TypeError(f"memory layer {memory.layer_index} has a {type(local).__name__}; at P = 1 the plan builds "
                        f"a LocalLookup")
    group, (rows, cols) = local.comm.group, (local.num_rows, local.value_dim)
    lookups = {"local": local, "local_sync": SyncedLookup(local),
               "number": make_sharded_lookup("number", group, rows, cols, local.local_impl),
               "number_capacity": make_sharded_lookup("number", group, rows, cols, local.local_impl,
                                                      capacity=capacity)}
    for name in ("number", "number_capacity"):
        if lookups[name].local_table_shape() != tuple(memory.values.shape):
            raise ValueError(f"{name}: shard {lookups[name].local_table_shape()} differs from memory layer "
                             f"{memory.layer_index}'s table {tuple(memory.values.shape)}")
    return lookups


class HostSyncBench:
    """One Trainer (one process, a 1-rank process group), one fixed micro-batch, and the variants' lookups for each
    memory layer. Close it to destroy the process group and Megatron's parallel state, unless they existed before."""

    def __init__(self, config: Config):
        from megatron.core import parallel_state

        from umtrain.train.runner import to_device
        from umtrain.train.trainer import Trainer

        if dist.is_initialized() and dist.get_world_size() != 1:
            raise RuntimeError(f"this benchmark runs in one process; the process group has {dist.get_world_size()}")
        self.owns = {"process_group": not dist.is_initialized(),
                     "parallel_state": not parallel_state.model_parallel_is_initialized()}
        try:
            self.trainer = Trainer(config)
            self.model = self.trainer.model[0]
            self.memories = self.trainer.memory_layers
            self.batch = to_device(next(self.trainer.train_batches.iterators(0, 1)[0]))
            self.capacity = capacity_at_factor_one(config)
            self.lookups = [variant_lookups(memory, self.capacity) for memory in self.memories]
        except BaseException:
            self.close()
            raise

    def use(self, variant: str) -> None:
        """Swap the variant's lookups in and reseed, so that every step draws the same dropout masks."""
        from umtrain.parallel.state import seed_everything

        for memory, lookups in zip(self.memories, self.lookups):
            memory.lookup = lookups[variant]
        seed_everything(self.trainer.config.training.seed)

    def timed_step(self, variant: str) -> tuple[float, float, float]:
        """(wall seconds, host CPU seconds, loss) of one forward+backward."""
        self.use(variant)
        return timed_step(self.model, self.batch)

    def host_syncs(self, variant: str) -> dict[str, dict[str, int]]:
        """Host-blocking runtime calls of one profiled forward+backward: inside the step, and in the whole profile."""
        self.use(variant)
        cuda = torch.cuda.is_available()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            with record_function(STEP_RANGE):
                forward_backward(self.model, self.batch)
            if cuda:
                torch.cuda.synchronize()
        return {"in_step": syncs_inside(prof.events(), STEP_RANGE), "in_profile": syncs_inside(prof.events())}

    def check_overflow(self) -> None:
        """The trainer's check (`check_table_overflow`) on the fixed-capacity variant's lookups."""
        from umtrain.parallel.memory_tables import check_table_overflow

        check_table_overflow([SimpleNamespace(lookup=lookups["number_capacity"]) for lookups in self.lookups])

    def close(self) -> None:
        from megatron.core import parallel_state

        self.trainer.preemption.restore()
        if self.owns["parallel_state"]:
            parallel_state.destroy_model_parallel()
        if self.owns["process_group"] and dist.is_initialized():
            dist.destroy_process_group()


def syncs_inside(events, range_name: Optional[str] = None) -> dict[str, int]:
    """Calls of each SYNC_CALLS runtime function within the CPU range `range_name` (None: anywhere)."""
    start, end = -math.inf, math.inf
    if range_name is not None:
        ranges = [e.time_range for e in events if e.name == range_name and e.device_type == DeviceType.CPU]
        if not ranges:
            raise ValueError(f"the profile holds no CPU range {range_name!r}")
        start, end = min(r.start for r in ranges), max(r.end for r in ranges)
    return dict(Counter(e.name for e in events if e.name.startswith(SYNC_CALLS)
                        and start <= e.time_range.start <= e.time_range.end <= end))


# ----------------------------------------------------------------------------------------- measurement

def time_rounds(bench: HostSyncBench, warmup: int, rounds: int) -> dict:
    """Warm-up rounds, then `rounds` rounds of one step per variant (order rotating per round)."""
    runs = {key: {v: [] for v in VARIANTS} for key in ("times", "cpu_times", "losses")}
    for round_index in range(warmup + rounds):
        for i in range(len(VARIANTS)):
            variant = VARIANTS[(round_index + i) % len(VARIANTS)]
            seconds, cpu, loss = bench.timed_step(variant)
            if round_index >= warmup:
                for key, value in zip(("times", "cpu_times", "losses"), (seconds, cpu, loss)):
                    runs[key][variant].append(value)
    bench.check_overflow()
    return runs


def per_layer_costs(times: dict[str, list[float]], variant: str, baseline: str, layers: int) -> list[float]:
    """Per round: (t_variant - t_baseline) / memory layers."""
    return [(t - base) / layers for t, base in zip(times[variant], times[baseline])]


def summarize(runs: dict, syncs: Optional[dict], layers: int) -> dict:
    """Per variant: step time (median, quartiles, fastest), host CPU time, loss, and the cost per memory layer
    relative to `local` (median and quartiles of the per-round differences, and as a fraction of local's step)."""
    times, losses = runs["times"], runs["losses"]
    local_step = statistics.median(times["local"])
    variants = {}
    for v in VARIANTS:
        costs = per_layer_costs(times, v, "local", layers)
        variants[v] = {
            "step_s": statistics.median(times[v]), "step_quartiles_s": quartiles(times[v]),
            "step_best_s": min(times[v]), "cpu_s": statistics.median(runs["cpu_times"][v]),
            "loss": losses[v][0],
            "max_loss_diff_vs_local": max(abs(a - b) for a, b in zip(losses[v], losses["local"])),
            "cost_per_layer_s": statistics.median(costs), "cost_per_layer_quartiles_s": quartiles(costs),
            "cost_per_layer_fraction_of_step": statistics.median(costs) / local_step,
        }
        if syncs is not None:
            in_step = sum(syncs[v]["in_step"].values())
            variants[v].update(host_syncs=syncs[v],
                               syncs_per_layer=(in_step - sum(syncs["local"]["in_step"].values())) / layers)
    number_sync = per_layer_costs(times, "number", "number_capacity", layers)
    return {
        "memory_layers": layers,
        "rounds": len(times["local"]),
        "variants": variants,
        "number_sync_per_layer_s": statistics.median(number_sync),
        "number_sync_per_layer_quartiles_s": quartiles(number_sync),
        "number_sync_fraction_of_step": statistics.median(number_sync) / local_step,
        "max_loss_diff_vs_local": max(variants[v]["max_loss_diff_vs_local"] for v in VARIANTS),
        "round_s": times,
    }


def measure(config: Config, warmup: int, rounds: int, count_syncs: bool) -> dict:
    """Build the bench, time the rounds, profile one step per variant (when `count_syncs`), close. A failed
    profile leaves `host_syncs_error` set (and main's exit status 1) rather than losing the timings."""
    bench = HostSyncBench(config)
    try:
        runs = time_rounds(bench, warmup, rounds)
        syncs, sync_error = None, None
        if count_syncs:
            try:
                syncs = {v: bench.host_syncs(v) for v in VARIANTS}
            except Exception as err:  # the timings stand without the counts (a GPU lease is short): report, fail
                sync_error = f"{type(err).__name__}: {err}"
        result = summarize(runs, syncs, len(bench.memories))
        result.update(host_syncs_error=sync_error, capacity=bench.capacity, tokens=bench.batch["tokens"].numel(),
                      table_dtype=str(bench.memories[0].values.dtype).removeprefix("torch."),
                      lookup_impl=getattr(bench.lookups[0]["local"].local_impl, "__name__", "?"))
        return result
    finally:
        bench.close()


# ----------------------------------------------------------------------------------------- report

def format_table(result: dict) -> str:
    ms = lambda seconds: f"{1000 * seconds:.3f}"  # noqa: E731
    header = ("variant", "median ms", "p25 ms", "p75 ms", "fastest ms", "host CPU ms", "ms/layer", "% of step",
              "syncs/step", "syncs/layer")
    rows = []
    for v in VARIANTS:
        s = result["variants"][v]
        low, high = s["step_quartiles_s"]
        syncs = s.get("host_syncs")
        sync_cells = ((str(sum(syncs["in_step"].values())), f"{s['syncs_per_layer']:g}") if syncs is not None
                      else ("-", "-"))
        rows.append((v, ms(s["step_s"]), ms(low), ms(high), ms(s["step_best_s"]), ms(s["cpu_s"]),
                     ms(s["cost_per_layer_s"]), f"{100 * s['cost_per_layer_fraction_of_step']:.2f}", *sync_cells))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths)) for row in (header, *rows)]
    low, high = result["number_sync_per_layer_quartiles_s"]
    lines += [
        f"{result['device']}, {result['table_dtype']}, {result['tokens']} tokens per micro-batch, "
        f"{result['memory_layers']} memory layers, lookup-reduce {result['lookup_impl']}, capacity "
        f"{result['capacity']} ids, {result['rounds']} rounds",
        f"the exact number-wise path's sync (number - number_capacity): {ms(result['number_sync_per_layer_s'])} ms "
        f"per memory layer (quartiles {ms(low)} .. {ms(high)}), "
        f"{100 * result['number_sync_fraction_of_step']:.2f}% of the local step",
        f"max |loss - loss(local)| over variants and rounds: {result['max_loss_diff_vs_local']:.3g}",
    ]
    if result["device"] == "cpu":
        lines.append(CPU_NOTE)
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="default: one micro-batch of 4 sequences; quick: a tiny model (tests)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, one step per variant each (default 20)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON file for the results")
    parser.add_argument("overrides", nargs="*", help="key.path=value config overrides, applied after the preset's")
    args = parser.parse_intermixed_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    config = load_bench_config(args.config, args.preset, args.overrides)
    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    result = measure(config, args.warmup, args.rounds, count_syncs=cuda)
    result.update(
        device="cuda" if cuda else "cpu", note=None if cuda else CPU_NOTE,
        settings={"config": args.config, "preset": args.preset, "overrides": [*PRESETS[args.preset], *args.overrides],
                  "warmup": args.warmup, "rounds": args.rounds, "model": model_summary(config)},
        wall_s=time.perf_counter() - started)
    print(format_table(result))
    record = write_result(Path(args.out), result, __file__, argv)
    if result["host_syncs_error"]:
        raise SystemExit(f"memory_host_sync: counting host syncs failed ({result['host_syncs_error']}); "
                         f"the timings are in {args.out}")
    return record


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        sys.exit(f"memory_host_sync: configuration error: {err}")
