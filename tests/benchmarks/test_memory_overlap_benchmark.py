"""Smoke test of benchmarks/memory_overlap.py on a tiny model (2 gloo processes), and its arithmetic and
communication timer checked against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch

from tests.benchmarks.helpers import benchmark_module
from umtrain.config.base import ConfigError



@pytest.fixture(scope="module")
def bench():
    with benchmark_module("memory_overlap") as module:
        yield module


def rank_result(comm_forward: float, loss: float) -> dict:
    """Six rounds: dense 1.0 s, sync 1.4 s, async 1.1 s; CPU 0.5 / 0.7 / 0.72 s."""
    rounds = 6
    return {
        "times": {"dense": [1.0] * rounds, "sync": [1.4] * rounds, "async": [1.1] * rounds},
        "cpu_times": {"dense": [0.5] * rounds, "sync": [0.7] * rounds, "async": [0.72] * rounds},
        "losses": {"dense": [2.0] * rounds, "sync": [loss] * rounds, "async": [3.0] * rounds},
        "comm": {v: {"forward": [comm_forward] * rounds, "backward": [0.05] * rounds} for v in ("sync", "async")},
        "lookup": "DimensionWiseLookup",
        "bytes_sent": 1000,
    }


def test_summary_arithmetic(bench):
    result = bench.summarize([rank_result(0.1, 3.0), rank_result(0.3, 3.0)], bench.QUICK)
    assert result["synchronous_s"] == pytest.approx(0.4)
    assert result["exposed_s"] == pytest.approx(0.1)
    assert result["exposed_ratio"] == pytest.approx(0.25)
    assert result["exposed_ratio_by_segment"] == pytest.approx([0.25] * 3)
    assert result["exposed_ratio_best"] == pytest.approx(0.25)
    assert result["comm_s"]["sync"] == pytest.approx({"forward": 0.2, "backward": 0.05})   # mean of the ranks
    assert result["memory_comm_s"] == pytest.approx(0.25)
    assert result["memory_compute_s"] == pytest.approx(0.15)
    assert result["comm_fraction"] == pytest.approx(0.625)
    assert result["expected_ratio_waiting_only"] == pytest.approx(0.375)     # (0.4 - 0.2 - 0.05) / 0.4
    assert result["memory_cpu_s"] == pytest.approx({"sync": 0.2, "async": 0.22})
    assert result["comm_bytes_sent_per_step"] == 1000
    assert result["losses_identical"]
    assert not bench.summarize([rank_result(0.1, 3.0), rank_result(0.1, 3.5)], bench.QUICK)["losses_identical"]


def test_ratio_pairs_each_round_with_its_dense_step(bench):
    """Load that doubles whole rounds cancels; load that hits one step of a round is an outlier of the median."""
    result = rank_result(0.1, 3.0)
    result["times"] = {"dense": [1.0, 2.0, 1.0, 2.0, 1.0, 2.0], "sync": [1.4, 2.8, 1.4, 2.8, 1.4, 2.8],
                       "async": [1.1, 2.2, 1.1, 2.2, 3.0, 2.2]}
    summary = bench.summarize([result], bench.QUICK)
    assert summary["exposed_ratio"] == pytest.approx(0.25)                     # median 0.1 / median 0.4 (relative)
    assert summary["exposed_ratio_by_segment"] == pytest.approx([0.25, 0.25, 2.625])   # last: mean(2.0, 0.1) / 0.4
    assert summary["synchronous_s"] == pytest.approx(0.6)                      # median of 0.4, 0.8, ...
    assert summary["synchronous_best_s"] == pytest.approx(0.4)                 # 1.4 - 1.0
    assert summary["exposed_best_s"] == pytest.approx(0.1)


def test_timed_communicator_splits_forward_and_backward(bench):
    comm = bench.TimedCommunicator(None, added_latency_s=0.01)
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(comm.all_to_all(x, [3], [3], "dimension.indices"), x)
    assert comm.seconds["forward"] >= 0.01 and comm.seconds["backward"] == 0.0
    comm.all_to_all(x, [3], [3], "dimension.outputs.grad")
    assert comm.seconds["backward"] >= 0.01
    assert comm.calls == {"dimension.indices": 1, "dimension.outputs.grad": 1}
    comm.reset_counters()
    assert comm.seconds == {"forward": 0.0, "backward": 0.0} and not comm.calls


def test_bad_settings_fail_before_any_process_starts(bench, tmp_path):
    with pytest.raises(ConfigError, match="placements"):
        bench.main(["--quick", "--placement", "1:9", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--steps"):
        bench.main(["--quick", "--steps", "0", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="--world-size must be >= 1"):
        bench.main(["--quick", "--world-size", "0", "--out", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_presets_that_cannot_run_here_fail_before_any_process_starts(bench, tmp_path):
    out = tmp_path / "x.json"
    if torch.cuda.is_available():
        world = torch.cuda.device_count() + 1
        with pytest.raises(SystemExit, match=f"--world-size {world} needs {world} GPUs"):
            bench.main(["--preset", "gpu", "--world-size", str(world), "--out", str(out)])
    else:
        with pytest.raises(SystemExit, match="needs CUDA"):
            bench.main(["--preset", "gpu", "--out", str(out)])
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_quick_run_writes_the_documented_fields(bench, tmp_path):
    out = tmp_path / "overlap.json"
    returned = bench.main(["--quick", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["exposed_ratio"] == pytest.approx(returned["exposed_ratio"], nan_ok=True)
    assert written["losses_identical"] is True          # overlap on/off: bit-identical forward+backward
    assert written["rounds"] == bench.QUICK.steps
    assert written["setting"]["placement"] == "1:4" and written["world_size"] == 2
    assert written["lookup"] in ("NumberWiseLookup", "DimensionWiseLookup")
    assert all(written["step_s"][v] > 0 and written["cpu_s"][v] > 0 for v in bench.VARIANTS)
    for key in ("synchronous_s", "exposed_s", "memory_comm_s", "memory_compute_s", "comm_fraction",
                "expected_ratio_waiting_only", "memory_cpu_s", "exposed_ratio_by_segment", "exposed_ratio_best",
                "synchronous_best_s", "exposed_best_s", "step_best_s", "round_s", "date_utc", "machine", "command"):
        assert key in written
    assert written["comm_s"]["sync"]["forward"] > 0 and written["comm_s"]["sync"]["backward"] > 0
    assert written["comm_bytes_sent_per_step"] > 0
