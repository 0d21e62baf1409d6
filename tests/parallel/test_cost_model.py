"""The cost model against hand-computed volumes and work counts, the spec's crossover, the compute term's fit against
known coefficients, and the `plan` / `calibrate-comm` commands."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import pytest
import torch

from umtrain.cli import plan as plan_cli
from umtrain.config import ConfigError, load_config
from umtrain.parallel.cost_model import (Calibration, ComputeModel, ComputeObservation, LookupDims, balanced_requests,
                                         compute_work, crossover_value_dim, dimension_wise_traffic,
                                         dims_from_config, fit_compute,
                                         number_wise_traffic, owner_pooled_traffic, plan_config, plan_layer,
                                         tokens_per_rank, variant_traffic)

# UltraMem-1.6B's memory layer (configs/paper/ultramem-1.6b-x12.yaml): K = 42 x 2, E = 4, h = 2, d_v = 1024, bf16.
BIG = dict(value_dim=1024, topk=84, num_blocks=4, num_cores=2, value_bytes=2, score_bytes=2)
UNIT = Calibration(alpha_s=0.0, beta_s_per_byte=1.0)        # seconds == bytes


def big(group_size: int, **changes) -> LookupDims:
    return LookupDims(**{**BIG, "group_size": group_size, **changes})


def test_number_wise_volume_by_hand():
    dims = big(4)
    t = 100
    traffic = number_wise_traffic(dims, balanced_requests(dims, [t] * 4), rank=2)
    remote_ids = t * 84 * 3 / 4                              # 3 of 4 owners are remote
    assert traffic.sent["number.indices"] == 4 * remote_ids
    assert traffic.received["number.rows"] == 2 * 1024 * remote_ids
    assert traffic.sent["number.rows.grad"] == 2 * 1024 * remote_ids
    assert traffic.total_sent("forward") == 8 * 3 + 4 * remote_ids + 2 * 1024 * remote_ids
    assert traffic.total_sent("backward") == 2 * 1024 * remote_ids
    fixed = number_wise_traffic(dims, [[0] * 4] * 4, rank=2, capacity=2500)   # padded: bytes independent of requests
    assert fixed.sent["number.indices"] == fixed.received["number.indices"] == 4 * 2500 * 3
    assert fixed.sent["number.rows"] == 2 * 1024 * 2500 * 3 and "number.meta" not in fixed.calls


def test_dimension_wise_volume_by_hand():
    dims = big(4)
    traffic = dimension_wise_traffic(dims, [100, 0, 50, 10], rank=0, static_tokens=False)
    assert traffic.sent["dimension.indices"] == 4 * 84 * 100 * 3
    assert traffic.received["dimension.indices"] == 4 * 84 * 60
    assert traffic.sent["dimension.scores"] == 2 * 84 * 1 * 100 * 3       # P % h == 0: one core's scores
    assert traffic.sent["dimension.outputs"] == 2 * 4 * 256 * 60          # E x d_v/P per token of the others
    assert traffic.received["dimension.outputs"] == 2 * 4 * 256 * 100 * 3
    assert traffic.sent["dimension.outputs.grad"] == traffic.received["dimension.outputs"]
    assert traffic.calls["dimension.meta"] == 1
    assert "dimension.meta" not in dimension_wise_traffic(dims, [100] * 4, 0, static_tokens=True).calls


def test_owner_pooled_volume_by_hand():
    dims = big(2)
    requests = [[30, 70], [10, 0]]
    traffic = owner_pooled_traffic(dims, [1, 0], requests, rank=0)
    assert traffic.sent["pooled.indices"] == 2 * 4 * 70
    assert traffic.received["pooled.indices"] == 2 * 4 * 10
    assert traffic.sent["pooled.scores"] == 2 * 2 * 70
    assert traffic.sent["pooled.partials"] == 0                            # the other rank has no tokens
    assert traffic.received["pooled.partials"] == 4 * 1024 * 2 * 1


def test_crossover_matches_the_spec_and_equalises_the_volumes():
    assert crossover_value_dim(84, 4, 8) == pytest.approx(84 * 15 / 80)
    assert crossover_value_dim(84, 4, 8, backward=False) == pytest.approx(84 * 22 / 80)      # K (3P - 2) / (K - E)
    assert crossover_value_dim(84, 4, 488) <= 1024 < crossover_value_dim(84, 4, 489)   # "P <= 488" for 1.6B
    assert crossover_value_dim(4, 4, 8) == math.inf
    assert crossover_value_dim(8, 4, 2) == 6                               # 8 (2*2 - 1) / (8 - 4)
    for value_dim, sign in ((4, -1), (6, 0), (8, 1)):
        dims = LookupDims(value_dim=value_dim, topk=8, num_blocks=4, num_cores=1, group_size=2)
        number = number_wise_traffic(dims, balanced_requests(dims, [64] * 2), 0)
        dimension = dimension_wise_traffic(dims, [64] * 2, 0, static_tokens=True)
        difference = number.total_sent() - number.sent["number.meta"] - dimension.total_sent()
        assert (difference > 0) - (difference < 0) == sign, value_dim


def test_plan_prefers_dimension_for_wide_values_and_number_for_narrow_ones():
    assert plan_layer(big(8), 1024, UNIT).mode == "dimension"
    narrow = plan_layer(big(8, value_dim=8), 1024, UNIT)
    assert narrow.mode == "number" and "number-wise" in narrow.reason
    assert plan_layer(big(8), 1024, UNIT).bytes_dimension_wise < plan_layer(big(8), 1024, UNIT).bytes_number_wise


def test_plan_picks_owner_pooling_when_it_moves_fewer_bytes():
    # K/P = 84/2 ids per owner per token > E = 4 partial sums: pooling at the owner moves fewer bytes.
    pooled = plan_layer(big(2, value_dim=5), 64, UNIT)                    # d_v=5: no dimension-wise at P=2
    assert pooled.bytes_number_pooled < pooled.bytes_number_rows
    assert pooled.owner_pooling and pooled.bytes_number_wise == pooled.bytes_number_pooled
    rows = plan_layer(big(64, value_dim=5), 64, UNIT)
    assert not rows.owner_pooling and rows.bytes_number_wise == rows.bytes_number_rows


def test_plan_handles_infeasible_forced_and_single_rank_groups():
    infeasible = plan_layer(big(3), 1024, UNIT)
    assert infeasible.mode == "number" and "divisible by P=3" in infeasible.reason
    assert infeasible.bytes_dimension_wise is None
    with pytest.raises(ConfigError, match="sharding_mode"):
        plan_layer(big(3), 1024, UNIT, requested="dimension")
    assert plan_layer(big(8), 1024, UNIT, requested="number").mode == "number"
    local = plan_layer(big(1), 1024, UNIT)
    assert local.mode == "local" and local.bytes_number_wise == local.bytes_dimension_wise == 0
    assert local.seconds_number_wise is None and local.seconds_dimension_wise is None   # no time to predict


def test_calibration_time_and_file_round_trip(tmp_path):
    calibration = Calibration(alpha_s=1e-3, beta_s_per_byte=1e-9)
    traffic = number_wise_traffic(big(2), [[0, 10], [10, 0]], 0)
    expected = 3 * 1e-3 + 1e-9 * (8 + 4 * 10 + 2 * 2 * 1024 * 10)         # 3 forward calls + 1 backward call
    assert calibration.seconds(traffic) == pytest.approx(expected + 1e-3)
    calibration.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == calibration
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="bad.json"):
        Calibration.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="not found"):
        Calibration.load(tmp_path / "missing.json")


def test_compute_work_by_hand():
    dims = big(4)                                       # K = 84, E = 4, d_v = 1024, 2-byte values
    t = 10
    assert compute_work("number", dims, t) == (1, 840, 2 * 840 * 1024, 2 * 10 * 4 * 1024)
    assert compute_work("pooled", dims, t) == (1, 840, 2 * 840 * 1024, 4 * 2 * 10 * 4 * 1024)
    assert compute_work("dimension", dims, t) == (1, 4 * 840, 2 * 840 * 1024, 2 * 10 * 4 * 1024)


KNOWN = ComputeModel(number=(1e-3, 2e-7, 1e-9, 3e-9), pooled=(2e-3, 0.0, 2e-9, 1e-9),
                     dimension=(1.5e-3, 1e-7, 0.0, 4e-9))


def _synthetic_observations(model: ComputeModel) -> list[ComputeObservation]:
    """Measured = predicted communication + the model's compute, written out from the formula by hand."""
    observations = []
    for tokens, topk, num_blocks, value_dim in [(48, 12, 2, 32), (192, 12, 6, 32), (48, 24, 6, 192),
                                                (192, 24, 2, 192), (96, 16, 3, 64), (64, 8, 1, 128)]:
        dims = LookupDims(value_dim=value_dim, topk=topk, num_blocks=num_blocks, num_cores=2, group_size=2,
                          value_bytes=4, score_bytes=4)
        for variant in ("number", "pooled", "dimension"):
            c0, c1, c2, c3 = getattr(model, variant)
            index = tokens * topk * (2 if variant == "dimension" else 1)
            pooled = 4 * tokens * num_blocks * value_dim * (2 if variant == "pooled" else 1)
            compute = c0 + c1 * index + c2 * 4 * tokens * topk * value_dim + c3 * pooled
            communication = 1e-4 * (1 + tokens / 64)
            observations.append(ComputeObservation(variant, dims, tokens, communication + compute, communication))
    return observations


