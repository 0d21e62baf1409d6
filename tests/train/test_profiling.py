"""`logging.profile_dir`: torch.profiler over exactly the asked steps, a trace and a summary per rank."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import tiny_config, train_on_ranks
from umtrain.config import ConfigError, config_from_dict
from umtrain.config.schema import LoggingConfig
from umtrain.train.profiling import StepProfiler


def operator_shapes(trace_path, name: str) -> list:
    events = json.loads(trace_path.read_text())["traceEvents"]
    return [event["args"]["Input Dims"] for event in events if event.get("name") == name]


def test_records_exactly_the_window_and_writes_its_trace_and_summary(tmp_path, caplog):
    """Step s multiplies an [s, 8] matrix: the trace must hold the products of steps 2 and 3 only."""
    config = LoggingConfig(profile_dir=str(tmp_path / "profile"), profile_start=2, profile_steps=2)
    profiler = StepProfiler(config, rank=3, log_summary=True)
    with caplog.at_level("INFO", logger="umtrain"):
        for step in range(1, 6):
            profiler.before_step(step)
            torch.mm(torch.ones(step, 8), torch.ones(8, 8))
            profiler.after_step(step)
    trace = tmp_path / "profile" / "trace_rank3_steps2-3.json"
    assert [dims[0] for dims in operator_shapes(trace, "aten::mm")] == [[2, 8], [3, 8]]
    assert "aten::mm" in (tmp_path / "profile" / "summary_rank3_steps2-3.txt").read_text()
    assert "profile of steps 2-3 (rank 3" in caplog.text


def test_a_window_cut_short_is_written_when_stopped(tmp_path):
    profiler = StepProfiler(LoggingConfig(profile_dir=str(tmp_path), profile_start=1, profile_steps=5), rank=0,
                            log_summary=False)
    profiler.before_step(1)
    torch.mm(torch.ones(1, 8), torch.ones(8, 8))
    profiler.after_step(1)
    profiler.stop()
    assert operator_shapes(tmp_path / "trace_rank0_steps1-5.json", "aten::mm") == [[[1, 8], [8, 8]]]


def test_off_without_a_directory(tmp_path):
    profiler = StepProfiler(LoggingConfig(profile_start=1), rank=0, log_summary=True)
    profiler.before_step(1)
    assert profiler.profiler is None


@pytest.mark.parametrize("logging,message", [
    ({"profile_dir": "p", "profile_start": 6}, "logging.profile_start: step 6 is after the last step"),
    ({"profile_start": 0}, "logging.profile_start: must be >= 1"),
    ({"profile_steps": 0}, "logging.profile_steps: must be >= 1"),
])
def test_bad_windows_are_refused_at_load(logging, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(tiny_config(logging=logging), world_size=1)


@pytest.mark.slow
def test_training_writes_one_trace_per_rank_of_the_profiled_steps(tmp_path):
    """DP = 2, 8 samples per step in micro-batches of 2: 2 forward passes per rank and step, so 4 embedding lookups
    in a trace of steps 2-3."""
    config = tiny_config(logging={"profile_dir": str(tmp_path), "profile_start": 2, "profile_steps": 2},
                         training={"train_iters": 4})
    train_on_ranks(config, 2)
    for rank in (0, 1):
        assert len(operator_shapes(tmp_path / f"trace_rank{rank}_steps2-3.json", "aten::embedding")) == 4
        assert (tmp_path / f"summary_rank{rank}_steps2-3.txt").stat().st_size > 0
