"""benchmarks/memory_host_sync.py on the quick preset, in this process (world size 1, gloo): the four lookup variants
compute what the model's own lookup computes, the summary's arithmetic matches hand-computed values, the JSON holds
the documented fields, and bad input fails before any process group starts. Sync counts need CUDA: not asserted."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.benchmarks.helpers import benchmark_module
from umtrain.config.base import ConfigError


@pytest.fixture(scope="module", autouse=True)
def restored_environment():
    """The trainer's 1-process group sets MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE: later tests must not see
    them."""
    with mock.patch.dict(os.environ):
        yield


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("memory_host_sync") as module:
        yield module


@pytest.fixture(scope="module")
def variant_runs(bench):
    """One forward+backward per variant (loss, memory parameters' gradients, the number-wise lookups' all-to-all
    calls in it, and one profiled step's syncs), then the process group is destroyed."""
    config = bench.load_bench_config(bench.DEFAULT_CONFIG, "quick", [])
    host = bench.HostSyncBench(config)
    try:
        runs = {}
        for variant in bench.VARIANTS:
            host.use(variant)
            loss = bench.forward_backward(host.model, host.batch)
            grads = {(i, name): param.main_grad.detach().clone()
                     for i, memory in enumerate(host.memories) for name, param in memory.named_parameters()}
            calls = [dict(lookups[variant].comm.calls) for lookups in host.lookups if variant.startswith("number")]
            runs[variant] = {"loss": loss, "grads": grads, "calls": calls, "syncs": host.host_syncs(variant),
                             "lookup": type(host.memories[0].lookup).__name__}
        runs["layers"], runs["capacity"] = len(host.memories), host.capacity
        host.check_overflow()
        return runs
    finally:
        host.close()


def test_variants_give_the_local_loss_and_gradients(bench, variant_runs):
    local = variant_runs["local"]
    assert variant_runs["layers"] == 2
    for variant in bench.VARIANTS[1:]:
        run = variant_runs[variant]
        assert run["loss"] == pytest.approx(local["loss"], rel=1e-6, abs=0), variant
        assert run["grads"].keys() == local["grads"].keys()
        for key, grad in local["grads"].items():
            torch.testing.assert_close(run["grads"][key], grad, rtol=1e-5, atol=1e-8, msg=f"{variant}: {key}")


def test_each_variant_runs_its_own_path(bench, variant_runs):
    """The swap takes effect: the exact path exchanges counts, the fixed-capacity one does not."""
    assert [variant_runs[v]["lookup"] for v in bench.VARIANTS] == [
        "LocalLookup", "SyncedLookup", "NumberWiseLookup", "NumberWiseLookup"]
    assert len(variant_runs["number"]["calls"]) == len(variant_runs["number_capacity"]["calls"]) == 2
    for calls in variant_runs["number"]["calls"]:
        assert calls["number.meta"] == 1 and calls["number.indices"] == 1
    for calls in variant_runs["number_capacity"]["calls"]:
        assert "number.meta" not in calls and calls["number.indices"] == 1
    assert variant_runs["capacity"] == 2 * 32 * 2 * 4          # T*K: micro-batch 2 x sequence 32, 2 heads x top-4


def test_profiled_step_reports_sync_counts(bench, variant_runs):
    for variant in bench.VARIANTS:
        syncs = variant_runs[variant]["syncs"]
        assert set(syncs) == {"in_step", "in_profile"}
        assert all(isinstance(n, int) for counts in syncs.values() for n in counts.values())


def test_synced_lookup_reads_rows_on_the_host_then_looks_up(bench):
    seen = []
    synced = bench.SyncedLookup(lambda *args: seen.append(args) or "pooled")
    rows = torch.tensor([[3, 1]])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        assert synced(rows, rows, rows, rows, 4) == "pooled"
    assert [e.name for e in prof.events()].count("aten::item") == 1
    assert len(seen) == 1 and seen[0][-1] == 4


def event(name: str, start: float, end: float):
    return SimpleNamespace(name=name, device_type=torch.autograd.DeviceType.CPU,
                           time_range=SimpleNamespace(start=start, end=end))


def test_syncs_are_counted_inside_the_step_range_only(bench):
    events = [event("cudaStreamSynchronize", 0, 1), event(bench.STEP_RANGE, 2, 10),
              event("cudaStreamSynchronize", 3, 4), event("aten::item", 3, 4), event("cudaStreamSynchronize", 5, 6),
              event("cudaEventSynchronize", 9, 10), event("cudaDeviceSynchronize", 10, 12)]
    assert bench.syncs_inside(events, bench.STEP_RANGE) == {"cudaStreamSynchronize": 2, "cudaEventSynchronize": 1}
    assert bench.syncs_inside(events) == {"cudaStreamSynchronize": 3, "cudaEventSynchronize": 1,
                                          "cudaDeviceSynchronize": 1}


def test_summary_arithmetic(bench):
    """Two rounds, 2 memory layers; local 1.0 s, local_sync 1.1 s, number 1.5 s, number_capacity 1.2 s (round 2
    twice as slow): costs per layer are per-round differences / 2, fractions relative to local's median 1.5 s."""
    times = {"local": [1.0, 2.0], "local_sync": [1.1, 2.2], "number": [1.5, 3.0], "number_capacity": [1.2, 2.4]}
    runs = {"times": times, "cpu_times": {v: [0.5, 0.5] for v in times},
            "losses": {"local": [3.0, 3.0], "local_sync": [3.0, 3.0], "number": [3.0, 3.0001],
                       "number_capacity": [3.0, 3.0]}}
    syncs = {v: {"in_step": {"cudaStreamSynchronize": n}, "in_profile": {}} for v, n in
             (("local", 1), ("local_sync", 3), ("number", 7), ("number_capacity", 1))}
    result = bench.summarize(runs, syncs, layers=2)
    number = result["variants"]["number"]
    assert number["step_s"] == pytest.approx(2.25)
    assert number["cost_per_layer_s"] == pytest.approx((0.25 + 0.5) / 2)
    assert number["cost_per_layer_fraction_of_step"] == pytest.approx(0.375 / 1.5)
    assert number["syncs_per_layer"] == 3 and result["variants"]["local_sync"]["syncs_per_layer"] == 1
    assert result["variants"]["number_capacity"]["syncs_per_layer"] == 0
    assert result["number_sync_per_layer_s"] == pytest.approx((0.15 + 0.3) / 2)
    assert result["number_sync_fraction_of_step"] == pytest.approx(0.225 / 1.5)
    assert result["max_loss_diff_vs_local"] == pytest.approx(1e-4)
    assert result["variants"]["local"]["cost_per_layer_s"] == 0


def test_quick_run_writes_the_documented_fields(bench, tmp_path):
    out = tmp_path / "host_sync.json"
    group_before = dist.is_initialized()
    returned = bench.main(["--preset", "quick", "--warmup", "0", "--rounds", "2", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["number_sync_per_layer_s"] == pytest.approx(returned["number_sync_per_layer_s"])
    assert dist.is_initialized() == group_before          # a group the bench made is gone, one it found is kept
    for key in ("date_utc", "command", "machine", "device", "settings", "variants", "memory_layers", "rounds",
                "capacity", "tokens", "table_dtype", "lookup_impl", "number_sync_per_layer_s",
                "number_sync_per_layer_quartiles_s", "number_sync_fraction_of_step", "max_loss_diff_vs_local",
                "round_s", "wall_s", "note", "host_syncs_error"):
        assert key in written, key
    assert written["settings"]["rounds"] == 2 and written["settings"]["preset"] == "quick"
    assert written["settings"]["model"]["placements"] == ["1:2", "3:4"] and written["host_syncs_error"] is None
    assert written["rounds"] == 2 and written["memory_layers"] == 2 and written["tokens"] == 64
    assert set(written["variants"]) == set(bench.VARIANTS)
    for stats in written["variants"].values():
        assert stats["step_s"] > 0 and len(stats["step_quartiles_s"]) == 2
        for key in ("step_best_s", "cpu_s", "loss", "max_loss_diff_vs_local", "cost_per_layer_s",
                    "cost_per_layer_quartiles_s", "cost_per_layer_fraction_of_step"):
            assert key in stats, key
    assert written["max_loss_diff_vs_local"] < 1e-5
    if not torch.cuda.is_available():
        assert written["device"] == "cpu" and "no asynchronous device" in written["note"]


@pytest.mark.parametrize("args,match", [
    (["--config", "configs/paper/no-such-model.yaml"], "no-such-model.yaml.*config file not found"),
    (["--preset", "quick", "model.memory.topk=many"], "model.memory.topk"),
    (["--preset", "quick", "model.memroy.topk=4"], "memroy"),
    (["--config", "configs/paper/dense-151m.yaml"], "model.family"),
])
def test_bad_config_fails_before_any_process_group_starts(bench, tmp_path, monkeypatch, args, match):
    out = tmp_path / "x.json"
    group_before = dist.is_initialized()
    monkeypatch.setattr(bench, "HostSyncBench", lambda config: pytest.fail("the bench was built"))
    with pytest.raises(ConfigError, match=match):
        bench.main([*args, "--out", str(out)])
    assert dist.is_initialized() == group_before and not out.exists()


def test_bad_round_counts_are_rejected(bench, tmp_path, monkeypatch):
    group_before = dist.is_initialized()
    monkeypatch.setattr(bench, "HostSyncBench", lambda config: pytest.fail("the bench was built"))
    with pytest.raises(SystemExit):
        bench.main(["--preset", "quick", "--rounds", "0", "--out", str(tmp_path / "x.json")])
    assert dist.is_initialized() == group_before
