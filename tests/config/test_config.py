"""Every bad input is one ConfigError naming the key (or file), raised before any work starts."""

from __future__ import annotations

import pytest
import yaml

from tests.data.indexed_files import one_token_documents
from umtrain.cli import train as train_cli
from umtrain.cli.main import main
from umtrain.config import ConfigError, load_config

MOCK = ["data.mock=true"]
ULTRAMEM = MOCK + ["model.family=ultramem", "model.memory.placements=['1:2','3:4']"]


def load(overrides, world_size=None):
    return load_config(None, overrides, world_size=world_size)


def raises_key(key: str, overrides, world_size=None, match: str | None = None):
    with pytest.raises(ConfigError) as info:
        load(overrides, world_size)
    assert info.value.key == key, str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_defaults_and_overrides_are_typed():
    config = load(MOCK + ["optimizer.lr=3e-4", "training.train_iters=7", "data.data_path=['1', 'a', '2', 'b']"])
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.training.train_iters == 7
    assert config.data.data_path == ["1", "a", "2", "b"]


def test_removed_keys_of_older_configs_are_dropped_with_a_warning(caplog, tmp_path):
    """The configs saved in older checkpoints hold them: converting such a checkpoint must still work."""
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({"data": {"mock": True, "num_workers": 2}}))
    with caplog.at_level("WARNING", logger="umtrain"):
        config = load_config(path)
    assert not hasattr(config.data, "num_workers")
    assert "data.num_workers is ignored" in caplog.text


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML would silently keep the second value."""
    path = tmp_path / "twice.yaml"
    path.write_text("model:\n  hidden_size: 64\n  hidden_size: 128\ndata:\n  mock: true\n")
    with pytest.raises(ConfigError, match="'hidden_size' appears twice") as info:
        load_config(path)
    assert info.value.key == str(path)


def test_unknown_key_suggests_the_closest():
    error = raises_key("model.hiden_size", MOCK + ["model.hiden_size=8"])
    assert "hidden_size" in str(error)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"training": {"micro_batch_sise": 2}, "data": {"mock": True}}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "training.micro_batch_sise"
    assert "micro_batch_size" in str(info.value)


@pytest.mark.parametrize("override,key", [
    ("training.train_iters=abc", "training.train_iters"),
    ("optimizer.lr=fast", "optimizer.lr"),
    ("parallel.sequence_parallel=3", "parallel.sequence_parallel"),
    ("model.family=transformer", "model.family"),
    ("data.data_path=5", "data.data_path"),
])
def test_wrong_type(override, key):
    raises_key(key, MOCK + [override])


def test_tp_must_divide_heads():
    raises_key("parallel.tensor_model_parallel_size", MOCK + ["parallel.tensor_model_parallel_size=3"],
               match="num_attention_heads")


def test_world_not_divisible_by_tp_pp():
    raises_key("parallel", MOCK + ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"],
               world_size=6, match="TP x PP")


def test_memory_parallel_group_placement():
    ultramem = ULTRAMEM + ["parallel.tensor_model_parallel_size=2", "training.global_batch_size=16"]
    p = "parallel.expert_model_parallel_size"
    # data: groups of DP ranks. World 4 = TP 2 x DP 2: P=2 fits, P=4 does not (only 2 DP ranks).
    assert load(ultramem + [f"{p}=2"], world_size=4).parallel.memory_parallel_group == "data"
    raises_key(p, ultramem + [f"{p}=4"], world_size=4, match="does not divide DP=2")
    # tensor_data: P consecutive ranks in TP-then-DP order; P must divide TP x DP and divide or be a multiple of TP.
    tensor_data = ultramem + ["parallel.memory_parallel_group=tensor_data"]
    for size in (1, 2, 4):
        load(tensor_data + [f"{p}={size}"], world_size=4)
    raises_key(p, tensor_data + [f"{p}=3", "model.memory.sharding_mode=dimension", "model.memory.value_dim=48",
                                 "model.memory.num_cores=1"],
               world_size=6, match="divide or be a multiple of TP=2")
    raises_key("parallel.memory_parallel_group", MOCK + ["parallel.memory_parallel_group=tensor_data"],
               match="memory families")
    raises_key("parallel.memory_parallel_group", ultramem + ["parallel.memory_parallel_group=tensor"])


def test_query_conv_must_not_reach_past_the_previous_tp_slice():
    """Under sequence parallelism a memory layer's query conv reads k-1 tokens from the previous TP rank only."""
    split = ULTRAMEM + ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true",
                        "data.seq_length=16"]
    assert load(split + ["model.memory.query_conv_kernel=5"]).model.memory.query_conv_kernel == 5
    raises_key("model.memory.query_conv_kernel", split + ["model.memory.query_conv_kernel=6"],
               match="more than the 4 tokens of one TP rank's slice")


