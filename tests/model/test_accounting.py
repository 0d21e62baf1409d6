"""Parameter/FLOP accounting against hand counts, the spec's recomputations and the paper's Tables 1-3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from umtrain.cli import count as count_cli
from umtrain.config import ConfigError, load_config
from umtrain.config.base import to_dict
from umtrain.model.accounting import PAPER_FIGURES, compare_to_paper, count, memory_layer_components

PAPER_DIR = Path(__file__).resolve().parents[2] / "configs" / "paper"
PAPER_CONFIGS = sorted(PAPER_DIR.rglob("*.yaml"))
TOLERANCE = 0.03

DOCUMENTED_DEVIATIONS: dict[tuple[str, str], str] = {}
"""(run_name, field) -> why the count misses the paper by more than 3%. Empty: every printed figure is within 3%
(docs/accounting.md lists the measured errors; the largest is UltraMem-151M's FLOPs, -1.5%, from the paper's
rounding of 0.345 to 0.35)."""


def paper_config(name: str, *overrides: str):
    path = PAPER_DIR / name
    return load_config(path, list(overrides), check_files=False)


def test_paper_configs_exist_for_every_paper_row_and_load():
    assert len(PAPER_CONFIGS) == 13 + 12
    run_names = [load_config(path, check_files=False).run_name for path in PAPER_CONFIGS]
    assert sorted(run_names) == sorted(PAPER_FIGURES)


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: str(p.relative_to(PAPER_DIR)))
def test_paper_config_settings_and_figures(path: Path):
    config = load_config(path, check_files=False)
    assert config.data.mock and not config.data.data_path and config.data.seq_length == 2048
    assert config.training.global_batch_size == 2048
    assert config.optimizer.min_lr == pytest.approx(0.1 * config.optimizer.lr)
    assert (config.optimizer.weight_decay, config.optimizer.adam_beta1, config.optimizer.adam_beta2) == (0.1, 0.9, 0.95)
    assert (config.schedule.lr_decay_style, config.schedule.lr_warmup_fraction) == ("cosine", 0.01)
    comparisons = compare_to_paper(count(config), config.run_name)
    assert comparisons
    for c in comparisons:
        if (config.run_name, c.field) in DOCUMENTED_DEVIATIONS:
            continue
        assert abs(c.relative_error) <= TOLERANCE, (config.run_name, c.field, c.counted, c.paper)


def test_tiny_ultramem_hand_count():
    """Every term of the spec's section-4 table, written out by hand for D=64, 4 layers, one memory layer."""
    config = load_config(None, [
        "model.family=ultramem", "model.num_layers=4", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.memory.placements=['1:3']", "model.memory.num_values=100", "model.memory.value_dim=32",
        "model.memory.key_dim=8", "model.memory.num_heads=2", "model.memory.topk=3", "model.memory.ive_expansion=4",
        "model.memory.tucker_rank=2", "model.memory.key_layout=A", "model.memory.num_cores=2",
        "model.memory.share_query=true", "model.memory.query_conv_kernel=5", "model.memory.query_key_layernorm=true",
        "data.mock=true"], check_files=False)
    body = 4 * (4 * 64 * 64 + 2 * 64 * 128)                       # 98,304
    values, active_values = 100 * 32, 2 * 3 * 32                   # N*d_v, K*d_v
    query, keys = 2 * 64 * 8, 2 * 2 * 2 * 20 * 8                  # 2*D*d_k, 2*H*r*n*d_k with n = sqrt(4*100) = 20
    w_out, conv, ln, cores = 4 * 32 * 64, 5 * 64, 4 * 8, 2 * 2 * 2 * 2
    rescoring = 2 * 2 * 2 * (2 * 2 * 3 + 2 * 3 * 3)                # 2*H*h*(r^2 m + r m^2)
    dense = body + query + keys + w_out + conv + ln + cores
    accounting = count(config)
    assert accounting.summary() == {
        "dense_params": dense,
        "sparse_params": values,
        "total_params": dense + values,
        "activated_params": dense + active_values,
        "flops_per_token": 2 * (dense + active_values) + rescoring,
    }
    assert sum(c.params for c in accounting.components) == accounting.total_params


def test_sign_aware_candidates_rescore_the_doubled_grid():
    """2 m_c candidates per side: the re-scoring term 2 H h (r^2 c + r c^2) with c = 2 m_c (here m_c = 64)."""
    base = ["model.memory.num_candidates=64", "data.mock=true"]
    path = PAPER_DIR / "ultramem-151m-x12.yaml"
    plain = count(load_config(path, base, check_files=False))
    sign_aware = count(load_config(path, base + ["model.memory.sign_aware_candidates=true"], check_files=False))
    memory = load_config(path, base, check_files=False).model.memory
    heads, cores, rank = memory.num_heads, memory.num_cores, memory.tucker_rank
    rescoring = lambda c: 2 * heads * cores * (rank * rank * c + rank * c * c)  # noqa: E731
    layers = len(memory.placements)
    assert sign_aware.flops_per_token - plain.flops_per_token == layers * (rescoring(128) - rescoring(64))


@pytest.mark.parametrize("name,value_dim", [("ultramem-151m-x12.yaml", 32), ("pkm-151m-x12.yaml", 64),
                                            ("table2/12-query-conv.yaml", 32)])
def test_memory_terms_equal_the_memory_layers_parameter_count(name: str, value_dim: int):
    """The built module is the reference: its numel must equal the summed memory components (shrunk shapes)."""
    from umtrain.model.memory.layer import MemoryLayer

    config = paper_config(name, "model.hidden_size=64", "model.num_attention_heads=4", "model.memory.key_dim=12",
                          "model.memory.num_values=400", f"model.memory.value_dim={value_dim}")
    memory, hidden = config.model.memory, config.model.hidden_size
    layer = MemoryLayer(memory, hidden, config.model.num_layers, seed=0, layer_index=0)
    assert sum(p.numel() for p in layer.parameters()) == sum(c.params for c in memory_layer_components(memory, hidden))