def test_compute_fit_recovers_known_coefficients():
    fitted = fit_compute(_synthetic_observations(KNOWN))
    for variant in ("number", "pooled", "dimension"):
        assert getattr(fitted, variant) == pytest.approx(getattr(KNOWN, variant), rel=1e-6, abs=1e-15), variant
    assert min(min(getattr(fitted, v)) for v in ("number", "pooled", "dimension")) >= 0
    with pytest.raises(ValueError, match="needs >= 4 observations"):
        fit_compute(_synthetic_observations(KNOWN)[:9])


def test_compute_fit_keeps_coefficients_non_negative():
    """Timings faster than the communication alone at small sizes would pull an unconstrained fit's per-call term
    below zero; the fit clamps it at zero and still matches the large sizes."""
    observations = [ComputeObservation(o.variant, o.dims, o.tokens_per_rank, o.measured_s - 1.2e-3,
                                       o.communication_s) for o in _synthetic_observations(KNOWN)]
    fitted = fit_compute(observations)
    assert min(min(getattr(fitted, v)) for v in ("number", "pooled", "dimension")) >= 0
    assert fitted.number[0] == 0 and fitted.pooled[0] > 0


def test_plan_adds_compute_and_it_can_change_the_choice():
    dims = big(8)
    comm_only = plan_layer(dims, 1024, UNIT)
    assert comm_only.mode == "dimension" and comm_only.compute_seconds_dimension_wise == 0
    per_gathered_byte = (0.0, 0.0, 1.0, 0.0)
    slow_dimension = Calibration(alpha_s=0.0, beta_s_per_byte=1.0, compute=ComputeModel(
        number=per_gathered_byte, pooled=per_gathered_byte, dimension=(1e12, 0.0, 0.0, 0.0)))
    plan = plan_layer(dims, 1024, slow_dimension)
    assert plan.mode == "number" and plan.owner_pooling and "local compute" in plan.reason
    gathered = 2 * 1024 * 84 * 1024                                       # s_f * T * K * d_v
    assert plan.compute_seconds_number_wise == gathered and plan.compute_seconds_dimension_wise == 1e12
    assert plan.seconds_dimension_wise == comm_only.seconds_dimension_wise + 1e12
    assert plan.seconds_number_wise == UNIT.seconds(variant_traffic("pooled", dims, 1024)) + gathered


