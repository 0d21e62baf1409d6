"""Smoke test of benchmarks/memory_layer.py on one tiny point, plus hand-checked pieces of what it measures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_layer.py"
TINY = ["--points", "32x256x4", "--hidden", "32", "--value-dim", "16", "--key-dim", "8", "--conv-kernel", "3",
        "--warmup", "0", "--repeats", "2"]
CASES = ("ultramem_reference", "ultramem_fused", "dense_mlp")


@pytest.fixture(scope="module")
def bench():
    """The script as a module, with benchmarks/ on sys.path for its sibling imports; small pages so that importing
    it leaves the allocator setting of the session alone."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THP_MEM_ALLOC_ENABLE", "0")
        patch.syspath_prepend(str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("memory_layer_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, spec.name, module)   # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "memory_layer.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("THP_MEM_ALLOC_ENABLE", "0")
        summary = bench.main([*TINY, "--out", str(out)])
    return summary, json.loads(out.read_text())


def test_json_has_every_case_with_positive_numbers(run):
    summary, written = run
    assert written == json.loads(json.dumps(summary))
    assert written["fused_error"] is None
    expected = {"command", "date_utc", "machine", "layer", "timing", "memory_methods", "points", "top_m_growth"}
    assert expected <= set(written)
    (point,) = written["points"]
    assert (point["tokens"], point["num_values"], point["top_m"], point["k"]) == (32, 256, 4, 8)
    assert set(point["results"]) == set(CASES)
    for case, result in point["results"].items():
        for key in ("forward_ms", "forward_backward_ms", "forward_backward_min_ms", "saved_activation_mib",
                    "peak_rss_mib"):
            assert result[key] > 0, (case, key)
        assert len(result["samples"]["forward_backward_ms"]) == 2
    for key in ("ultramem_reference/dense_mlp.forward_backward_ms", "ultramem_fused/dense_mlp.peak_rss_mib",
                "ultramem_reference/ultramem_fused.saved_activation_mib"):
        assert point["ratios"][key] > 0


def test_reference_saves_the_gathered_values_and_fused_does_not(run):
    """The reference keeps [T, K, d_v] float32 gathered rows for backward; the fused lookup keeps none."""
    (point,) = run[1]["points"]
    gathered_mib = 32 * point["k"] * 16 * 4 / 2 ** 20
    saved = {case: point["results"][case]["saved_activation_mib"] for case in CASES}
    assert saved["ultramem_reference"] - saved["ultramem_fused"] >= gathered_mib


def test_dense_mlp_matches_the_layer_flops(run):
    (point,) = run[1]["points"]
    assert abs(point["dense_flops_per_token"] - point["memory_flops_per_token"]) <= 2 * 32   # F rounded: <= 4D/2


def test_saved_activation_bytes_of_an_mlp_by_hand(bench):
    """Linear -> GELU -> Linear saves GELU's input and the second Linear's input: 2 x [T, F] (x itself excluded)."""
    tokens, hidden, ffn = 5, 4, 12
    mlp = nn.Sequential(nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False))
    x = torch.randn(tokens, hidden, requires_grad=True)
    assert bench.saved_activation_bytes(mlp, x) == 2 * tokens * ffn * 4


def test_top_m_growth_pairs_points_that_differ_only_in_top_m(bench):
    def point(tokens, top_m, saved_mib, peak_mib):
        result = {"saved_activation_mib": saved_mib, "peak_rss_mib": peak_mib}
        return {"tokens": tokens, "num_values": 256, "top_m": top_m, "k": 2 * top_m,
                "results": {"ultramem_fused": result, "dense_mlp": result}}

    growth = bench.top_m_growth([point(64, 4, 1.0, 3.0), point(64, 8, 2.0, 7.0), point(32, 8, 9.0, 9.0)], 64)
    (only,) = growth
    added = 64 * (16 - 8)
    assert only["case"] == "ultramem_fused" and only["top_m"] == [4, 8]
    assert only["saved_bytes_per_added_value"] == pytest.approx(2 ** 20 / added)
    assert only["peak_rss_in_value_rows"] == pytest.approx(4 * 2 ** 20 / added / 64)


@pytest.mark.parametrize("points, field", [("32x255x4", "num_values"), ("32x256", "TOKENSxNxTOP_M"),
                                           ("32x256x0", "TOKENSxNxTOP_M")])
def test_bad_points_are_refused_before_any_work(bench, points, field, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--points", points])
    assert field in capsys.readouterr().err