def test_ultramem_table1_matches_the_specs_recomputation():
    """Spec section 4: layout A gives 2.031/0.345, 8.925/1.487, 21.48/3.499; layout B FLOPs 0.331/1.447/3.422
    (compared to the printed digits: half a unit of the last one)."""
    expected = {"151m": (2.031, 0.345, 0.331), "680m": (8.925, 1.487, 1.447), "1.6b": (21.48, 3.499, 3.422)}
    for size, (params, flops_a, flops_b) in expected.items():
        layout_a = count(paper_config(f"ultramem-{size}-x12.yaml"))
        layout_b = count(paper_config(f"ultramem-{size}-x12.yaml", "model.memory.key_layout=B"))
        assert layout_a.total_params / 1e9 == pytest.approx(params, abs=0.0005 if params < 10 else 0.005)
        assert layout_a.flops_per_token / 1e9 == pytest.approx(flops_a, abs=0.0005)
        assert layout_b.flops_per_token / 1e9 == pytest.approx(flops_b, abs=0.0005)


def test_moe_counts_experts_as_sparse_and_activates_top_k():
    config = paper_config("moe-151m-2in32.yaml")
    L, D, d_e, n_e = 12, 1024, 2528, 32
    accounting = count(config)
    assert accounting.sparse_params == L * n_e * 2 * D * d_e
    assert accounting.dense_params == L * (4 * D * D + D * n_e)
    assert accounting.flops_per_token == 2 * L * (4 * D * D + 2 * 2 * D * d_e + D * n_e)


def test_pkm_with_table6_hyperparameters_gives_the_specs_numbers():
    """Spec section 4: Table 6's PKM-151M/680M (Kdim 512/768 full query) give 2.016/0.317 and 8.885/1.407."""
    for size, key_dim, knum, heads, topk, params, flops in (("151m", 256, 1347, 6, 16, 2.016, 0.317),
                                                            ("680m", 384, 2308, 8, 35, 8.885, 1.407)):
        accounting = count(paper_config(
            f"pkm-{size}-x12.yaml", f"model.memory.key_dim={key_dim}", f"model.memory.num_values={knum * knum}",
            f"model.memory.num_heads={heads}", f"model.memory.topk={topk}"))
        assert accounting.total_params / 1e9 == pytest.approx(params, abs=0.0005)
        assert accounting.flops_per_token / 1e9 == pytest.approx(flops, abs=0.0005)


TABLE2_CHANGES = [
    {"family", "softmax"},
    {"value_dim", "num_values", "topk", "output_projection"},
    {"share_query"},
    {"placements", "num_values", "key_dim", "topk"},
    {"query_key_layernorm"},
    {"ive_expansion"},
    {"tucker_rank", "key_layout"},
    {"num_cores"},
    {"improved_init"},
    {"value_lr_multiplier"},
    {"query_conv_kernel"},
]


def test_table2_chain_changes_only_its_rows_switches():
    rows = sorted((PAPER_DIR / "table2").glob("*.yaml"))
    assert len(rows) == 12
    configs = [to_dict(load_config(path, check_files=False)) for path in rows]
    for before, after, expected in zip(configs, configs[1:], TABLE2_CHANGES):
        changed = {k for k in after["model"]["memory"] if after["model"]["memory"][k] != before["model"]["memory"][k]}
        changed |= {k for k in after["model"] if k != "memory" and after["model"][k] != before["model"][k]}
        assert changed == expected, after["run_name"]
        assert {k for k in after if k not in ("model", "run_name") and after[k] != before[k]} == set()


def test_table3_ive_flops_growth():
    """Table 3: E = 4 / 9 / 16 add 6.6% / 14.9% / 26.4% FLOPs over the 323.54 M row (within 1 point)."""
    base = count(paper_config("table2/06-query-key-ln.yaml")).flops_per_token
    for expansion, growth in ((4, 0.066), (9, 0.149), (16, 0.264)):
        flops = count(paper_config("table2/06-query-key-ln.yaml", f"model.memory.ive_expansion={expansion}"))
        assert flops.flops_per_token / base - 1 == pytest.approx(growth, abs=0.01)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    count_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["count", *argv])
    return args.func(args)


def test_cli_json_is_the_accounting_summary(capsys):
    path = str(PAPER_DIR / "ultramem-151m-x12.yaml")
    assert run_cli(path, "model.memory.topk=8", "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    expected = count(load_config(path, ["model.memory.topk=8"], check_files=False)).summary()
    assert printed == expected
    assert set(printed) == {"dense_params", "sparse_params", "total_params", "activated_params", "flops_per_token"}
    assert all(isinstance(v, int) for v in printed.values())


def test_cli_table_shows_paper_figure_and_relative_error(capsys):
    assert run_cli(str(PAPER_DIR / "moe-680m-2in33.yaml")) == 0
    out = capsys.readouterr().out
    flops_line = next(line for line in out.splitlines() if line.startswith("FLOPs per token"))
    assert flops_line.split() == ["FLOPs", "per", "token", "1.5124", "G", "1.5000", "G", "+0.83%"]
    assert "moe.experts (sparse)" in out


def test_cli_bad_override_names_the_key():
    with pytest.raises(ConfigError, match="model.hiden_size"):
        run_cli(str(PAPER_DIR / "dense-151m.yaml"), "model.hiden_size=8")