def test_calibration_files_without_compute_still_load(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"alpha_s": 1e-5, "beta_s_per_byte": 1e-10, "backend": "gloo", "world_size": 2,
                               "source": "measured: all-to-all"}))
    calibration = Calibration.load(old)
    assert calibration.compute == ComputeModel() and not calibration.compute.calibrated
    assert plan_layer(big(8), 1024, calibration).compute_seconds_number_wise == 0
    fitted = Calibration(alpha_s=1e-5, beta_s_per_byte=1e-10, compute=KNOWN)
    fitted.save(tmp_path / "new.json")
    assert Calibration.load(tmp_path / "new.json") == fitted
    (tmp_path / "short.json").write_text(json.dumps({"alpha_s": 1e-5, "beta_s_per_byte": 1e-10,
                                                     "compute": {**asdict(KNOWN), "pooled": [1.0]}}))
    with pytest.raises(ConfigError, match="compute.pooled"):
        Calibration.load(tmp_path / "short.json")


PLAN_YAML = """
model:
  family: ultramem
  num_layers: 32
  hidden_size: 2048
  num_attention_heads: 16
  memory:
    placements: ["3:7", "8:12", "13:17", "18:22", "23:27", "28:32"]
    num_values: 3211264
    value_dim: 1024
    key_dim: 448
    topk: 42
parallel:
  tensor_model_parallel_size: 2
  sequence_parallel: true
  expert_model_parallel_size: 8
training:
  micro_batch_size: 2
  global_batch_size: 2048
data:
  seq_length: 2048
  mock: true
"""