def test_global_batch_divisible_by_micro_batch_times_dp():
    raises_key("training.global_batch_size", MOCK + ["training.global_batch_size=6", "training.micro_batch_size=2"],
               world_size=2)


def test_missing_data_path_and_tokenizer(tmp_path):
    raises_key("data.data_path", ["data.data_path=[]"])
    raises_key("data.data_path", [f"data.data_path=['{tmp_path}/nothing']", f"data.tokenizer_model={tmp_path}/t.model"],
               match="nothing.bin")
    prefix = one_token_documents(tmp_path / "corpus")
    raises_key("data.tokenizer_model", [f"data.data_path=['{prefix}']", f"data.tokenizer_model={tmp_path}/t.model"])


def test_huggingface_tokenizer_folder_is_accepted_as_load_tokenizer_accepts_it(tmp_path):
    prefix = one_token_documents(tmp_path / "corpus")
    folder = tmp_path / "hf"
    folder.mkdir()
    overrides = [f"data.data_path=['{prefix}']", "data.tokenizer_type=huggingface", f"data.tokenizer_model={folder}"]
    raises_key("data.tokenizer_model", overrides, match="hf is a directory without tokenizer.json")
    (folder / "tokenizer.json").write_text("{}")
    assert load(overrides).data.tokenizer_model == str(folder)
    raises_key("data.tokenizer_model", overrides[:1] + [f"data.tokenizer_model={folder}"],
               match="is a directory, not a sentencepiece model file")


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e400", "0", "-1"])
@pytest.mark.parametrize("key", ["data.data_path", "data.valid_data_path"])
def test_blend_weights_must_be_finite_and_positive_at_load(tmp_path, key, weight):
    prefix = one_token_documents(tmp_path / "corpus")
    blend = f"['1', '{prefix}', '{weight}', '{prefix}']"
    overrides = [f"data.data_path=['{prefix}']", f"{key}={blend}", f"data.tokenizer_model={tmp_path}/corpus.bin"]
    raises_key(key, overrides, match=f"got '{weight}' for {prefix}")


def test_blend_weights_whose_sum_overflows_are_refused(tmp_path):
    prefix = one_token_documents(tmp_path / "corpus")
    raises_key("data.data_path", [f"data.data_path=['1e308', '{prefix}', '1e308', '{prefix}']",
                                  f"data.tokenizer_model={tmp_path}/corpus.bin"], match="overflow")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.yaml")
    assert "missing.yaml" in info.value.key


def test_pipeline_layers_must_split_evenly():
    raises_key("parallel.pipeline_model_parallel_size", MOCK + ["model.num_layers=3", "parallel.pipeline_model_parallel_size=2"])


@pytest.mark.parametrize("override,key", [
    ("model.memory.topk=65", "model.memory.topk"),
    ("model.memory.num_values=1000", "model.memory.num_values"),
    ("model.memory.ive_expansion=2", "model.memory.ive_expansion"),
    ("model.memory.value_dim=33", "model.memory.value_dim"),
    ("model.memory.num_candidates=2", "model.memory.topk"),
    ("model.memory.key_dim=2", "model.memory.key_dim"),                       # LayerNorm over 2: two keys
])
def test_bad_memory_values(override, key):
    raises_key(key, ULTRAMEM + ["model.memory.num_candidates=8", override])


