"""benchmarks/memory_layer_profile.py on a tiny layer (CPU): its report holds the operators that the layer is made of,
ranked, with no host synchronisation on CPU."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.helpers import benchmark_module

TINY = ["--tokens", "64", "--seq-length", "32", "--hidden", "32", "--num-values", "1024", "--value-dim", "16",
        "--key-dim", "8", "--top-m", "4", "--repeats", "2", "--profile-steps", "1", "--lookup-impl", "reference"]


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("memory_layer_profile") as module:
        yield module


def test_profile_report(bench, tmp_path, capsys):
    out = tmp_path / "profile.json"
    result = bench.main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text())["tokens"] == 64
    names = [op["name"] for op in result["ops"]]
    assert "aten::topk" in names                       # the top-m selection
    assert any("scatter_add" in name or "index_add" in name for name in names)   # the table gradient
    # Each op's own time counted once: on one CPU thread the ops of a step cannot take longer than the same
    # profiled steps took by the wall clock (which also includes Python, autograd and profiler overhead).
    assert 0 < result["profiled_ms_per_step"] <= result["profiled_wall_ms_per_step"]
    assert result["forward_ms"] > 0 and result["forward_backward_ms"] > 0     # not compared: timings, on shared cores
    assert result["host_syncs"] == [] and result["host_sync_operators"] == []
    assert result["lookup"] == "lookup_reduce_reference"
    # The same work by operator and input shapes: the sub-key scores' GEMM, [2 heads, 64 tokens, d_k 8] queries
    # against 2 ranks x 64 keys per side (sqrt(E x N) = sqrt(4 x 1024)).
    shapes = {(op["name"], op["input_shapes"]) for op in result["ops_by_shape"]}
    assert ("aten::bmm", "[[2, 64, 8], [2, 8, 128]]") in shapes
    assert sum(op["self_ms_per_step"] for op in result["ops_by_shape"]) == pytest.approx(
        result["profiled_ms_per_step"], rel=0.05)
    printed = capsys.readouterr().out
    assert "host-blocking runtime calls per step: none" in printed
    assert "synchronise on CUDA, per step: none" in printed


def test_tokens_must_fill_whole_sequences(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--tokens", "100", "--seq-length", "32"])