@pytest.fixture()
def plan_yaml(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(PLAN_YAML)
    return path


def gpu_plan(path, overrides: list[str]):
    """The first layer's plan for a GPU cluster (training.precision auto: bf16)."""
    return plan_config(load_config(path, overrides, check_files=False), cuda=True)[0]


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_command_json_for_512_gpus_without_launching(plan_yaml, capsys):
    assert _cli(["plan", str(plan_yaml), "--world", "512", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert len(plans) == 6 and [p["placement"] for p in plans][-1] == "28:32"
    for entry in plans:
        assert entry["mode"] == "dimension" and entry["tokens_per_rank"] == 2 * 2048 // 2   # SP: 1/TP of the sequence
        assert entry["bytes_dimension_wise"] < entry["bytes_number_wise"]
        assert entry["seconds_dimension_wise"] < entry["seconds_number_wise"]


def test_plan_command_json_includes_calibrated_compute(plan_yaml, tmp_path, capsys):
    path = tmp_path / "cal.json"
    Calibration(alpha_s=20e-6, beta_s_per_byte=1 / 25e9, compute=KNOWN).save(path)
    assert _cli(["plan", str(plan_yaml), "--world", "512", "--json", "--calibration", str(path)]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    dims = LookupDims(**{**BIG, "group_size": 8})
    expected = KNOWN.seconds("dimension", dims, 2048)              # TP 2 under sequence parallelism
    assert entry["compute_seconds_dimension_wise"] == pytest.approx(expected)
    communication = Calibration(alpha_s=20e-6, beta_s_per_byte=1 / 25e9).seconds(
        variant_traffic("dimension", dims, 2048))
    assert entry["seconds_dimension_wise"] == pytest.approx(communication + expected)
    assert entry["compute_seconds_number_wise"] > 0
    assert _cli(["plan", str(plan_yaml), "--world", "512", "--calibration", str(path)]) == 0
    assert "local compute per rank" in capsys.readouterr().out


def test_plan_prints_the_table_gradient_sum_over_tp_of_data_groups_under_sequence_parallelism(plan_yaml, capsys):
    """TP peers fill replicas of a `data` group's shard from different sequence slices: 4 bytes x N x d_v / P of
    gradient per memory layer are all-reduced over TP each step; `tensor_data` groups and no SP need none."""
    assert _cli(["plan", str(plan_yaml), "--world", "512"]) == 0
    shard_gradient = 4 * 3211264 * 1024 // 8
    assert f"table-shard gradient ({shard_gradient / 1e6:.2f} MB) over TP=2" in capsys.readouterr().out
    for override in ("parallel.memory_parallel_group=tensor_data", "parallel.sequence_parallel=false"):
        assert _cli(["plan", str(plan_yaml), override, "--world", "512"]) == 0
        assert "table-shard gradient" not in capsys.readouterr().out


def test_plan_command_text_overrides_and_errors(plan_yaml, capsys, tmp_path):
    assert _cli(["plan", str(plan_yaml), "parallel.expert_model_parallel_size=4", "model.memory.value_dim=6",
                 "--world", "64"]) == 0
    text = capsys.readouterr().out
    assert "P=4" in text and "dimension-wise sharding needs value_dim=6" in text
    by_hand = 84 * (4 * (4 + 2 * 2) - 4) / (2 * 2 * (84 - 4))   # K (P (s_i + 2 s_f) - s_i) / (2 s_f (K - E)), bf16
    assert f"crossover d_v* = {by_hand:.1f} " in text
    assert _cli(["plan", str(plan_yaml), "parallel.expert_model_parallel_size=1", "--world", "64"]) == 0
    assert "crossover: none (P=1, every table is local)" in capsys.readouterr().out
    assert _cli(["plan", str(plan_yaml), "--world", "500"]) == 2
    assert "expert_model_parallel_size" in capsys.readouterr().err
    assert _cli(["plan", str(plan_yaml), "--world", "512", "--calibration", str(tmp_path / "none.json")]) == 2


def test_plan_prices_with_the_calibration_the_run_uses(plan_yaml, tmp_path, capsys):
    """`parallel.comm_calibration` is what a run's `auto` prices with, so the plan reads it too; `--calibration`
    replaces it, with a warning."""
    configured, other = tmp_path / "configured.json", tmp_path / "other.json"
    Calibration(alpha_s=20e-6, beta_s_per_byte=1 / 25e9, compute=KNOWN).save(configured)
    Calibration(alpha_s=1e-3, beta_s_per_byte=1e-9).save(other)
    dims = LookupDims(**{**BIG, "group_size": 8})
    override = f"parallel.comm_calibration={configured}"
    assert _cli(["plan", str(plan_yaml), override, "--world", "512", "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    assert entry["compute_seconds_dimension_wise"] == pytest.approx(KNOWN.seconds("dimension", dims, 2048))
    assert _cli(["plan", str(plan_yaml), override, "--world", "512", "--json", "--calibration", str(other)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["compute_seconds_dimension_wise"] == 0
    assert "replaces the config's parallel.comm_calibration" in err
    assert _cli(["plan", str(plan_yaml), f"parallel.comm_calibration={tmp_path / 'none.json'}", "--world", "512"]) == 2
    assert "parallel.comm_calibration" in capsys.readouterr().err


def test_calibrate_comm_refuses_bad_options_before_measuring(tmp_path, monkeypatch, capsys):
    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before checking the options")

    monkeypatch.setattr(plan_cli, "run_local_group", no_measuring)
    assert _cli(["calibrate-comm", "--output", str(tmp_path), "--iters", "1"]) == 2
    assert "--output" in capsys.readouterr().err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cli(["calibrate-comm", "--output", str(tmp_path / "c.json"), "--lookup-impl", "triton"]) == 2
    assert "--lookup-impl: 'triton' runs on GPU" in capsys.readouterr().err
    gpus = torch.cuda.device_count()
    assert _cli(["calibrate-comm", "--output", str(tmp_path / "c.json"), "--backend", "nccl",
                 "--nproc", str(max(2, gpus + 1))]) == 2
    assert f"NCCL processes need a GPU each, this machine has {gpus}" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def number_rows_bytes(value_bytes: int) -> int:
    """PLAN_YAML's number-wise rows, by hand: T = 2048 tokens (SP slice), K = 84, P = 8, d_v = 1024; counts, ids,
    rows forward and row gradients backward."""
    off_rank = 2048 * 84 * 7 // 8
    return 8 * 7 + 4 * off_rank + 2 * value_bytes * 1024 * off_rank


def test_the_cost_model_counts_the_bytes_of_the_dtype_training_runs_in(plan_yaml, monkeypatch):
    """precision auto trains fp32 on CPU and bf16 on GPU (TrainingConfig.params_dtype); the plan chosen at start-up
    (no `cuda` given: this machine) must price the values and scores in that dtype."""
    config = load_config(plan_yaml, check_files=False)
    for cuda, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        assert config.training.params_dtype(cuda) == dtype
        dims = dims_from_config(config, cuda)
        assert dims.value_bytes == dims.score_bytes == dtype.itemsize
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert plan_config(config)[0].bytes_number_rows == number_rows_bytes(4)
    explicit = load_config(plan_yaml, ["training.precision=bf16"], check_files=False)
    assert plan_config(explicit)[0].bytes_number_rows == number_rows_bytes(2)


def test_plan_command_assumes_the_gpu_dtype_and_says_so(plan_yaml, capsys, monkeypatch):
    """`umtrain plan` runs on a laptop for a GPU cluster: precision auto means bf16 there; --dtype overrides."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for flag, dtype, value_bytes in ((), "bf16", 2), (("--dtype", "fp32"), "fp32", 4):
        assert _cli(["plan", str(plan_yaml), "--world", "512", "--json", *flag]) == 0
        entry = json.loads(capsys.readouterr().out)[0]
        assert entry["dtype"] == dtype and entry["bytes_number_rows"] == number_rows_bytes(value_bytes)
        assert _cli(["plan", str(plan_yaml), "--world", "512", *flag]) == 0
        assert f"{dtype} ({value_bytes}-byte) values and scores" in capsys.readouterr().out


def test_tokens_per_rank_is_the_micro_batch_or_its_sequence_parallel_slice(plan_yaml):
    """Memory layers run on the rank's slice under sequence parallelism (1/TP of the micro-batch), else on the whole
    micro-batch."""
    config = load_config(plan_yaml, check_files=False)
    assert tokens_per_rank(config) == 2 * 2048 // 2
    config = load_config(plan_yaml, ["parallel.sequence_parallel=false"], check_files=False)
    assert tokens_per_rank(config) == 2 * 2048
    assert [p.placement for p in plan_config(config)] == config.model.memory.placements


def test_plan_with_dedup_fetches_rows_and_refuses_a_capacity(plan_yaml):
    """sharding_dedup applies to number-wise rows: owner pooling (which this plan otherwise prefers) is no candidate;
    with sharding_capacity_factor (sync-free) it is a config error naming the key."""
    number = ["model.memory.sharding_mode=number"]
    pooled = plan_config(load_config(plan_yaml, number, check_files=False))[0]
    assert pooled.owner_pooling and not pooled.dedup
    rows = plan_config(load_config(plan_yaml, number + ["model.memory.sharding_dedup=true"], check_files=False))[0]
    assert rows.mode == "number" and rows.dedup and not rows.owner_pooling and "sharding_dedup" in rows.reason
    assert rows.bytes_number_wise == pooled.bytes_number_rows
    auto = plan_config(load_config(plan_yaml, ["model.memory.sharding_dedup=true"], check_files=False))[0]
    assert auto.mode == "dimension" and not auto.dedup
    with pytest.raises(ConfigError) as info:
        load_config(plan_yaml, ["model.memory.sharding_dedup=true", "model.memory.sharding_capacity_factor=2"],
                    check_files=False)
    assert info.value.key == "model.memory.sharding_dedup"
    with pytest.raises(ConfigError, match="sharding_mode is dimension"):
        load_config(plan_yaml, ["model.memory.sharding_dedup=true", "model.memory.sharding_mode=dimension"],
                    check_files=False)


def test_plan_prices_fixed_capacity_padding(plan_yaml):
    """With sharding_capacity_factor, number-wise runs as rows that send exactly C ids to every peer and get C rows
    back (forward) and send C row gradients (backward), C = ceil(factor * T*K/P), exchanging no counts; owner
    pooling (which needs the counts, a host sync) is then no candidate, though it would move fewer bytes here.
    On GPUs: bf16, 2-byte rows."""
    tokens, k, p, d_v = 2 * 2048 // 2, 2 * 42, 8, 1024              # TP 2 under sequence parallelism
    capacity = -(-3 * tokens * k // (2 * p))
    plan = gpu_plan(plan_yaml, ["model.memory.sharding_mode=number", "model.memory.sharding_capacity_factor=1.5"])
    assert plan.capacity == capacity and not plan.owner_pooling and plan.mode == "number"
    assert plan.bytes_number_rows == plan.bytes_number_wise == 4 * capacity * (p - 1) + 2 * (2 * d_v) * capacity * (p - 1)
    unpadded = gpu_plan(plan_yaml, ["model.memory.sharding_mode=number"])
    assert unpadded.capacity is None and unpadded.owner_pooling
    assert unpadded.bytes_number_rows < plan.bytes_number_rows
    auto = gpu_plan(plan_yaml, ["model.memory.sharding_capacity_factor=1.5"])
    assert auto.mode == "dimension" and auto.capacity is None      # padded rows lose to dimension-wise at d_v 1024
    assert "fixed capacity" in auto.reason


def test_calibration_compute_must_be_finite_and_non_negative(tmp_path):
    for bad in ([1.0, float("nan"), 0.0, 0.0], [1.0, -1e-9, 0.0, 0.0]):
        (tmp_path / "bad.json").write_text(json.dumps({"alpha_s": 1e-5, "beta_s_per_byte": 1e-10,
                                                       "compute": {**asdict(KNOWN), "number": bad}}))
        with pytest.raises(ConfigError, match="compute.number"):
            Calibration.load(tmp_path / "bad.json")


@pytest.mark.slow
def test_calibrate_comm_writes_a_calibration_plan_can_read(tmp_path, plan_yaml, capsys):
    output = tmp_path / "new" / "dir" / "gloo.json"          # made before measuring (it failed after, losing it)
    assert _cli(["calibrate-comm", "--nproc", "2", "--iters", "1", "--backend", "gloo", "--lookup-impl", "reference",
                 "--output", str(output)]) == 0
    calibration = Calibration.load(output)
    assert calibration.world_size == 2 and calibration.backend == "gloo"
    assert calibration.alpha_s >= 0 and 0 < calibration.beta_s_per_byte < 1e-6
    assert calibration.compute.calibrated                  # a real forward + backward takes time
    assert _cli(["plan", str(plan_yaml), "--world", "512", "--calibration", str(output)]) == 0
    text = capsys.readouterr().out
    assert "measured: all-to-all" in text and "local compute per rank" in text


def _paired_samples_worker(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from umtrain.ops.lookup_reduce import lookup_reduce_reference
    from umtrain.parallel.calibration import time_lookup_variants
    from umtrain.parallel.comm import Communicator

    dims = LookupDims(value_dim=8, topk=4, num_blocks=2, num_cores=2, group_size=world_size, value_bytes=4,
                      score_bytes=4)
    return time_lookup_variants(Communicator(dist.group.WORLD), dims, 6, 64, lookup_reduce_reference, iters=3)


@pytest.mark.slow
def test_time_lookup_variants_returns_the_group_step_time_of_every_repetition():
    from umtrain.parallel.calibration import step_seconds
    from umtrain.parallel.comm import run_local_group

    ranks = run_local_group(_paired_samples_worker, 2)
    assert ranks[0] == ranks[1]                              # the slowest rank's time, the same on every rank
    assert set(ranks[0]) == {"number", "pooled", "dimension"}
    assert all(len(times) == 3 and min(times) > 0 for times in ranks[0].values())
    assert step_seconds([0.3, 0.1, 0.2, 0.9]) == pytest.approx(0.25)