@pytest.mark.parametrize("overrides,key", [
    (["model.ffn_hidden_size=0"], "model.ffn_hidden_size"),
    (["model.vocab_size=-1"], "model.vocab_size"),
    (["model.make_vocab_size_divisible_by=0"], "model.make_vocab_size_divisible_by"),
    (["model.hidden_dropout=1.5"], "model.hidden_dropout"),
    (["model.rotary_percent=0"], "model.rotary_percent"),
    (["model.family=moe", "model.moe={num_experts: 4}", "model.add_bias_linear=true"], "model.add_bias_linear"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=0"],
     "parallel.virtual_pipeline_model_parallel_size"),
    (["optimizer.adam_beta2=2"], "optimizer.adam_beta2"),
    (["optimizer.weight_decay=-0.1"], "optimizer.weight_decay"),
    (["schedule.lr_warmup_iters=-5"], "schedule.lr_warmup_iters"),
    (["training.exit_signal=SIGKILL"], "training.exit_signal"),
    (["training.exit_signal=SIGFOO"], "training.exit_signal"),
    (["data.split=0,100,0", "data.mock=false", "data.data_path=[x]", "data.tokenizer_model=t"], "data.split"),
    (["parallel.tensor_model_parallel_size=2", "model.vocab_size=257"], "model.vocab_size"),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true", "model.family=moe",
      "model.moe={num_experts: 4, moe_ffn_hidden_size: 129}"], "model.moe.moe_ffn_hidden_size"),
    (["checkpoint.save="], "checkpoint.save"),
    (["checkpoint.load=''"], "checkpoint.load"),
])
def test_out_of_range_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, MOCK + overrides, world_size=2, check_files=False)
    assert info.value.key == key, str(info.value)


def test_calibration_and_capacity_are_checked_before_launch(tmp_path):
    raises_key("parallel.comm_calibration", ULTRAMEM + [f"parallel.comm_calibration={tmp_path / 'nope.json'}"],
               match="calibration file not found")
    (tmp_path / "zero.json").write_text('{"alpha_s": 1e-5, "beta_s_per_byte": 0}')
    raises_key("parallel.comm_calibration", ULTRAMEM + [f"parallel.comm_calibration={tmp_path / 'zero.json'}"],
               match="beta_s_per_byte > 0")
    raises_key("model.memory.sharding_capacity_factor", ULTRAMEM + ["model.memory.sharding_capacity_factor=.inf"])


@pytest.mark.parametrize("override, key", [("model.memory.value_lr_multiplier=.inf", "model.memory.value_lr_multiplier"),
                                           ("model.memory.aux_loss_coeff=.nan", "model.memory.aux_loss_coeff"),
                                           ("optimizer.lr='inf'", "optimizer.lr"),
                                           ("optimizer.clip_grad=-.inf", "optimizer.clip_grad")])
def test_a_float_key_refuses_inf_and_nan_naming_the_key(override, key):
    raises_key(key, ULTRAMEM + [override], match="must be a finite number")


def test_moe_linears_default_to_no_bias_and_dense_to_bias():
    assert not load(MOCK + ["model.family=moe", "model.moe={num_experts: 4}"]).model.linear_bias
    assert load(MOCK).model.linear_bias


def test_yaml_1_1_number_forms_stay_strings():
    """PyYAML alone reads 1:2 as 62 (base 60), 0755 as 493 (octal), 007 as 7."""
    config = load(ULTRAMEM + ["model.memory.placements=[1:2, 3:4]", "checkpoint.save=0755", "run_name=007",
                              "optimizer.lr=3e-4", "checkpoint.keep_last=0x2"])
    assert config.model.memory.placements == ["1:2", "3:4"]
    assert (config.checkpoint.save, config.run_name) == ("0755", "007")
    assert (config.optimizer.lr, config.checkpoint.keep_last) == (3e-4, 2)
    raises_key("training.train_iters", MOCK + ["training.train_iters=1_000"], match="must be an integer")


