"""Smoke test of benchmarks/decode.py on a narrow trunk and tiny tables."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "decode.py"


def load_benchmark():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))
        spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_decode_benchmark_times_every_model_and_batch(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "decode.json"
    bench.main(["--num-layers", "11", "--hidden-size", "32", "--value-fraction", "0.001", "--batch-sizes", "1,3",
                "--prompt-length", "5", "--steps", "2", "--repeats", "2", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = {(row["model"], row["batch"]): row for row in result["results"]}
    assert list(rows) == [(m, b) for b in (1, 3) for m in ("dense", "pkm", "ultramem")]
    for (model, batch), row in rows.items():
        assert len(row["ms_per_step_rounds"]) == 2
        assert row["tokens_per_s"] == pytest.approx(1000 * batch / row["ms_per_step"])
        assert row["vs_dense"] == (1.0 if model == "dense" else pytest.approx(row["vs_dense"]))
    side = round((1_210_000 * 0.001) ** 0.5)
    assert rows["ultramem", 1]["num_values"] == side * side and rows["dense", 1]["num_values"] == 0
    assert rows["ultramem", 1]["total_params"] > rows["dense", 1]["total_params"]
    assert result["command"].startswith("python benchmarks/decode.py")


def test_decode_benchmark_names_a_bad_argument():
    bench = load_benchmark()
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "dense,moe"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--value-fraction", "0"])



def test_decode_benchmark_refuses_a_repeated_batch_size(capsys):
    with pytest.raises(SystemExit):
        load_benchmark().parse_args(["--batch-sizes", "3,1,3"])
    assert "--batch-sizes: [3] given more than once" in capsys.readouterr().err