def test_yaml_merge_keys_and_duplicate_keys(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("data: {mock: true}\noptimizer:\n  <<: {lr: 1.0e-3, min_lr: 1.0e-4}\n  lr: 2.0e-3\n")
    config = load_config(path)
    assert (config.optimizer.lr, config.optimizer.min_lr) == (2e-3, 1e-4)
    path.write_text("data: {mock: true}\noptimizer:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match="key 'lr' appears twice"):
        load_config(path)


@pytest.mark.parametrize("override", ["checkpoint.save_interval=10", "checkpoint.async_save=true"])
def test_checkpoint_settings_without_a_save_directory_are_refused(override):
    raises_key(override.split("=")[0], MOCK + [override], match="has no effect without checkpoint.save")


def test_sign_aware_candidates_widen_the_grid_top_m_may_fill():
    """2 m_c candidates per side with sign-aware candidates: top-m = 10 fits the 6 x 6 grid of m_c = 3."""
    narrow = ULTRAMEM + ["model.memory.topk=10", "model.memory.num_candidates=3"]
    raises_key("model.memory.topk", narrow, match="exceeds the 3x3 candidate grid")
    load_config(None, narrow + ["model.memory.sign_aware_candidates=true"], check_files=False)


def test_placements_out_of_range_or_overlapping():
    raises_key("model.memory.placements", ULTRAMEM + ["model.memory.placements=['3:5']"], match="out of range")
    raises_key("model.memory.placements", ULTRAMEM + ["model.memory.placements=['1:3','3:4']"], match="overlap")
    raises_key("model.memory.placements[0]", ULTRAMEM + ["model.memory.placements=['3-4']"])
    raises_key("model.memory.placements", ULTRAMEM + ["model.memory.placements=['3:4','1:2']"],
               match="list them in layer order, ['1:2', '3:4']")


def test_placement_across_pipeline_stage_is_rejected():
    error = raises_key("model.memory.placements[1]", ULTRAMEM + [
        "model.memory.placements=['1:1','2:3']",
        "parallel.pipeline_model_parallel_size=2"])
    assert "2:3" in str(error) and "after layer 2" in str(error)


def test_recompute_must_not_split_a_placement():
    raises_key("training.recompute_num_layers", ULTRAMEM + ["training.recompute_granularity=full",
                                                             "training.recompute_num_layers=1"])
    same_layer = ULTRAMEM + ["model.memory.placements=['1:1','3:3']", "training.recompute_granularity=full",
                             "training.recompute_num_layers=1"]
    assert load(same_layer).model.memory.placements == ["1:1", "3:3"]


@pytest.mark.parametrize("layers,pp,n", [(4, 1, 3), (4, 2, 4), (6, 2, 2), (4, 1, 0)])
def test_recompute_chunks_must_divide_each_pipeline_chunk(layers, pp, n):
    """Megatron's uniform recompute would index past the chunk's last layer (an IndexError on the first step)."""
    raises_key("training.recompute_num_layers", MOCK + [f"model.num_layers={layers}", "model.num_attention_heads=4",
                                                        f"parallel.pipeline_model_parallel_size={pp}",
                                                        "training.recompute_granularity=full",
                                                        f"training.recompute_num_layers={n}"])


def test_moe_with_tensor_parallelism_needs_sequence_parallelism():
    """Megatron-Core's MoE layer raises on the first training forward otherwise."""
    moe = MOCK + ["model.family=moe", "model.moe.num_experts=4", "parallel.tensor_model_parallel_size=2"]
    raises_key("parallel.sequence_parallel", moe)
    assert load(moe + ["parallel.sequence_parallel=true"]).parallel.sequence_parallel


def test_cli_reports_bad_config_before_spawning(monkeypatch, capsys, tmp_path):
    def must_not_launch(args):
        raise AssertionError("launched processes for a bad config")

    monkeypatch.setattr(train_cli, "launch_local", must_not_launch)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"mock": True}, "parallel": {"tensor_model_parallel_size": 3}}))
    assert main(["train", "--config", str(path), "--nproc-per-node", "3"]) == 2
    assert "parallel.tensor_model_parallel_size" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"mock": True}}))
    assert main(["train", "--config", str(path), "--dry-run", "training.train_iters=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["training"]["train_iters"] == 3
    assert printed["parallel"]["tensor_model_parallel_size"] == 1


def test_dry_run_checks_the_layout_only_for_a_given_world_size(capsys, tmp_path):
    """configs/demo.yaml (TP 2) failed `--dry-run` alone on world size 1, which nobody asked for."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"mock": True}, "parallel": {"tensor_model_parallel_size": 2}}))
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    assert "not checked against a world size" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--dry-run", "--nproc-per-node", "2"]) == 0
    assert main(["train", "--config", str(path), "--dry-run", "--nproc-per-node", "3"]) == 2
    assert "world size 3 is not divisible" in capsys.readouterr().err


@pytest.mark.parametrize("key, value", [("model.memory.aux_loss_coeff", -0.001), ("model.memory.aux_loss_tau", -0.1)])
def test_negative_aux_loss_settings_name_their_own_key(key, value):
    raises_key(key, ULTRAMEM + [f"{key}={value}"], match=str(value))


@pytest.mark.parametrize("key, value", [
    ("model.moe.num_experts", 0),
    ("model.moe.moe_ffn_hidden_size", 0),          # not 'null': the dense FFN width
    ("model.moe.moe_aux_loss_coeff", -0.01),
    ("data.mock_vocab_size", 1),                   # checked at load, not when the mock tokenizer is built
])
def test_sizes_and_coefficients_are_refused_at_load(key, value):
    raises_key(key, MOCK + ["model.family=moe", "model.moe.moe_router_topk=1", f"{key}={value}"])


def test_expert_width_defaults_to_the_dense_ffn_width():
    moe = MOCK + ["model.family=moe", "model.hidden_size=32", "model.moe.moe_router_topk=1"]
    assert load(moe).model.moe_ffn_size == 128
    assert load(moe + ["model.moe.moe_ffn_hidden_size=24"]).model.moe_ffn_size == 24


def test_has_memory_is_true_for_the_memory_families_only():
    from typing import get_args

    from umtrain.config.schema import Family, ModelConfig

    assert [f for f in get_args(Family) if ModelConfig(family=f).has_memory] == ["pkm", "ultramem"]


def test_every_optimizer_choice_reaches_megatron_as_adamw(monkeypatch):
    """optimizer.optimizer is read: each choice maps to Megatron-Core's OptimizerConfig ('adam' with decoupled weight
    decay is AdamW)."""
    from typing import get_args, get_type_hints

    from umtrain.config.schema import OptimizerConfig
    from umtrain.train import optimizer

    choices = get_args(get_type_hints(OptimizerConfig)["optimizer"])
    for choice in choices:
        mcore = optimizer.megatron_optimizer_config(load(MOCK + [f"optimizer.optimizer={choice}"]))
        assert (mcore.optimizer, mcore.decoupled_weight_decay) == ("adam", True)
    monkeypatch.setitem(optimizer.MEGATRON_OPTIMIZERS, choices[0], dict(optimizer="sgd"))
    assert optimizer.megatron_optimizer_config(load(MOCK)).optimizer == "sgd"



@pytest.mark.parametrize("hidden, heads, percent, key", [
    (64, 4, 1.0, None), (64, 4, 0.5, None), (64, 4, 0.3, None),
    (60, 4, 1.0, "model.hidden_size"),           # head width 15: Megatron's 16 frequencies do not fit (crash)
    (48, 16, 1.0, "model.hidden_size"),          # head width 3
    (60, 4, 0.5, "model.rotary_percent"),        # 7 of 15 dimensions: Megatron rotates 8, the reference model 7
    (64, 16, 0.1, "model.rotary_percent"),       # 0 of 4 dimensions: no rotation at all
])
def test_rope_needs_an_even_number_of_rotated_dimensions_as_megatron_applies_it(hidden, heads, percent, key):
    """Reference: Megatron-Core's own RotaryEmbedding applied to one head, which must rotate exactly the head's
    int(head_dim * rotary_percent) (all of it at 1.0) dimensions, and some."""
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from umtrain.parallel.cpu_compat import apply
    apply()
    head_dim = hidden // heads
    expected = head_dim if percent == 1.0 else int(head_dim * percent)
    freqs = RotaryEmbedding(head_dim, percent, use_cpu_initialization=True)(3)
    try:
        _apply_rotary_pos_emb_bshd(torch.randn(3, 1, 1, head_dim), freqs)
        megatron_applies_it = 0 < freqs.shape[-1] == expected
    except RuntimeError:
        megatron_applies_it = False
    overrides = MOCK + [f"model.hidden_size={hidden}", f"model.num_attention_heads={heads}",
                        f"model.rotary_percent={percent}"]
    assert megatron_applies_it == (key is None)
    if key is None:
        assert load(overrides).model.rotary_dim == expected
    else:
        raises_key(key, overrides, match="RoPE rotates pairs")


def megatron_interleaved_schedule_accepts(microbatches: int, pp: int) -> bool:
    """forward_backward_pipelining_with_interleaving's two checks, with microbatch_group_size_per_vp_stage N = PP
    (Megatron's default; umtrain does not set it)."""
    group = pp
    if group > microbatches or group < pp:
        return False
    return not 0 < microbatches % group < pp


@pytest.mark.parametrize("global_batch", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("vpp", [None, 2])
def test_interleaved_pipeline_needs_micro_batches_in_multiples_of_pp(global_batch, vpp):
    pp, dp, micro = 2, 1, 1
    overrides = MOCK + ["model.num_layers=8", f"parallel.pipeline_model_parallel_size={pp}",
                        f"parallel.virtual_pipeline_model_parallel_size={'null' if vpp is None else vpp}",
                        f"training.micro_batch_size={micro}", f"training.global_batch_size={global_batch}"]
    if vpp is None or megatron_interleaved_schedule_accepts(global_batch // (micro * dp), pp):
        assert load(overrides, world_size=pp * dp).training.global_batch_size == global_batch
    else:
        raises_key("training.global_batch_size", overrides, world_size=pp * dp, match="multiple of PP=2")


def test_interleaved_pipeline_counts_micro_batches_per_data_parallel_rank():
    """DP=2, micro 1: a global batch of 4 is 2 micro-batches per rank (fine for PP=2), of 2 only 1."""
    base = MOCK + ["model.num_layers=8", "parallel.pipeline_model_parallel_size=2",
                   "parallel.virtual_pipeline_model_parallel_size=2", "training.micro_batch_size=1"]
    assert load(base + ["training.global_batch_size=4"], world_size=4)
    raises_key("training.global_batch_size", base + ["training.global_batch_size=2"], world_size=4, match="= 1,")


@pytest.mark.parametrize("value", ["''", "'  '"])
@pytest.mark.parametrize("mock", ["true", "false"])
def test_an_empty_tokenizer_model_is_refused(value, mock):
    overrides = [f"data.mock={mock}", "data.data_path=[prefix]", f"data.tokenizer_model={value}"]
    raises_key("data.tokenizer_model", overrides, match="is empty: give a path, or null")


def test_a_pkm_memory_section_starts_from_pkm_switches():
    """`family: pkm` with a partial memory section is Lample et al.'s PKM, not an UltraMem layer under that name;
    the switches the config sets win, and the same section under `ultramem` keeps UltraMem's defaults."""
    from umtrain.config.schema import PKM_MEMORY_DEFAULTS

    section = "model.memory={value_dim: 64, num_values: 1024}"
    pkm = load(MOCK + ["model.family=pkm", section]).model.memory
    assert {key: getattr(pkm, key) for key in PKM_MEMORY_DEFAULTS} == PKM_MEMORY_DEFAULTS
    assert (pkm.value_dim, pkm.num_values) == (64, 1024)
    explicit = load(MOCK + ["model.family=pkm", "model.memory={value_dim: 32, num_values: 1024, "
                                                "output_projection: true, query_conv_kernel: 3}"]).model.memory
    assert explicit.output_projection and explicit.query_conv_kernel == 3 and explicit.tucker_rank == 1
    ultramem = load(MOCK + ["model.family=ultramem", section]).model.memory
    assert (ultramem.tucker_rank, ultramem.num_cores, ultramem.softmax) == (2, 2, False)


def test_candidates_past_the_keys_per_side_name_the_key_the_config_set():
    small = ULTRAMEM + ["model.memory.num_values=256", "model.memory.ive_expansion=1"]   # 16 keys per side
    raises_key("model.memory.topk", small + ["model.memory.topk=20"], match="num_candidates, unset, is top-m")
    raises_key("model.memory.num_candidates", small + ["model.memory.topk=8", "model.memory.num_candidates=20"])


def test_a_split_part_without_documents_is_refused_at_load_and_by_dry_run(capsys, tmp_path):
    """0.001 of 300 documents rounds to none: refused before any model is built (Megatron-Core would loop forever)."""
    one_token_documents(tmp_path / "docs", count=300)
    data = [f"data.data_path=['{tmp_path}/docs']", f"data.tokenizer_model={tmp_path}/docs.bin"]
    raises_key("data.split", data + ["data.split='969,30,1'"],
               match="'969,30,1' leaves the test part of " f"{tmp_path}/docs (300 documents) without a document")
    assert load(data + ["data.split='969,30,0'"]).data.split == "969,30,0"
    assert load(data + ["data.split='969,30,1'", f"data.valid_data_path=['{tmp_path}/docs']"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"data_path": [f"{tmp_path}/docs"], "split": "969,30,1",
                                            "tokenizer_model": f"{tmp_path}/docs.bin"}}))
    assert main(["train", "--config", str(path), "--dry-run"]) == 2
    assert "data.split" in capsys.readouterr().err


def test_an_index_that_is_not_megatrons_is_named_at_load(tmp_path):
    (tmp_path / "docs.bin").write_bytes(b"")
    (tmp_path / "docs.idx").write_bytes(b"not an index")
    raises_key("data.data_path", [f"data.data_path=['{tmp_path}/docs']", f"data.tokenizer_model={tmp_path}/docs.bin"],
               match=f"{tmp_path}/docs.idx is not a Megatron index")
