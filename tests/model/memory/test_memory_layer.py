"""MemoryLayer against the naive reference, plus causality, init, buffers, sharded tables and health metrics."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch

from memory_reference import naive_memory_forward
from umtrain.config import config_from_dict, load_config
from umtrain.config.base import ConfigError
from umtrain.config.schema import MemoryConfig
from umtrain.model.build import make_memory_factory
from umtrain.model.memory import MemoryLayer
from umtrain.ops.host_sync import record_host_syncs
from umtrain.ops.lookup_reduce import lookup_reduce_reference
from umtrain.parallel.parallelize import MemoryLayerParallelism

PKM = dict(num_values=64, value_dim=12, key_dim=6, num_heads=2, topk=4, softmax=True, output_projection=False,
           share_query=False, query_key_layernorm=False, ive_expansion=1, tucker_rank=1, num_cores=1,
           improved_init=False, query_conv_kernel=0)
ULTRAMEM = dict(num_values=64, value_dim=8, key_dim=8, num_heads=2, topk=4, ive_expansion=4, tucker_rank=2,
                num_cores=2, query_conv_kernel=3)
CASES = {
    "pkm": (PKM, 12),
    "no-softmax-proj-shared-ln-ive": (dict(PKM, softmax=False, output_projection=True, value_dim=6, num_values=36,
                                           share_query=True, query_key_layernorm=True, ive_expansion=4), 10),
    "ultramem": (ULTRAMEM, 16),
    "ultramem-layout-b-r3-h3-signaware": (dict(ULTRAMEM, num_values=16, ive_expansion=9, key_dim=12, tucker_rank=3,
                                               num_cores=3, value_dim=9, key_layout="B", topk=5, num_candidates=6,
                                               sign_aware_candidates=True, share_query=False), 10),
    "ultramem-baseline-init-softmax": (dict(ULTRAMEM, improved_init=False, softmax=True, num_candidates=3), 16),
}


def make_layer(overrides: dict, hidden: int, seed: int = 0, layer_index: int = 0, **kwargs) -> MemoryLayer:
    return MemoryLayer(MemoryConfig(**overrides), hidden, num_layers=4, seed=seed, layer_index=layer_index,
                       lookup=kwargs.pop("lookup", lookup_reduce_reference), **kwargs)


def perturbed_params(layer: MemoryLayer, generator: torch.Generator) -> None:
    """Move every parameter off its init (identity conv, unit LN) so that no term vanishes in the comparison."""
    with torch.no_grad():
        for param in layer.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            param.add_(0.3 * noise * (param.std() if param.numel() > 1 else 1))
    layer.refresh_tdqkr_factors()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq,batch,dtype", [(5, 2, torch.float32), (3, 1, torch.float32), (5, 2, torch.float64)])
def test_forward_and_gradients_match_naive_reference(case: str, seq: int, batch: int, dtype: torch.dtype) -> None:
    """float64 shows the algorithms agree exactly; float32 agrees to 1e-5 of each tensor's scale."""
    overrides, hidden = CASES[case]
    layer = make_layer(overrides, hidden).to(dtype)
    generator = torch.Generator().manual_seed(seq * 10 + batch)
    perturbed_params(layer, generator)
    x = torch.randn(seq, batch, hidden, generator=generator, dtype=dtype, requires_grad=True)
    upstream = torch.randn(seq, batch, hidden, generator=generator, dtype=dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10

    out = layer(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *layer.parameters()])
    expected = naive_memory_forward(layer, x)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), [x, *layer.parameters()])

    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    for name, got, want in zip(names, grads, expected_grads):
        scale = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, atol=tolerance * scale, rtol=tolerance,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("case", ["ultramem", "ultramem-layout-b-r3-h3-signaware"])
@pytest.mark.parametrize("tokens", [3, 20])     # at most / more than the key width (8; 4 in layout B): both paths
def test_factor_scores_are_the_factor_weighted_sum_of_the_sub_key_scores(case: str, tokens: int) -> None:
    """eq. 7's u^T S (for many tokens one GEMM against factor-weighted keys) against a per-rank sum over S."""
    overrides, hidden = CASES[case]
    layer = make_layer(overrides, hidden).double()
    generator = torch.Generator().manual_seed(4)
    perturbed_params(layer, generator)
    query = torch.randn(tokens, layer.config.num_heads, layer.config.key_dim, generator=generator,
                        dtype=torch.float64)
    keys, factor = layer.row_keys.detach(), layer.tdqkr_row_factor
    sub_scores = layer._sub_scores(query, keys)
    expected = sum(factor[None, :, r, None] * sub_scores[:, :, r] for r in range(layer.config.tucker_rank))
    torch.testing.assert_close(layer._factor_scores(query, keys, sub_scores, factor), expected)


@pytest.mark.parametrize("case", ["pkm", "ultramem"])
def test_output_at_t_ignores_later_tokens(case: str) -> None:
    overrides, hidden = CASES[case]
    layer = make_layer(dict(overrides, query_conv_kernel=3), hidden)
    perturbed_params(layer, torch.Generator().manual_seed(1))
    x = torch.randn(8, 3, hidden)
    changed = x.clone()
    changed[5:] = torch.randn(3, 3, hidden)
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(before[:5], after[:5], atol=0, rtol=0)
    assert not torch.allclose(before[5:], after[5:])


def test_conv_mixes_earlier_tokens_of_the_same_sequence_only() -> None:
    overrides, hidden = CASES["ultramem"]
    layer = make_layer(overrides, hidden)
    perturbed_params(layer, torch.Generator().manual_seed(2))
    x = torch.randn(6, 2, hidden)
    changed = x.clone()
    changed[2, 1] += 1.0
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(before[:, 0], after[:, 0], atol=0, rtol=0)
    assert not torch.allclose(before[3:5, 1], after[3:5, 1])


def test_only_the_value_table_is_tagged() -> None:
    layer = make_layer(*CASES["ultramem"])
    tagged = [name for name, p in layer.named_parameters() if getattr(p, "is_memory_value", False)]
    assert tagged == ["values"]


def test_ive_permutation_comes_from_seed_and_layer_index() -> None:
    overrides, hidden = CASES["ultramem"]
    first = make_layer(overrides, hidden, seed=7, layer_index=2)
    again = make_layer(overrides, hidden, seed=7, layer_index=2)
    other = make_layer(overrides, hidden, seed=7, layer_index=3)
    assert torch.equal(first.ive_permutation, again.ive_permutation)
    assert not torch.equal(first.ive_permutation, other.ive_permutation)
    assert torch.equal(first.ive_permutation.sort().values.long(), torch.arange(4 * 64))
    assert "ive_permutation" in first.state_dict()


def test_refresh_recomputes_factors_from_the_summed_core_and_checkpoints_them() -> None:
    layer = make_layer(*CASES["ultramem"])
    with torch.no_grad():
        layer.cores.copy_(torch.randn(layer.cores.shape))
    layer.refresh_tdqkr_factors()
    summed = layer.cores.detach().sum(1)
    u, _, vh = torch.linalg.svd(summed)
    for head in range(summed.shape[0]):
        sign = torch.sign(u[head, :, 0] @ layer.tdqkr_row_factor[head])
        torch.testing.assert_close(layer.tdqkr_row_factor[head], sign * u[head, :, 0])
        torch.testing.assert_close(layer.tdqkr_col_factor[head], sign * vh[head, 0])
    layer.tdqkr_row_factor.neg_()
    layer.tdqkr_col_factor.neg_()
    flipped = layer.tdqkr_row_factor.clone()
    layer.refresh_tdqkr_factors()
    torch.testing.assert_close(layer.tdqkr_row_factor, flipped)
    layer.refresh_tdqkr_factors(restart=True)
    assert torch.all(layer.tdqkr_row_factor.sum(-1) + layer.tdqkr_col_factor.sum(-1) >= 0)
    state = layer.state_dict()
    assert torch.equal(state["tdqkr_row_factor"], layer.tdqkr_row_factor)
    assert torch.equal(state["tdqkr_col_factor"], layer.tdqkr_col_factor)


def test_initial_values_are_deterministic_full_shapes_and_reset_applies_them() -> None:
    overrides, hidden = CASES["ultramem"]
    layer = make_layer(overrides, hidden)
    shapes = layer.full_shapes()
    generator = torch.Generator().manual_seed(3)
    expected = {name: layer.initial_value(name, generator) for name in shapes}
    layer.reset_parameters(torch.Generator().manual_seed(3))
    for name, param in layer.named_parameters():
        assert tuple(expected[name].shape) == shapes[name]
        torch.testing.assert_close(param.detach(), expected[name], atol=0, rtol=0)
    default, again = make_layer(overrides, hidden), make_layer(overrides, hidden)
    for name, param in default.named_parameters():
        torch.testing.assert_close(param, again.get_parameter(name), atol=0, rtol=0)
    with pytest.raises(KeyError, match="no parameter 'bogus'"):
        layer.initial_value("bogus", generator)


def test_sharded_table_is_stored_and_handed_to_lookup() -> None:
    overrides, hidden = CASES["ultramem"]
    full = make_layer(overrides, hidden)
    seen = {}

    def recording_lookup(rows, blocks, scores, table, num_blocks):
        seen["table"] = table
        return lookup_reduce_reference(rows, blocks, scores, full.values, num_blocks)

    shard = make_layer(overrides, hidden, table_shape=(64, 4), lookup=recording_lookup)
    assert shard.values.shape == (64, 4) and shard.values.is_memory_value
    assert shard.initial_value("values", torch.Generator()).shape == (64, 8)
    for name, param in full.named_parameters():
        if name != "values":
            torch.testing.assert_close(shard.get_parameter(name), param, atol=0, rtol=0)
    x = torch.randn(4, 2, hidden)
    torch.testing.assert_close(shard(x), full(x))
    assert seen["table"] is shard.values
    with pytest.raises(ValueError, match="table_shape"):
        make_layer(overrides, hidden, table_shape=(65, 8))


def eq12_aux_loss(layer: MemoryLayer) -> float:
    """Eq. 12 by hand from the singular values of the summed core."""
    c = layer.config
    singular = torch.linalg.svdvals(layer.cores.detach().sum(1).double())
    excess = torch.relu(singular[:, 1:] - c.aux_loss_tau)
    return c.aux_loss_coeff / (c.tucker_rank - 1) * excess.pow(2).sum(-1).mean().item()


def set_cores(layer: MemoryLayer, seed: int) -> None:
    with torch.no_grad():
        layer.cores.copy_(torch.randn(layer.cores.shape, generator=torch.Generator().manual_seed(seed)))


def test_aux_loss_is_set_by_forward_and_zero_without_tdqkr() -> None:
    layer = make_layer(*CASES["ultramem"])
    set_cores(layer, 0)
    layer.refresh_tdqkr_factors()
    layer(torch.randn(2, 1, 16))
    assert layer.aux_loss.requires_grad and layer.aux_loss.item() > 0
    assert layer.aux_loss.item() == pytest.approx(eq12_aux_loss(layer), rel=1e-5)
    pkm = make_layer(*CASES["pkm"])
    pkm(torch.randn(2, 1, 12))
    assert pkm.aux_loss.item() == 0.0


def test_loading_a_state_dict_recomputes_the_aux_loss_basis() -> None:
    """The singular basis is not saved: after a load it must follow the loaded cores, not the layer's own init."""
    saved = make_layer(*CASES["ultramem"])
    set_cores(saved, 1)
    saved.refresh_tdqkr_factors()
    loaded = make_layer(*CASES["ultramem"], seed=7)
    loaded.load_state_dict(saved.state_dict())
    loaded(torch.randn(2, 1, 16))
    assert loaded.aux_loss.item() == pytest.approx(eq12_aux_loss(saved), rel=1e-5)
    assert torch.equal(loaded.tdqkr_row_factor, saved.tdqkr_row_factor)


def test_aux_loss_is_exact_for_bf16_cores_with_a_large_leading_singular_value() -> None:
    """As under Megatron's Float16Module: the layer is cast to bf16 after its refresh. The aux loss must still be
    eq. 12 of the bf16 cores (a bf16 basis, or one of the float32 cores before the cast, leaks about 2^-9 of
    sigma_1 = 20 into lambda_2)."""
    layer = make_layer(*CASES["ultramem"])
    generator = torch.Generator().manual_seed(4)
    q1, q2 = (torch.linalg.qr(torch.randn(2, 2, 2, generator=generator)).Q for _ in range(2))
    summed = q1 @ torch.diag_embed(torch.tensor([[20.0, 0.5], [12.0, 0.3]])) @ q2.mT
    with torch.no_grad():
        layer.cores.copy_((summed / 2).unsqueeze(1).expand_as(layer.cores))
    layer.refresh_tdqkr_factors()
    layer.bfloat16()
    layer(torch.randn(2, 1, 16, dtype=torch.bfloat16))
    assert layer.aux_loss.item() == pytest.approx(eq12_aux_loss(layer), rel=1e-4)


def test_the_trainer_builds_memory_layers_without_drawing_them(monkeypatch) -> None:
    """`build_model_chunks` then overwrites every parameter with its layout-independent value (`initialize_model`,
    which fails on any it misses): a draw at construction would be thrown away (seconds per paper-sized table)."""
    monkeypatch.setattr(MemoryLayer, "reset_parameters", lambda self, generator=None: pytest.fail("drawn at build"))
    config = config_from_dict({"model": {"family": "ultramem", "num_layers": 2, "hidden_size": 16,
                                         "num_attention_heads": 2, "memory": {**ULTRAMEM, "placements": ["1:2"]}},
                               "data": {"mock": True, "seq_length": 8}}, check_files=False)
    layer = make_memory_factory(config, MemoryLayerParallelism())(1)
    assert layer.values.shape == (ULTRAMEM["num_values"], ULTRAMEM["value_dim"])


def test_refresh_cannot_both_restart_and_wait() -> None:
    with pytest.raises(ValueError, match="restart"):
        make_layer(*CASES["ultramem"]).refresh_tdqkr_factors(restart=True, at_next_forward=True)


def test_layer_pickles_and_the_copy_computes_the_same() -> None:
    layer = make_layer(*CASES["ultramem"])
    set_cores(layer, 3)
    layer.refresh_tdqkr_factors()
    copy = pickle.loads(pickle.dumps(layer))
    x = torch.randn(2, 1, 16)
    torch.testing.assert_close(copy(x), layer(x))
    assert copy.aux_loss.item() == layer.aux_loss.item()


def test_layer_deep_copies_after_a_backward() -> None:
    layer = make_layer(*CASES["ultramem"])
    x = torch.randn(2, 1, 16)
    (layer(x).square().sum() + layer.aux_loss).backward()
    copied = copy.deepcopy(layer)
    assert not copied.aux_loss.requires_grad and copied.aux_loss.item() == layer.aux_loss.item()
    torch.testing.assert_close(copied(x), layer(x))
    assert layer.aux_loss.requires_grad


def test_deferred_refresh_runs_once_at_the_next_forward() -> None:
    layer = make_layer(*CASES["ultramem"])
    set_cores(layer, 2)
    layer.refresh_tdqkr_factors(at_next_forward=True)
    assert layer.tdqkr_refresh_pending
    expected = make_layer(*CASES["ultramem"])
    expected.load_state_dict(layer.state_dict())
    expected.refresh_tdqkr_factors()
    layer(torch.randn(2, 1, 16))
    assert not layer.tdqkr_refresh_pending
    assert torch.equal(layer.tdqkr_row_factor, expected.tdqkr_row_factor)
    assert layer.aux_loss.item() == pytest.approx(eq12_aux_loss(layer), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_forward_and_backward_on_cuda_never_wait_for_the_device() -> None:
    """The CUDA counterpart of the check below: PyTorch's sync debug mode raises at any synchronising call."""
    from umtrain.ops.lookup_reduce import get_lookup_reduce

    overrides, hidden = CASES["ultramem"]
    layer = make_layer(overrides, hidden, lookup=get_lookup_reduce("triton")).cuda()
    x = torch.randn(5, 2, hidden, device="cuda", requires_grad=True)
    layer(x).sum().backward()                          # compiles the kernels first
    torch.cuda.set_sync_debug_mode("error")
    try:
        (layer(x).square().sum() + layer.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_backward_dispatch_no_host_synchronising_operator(case: str) -> None:
    """On a GPU any of them would stop the host at every memory layer (see umtrain.ops.host_sync)."""
    overrides, hidden = CASES[case]
    layer = make_layer(overrides, hidden)
    x = torch.randn(5, 2, hidden, requires_grad=True)
    with record_host_syncs() as found:
        out = layer(x)
        (out.square().sum() + layer.aux_loss).backward()
    assert found == []


def test_health_metrics_follow_the_selected_rows() -> None:
    overrides, hidden = CASES["ultramem"]
    layer = make_layer(overrides, hidden)
    rows, stds, top1 = [], [], []
    for _ in range(3):
        out = layer(torch.randn(4, 2, hidden))
        rows.append(layer.last_stats["rows"])
        stds.append(out.std().item())
        top1.append(layer.last_stats["top1_score"].item())
    layer.eval()
    layer(torch.randn(64, 2, hidden))          # validation forwards are not training health
    metrics = layer.health_metrics(reset=True)
    assert metrics["value_hit_fraction"] == pytest.approx(torch.cat(rows).unique().numel() / 64)
    assert metrics["output_std"] == pytest.approx(sum(stds) / 3, rel=1e-6)
    assert metrics["top1_score"] == pytest.approx(sum(top1) / 3, rel=1e-6)
    assert layer.health_metrics()["value_hit_fraction"] == 0.0
    layer.train()
    layer.record_stats = False                 # logging.memory_stats: false
    layer(torch.randn(4, 2, hidden))
    assert layer.health_metrics() == {"value_hit_fraction": 0.0, "top1_score": 0.0, "output_std": 0.0}


@pytest.mark.parametrize("overrides, hidden, key", [
    (PKM, 16, "model.memory.value_dim"),
    (dict(PKM, ive_expansion=4, num_values=16), 12, "model.memory.ive_expansion"),
])
def test_missing_projection_with_wrong_width_names_the_full_key_as_config_loading_does(overrides, hidden, key) -> None:
    """The layer and the config share one check: the same error, naming the full key of the config."""
    with pytest.raises(ConfigError) as from_layer:
        make_layer(overrides, hidden=hidden)
    assert from_layer.value.key == key and "output_projection" in str(from_layer.value)
    with pytest.raises(ConfigError) as from_config:
        load_config(None, ["data.mock=true", "model.family=pkm", f"model.hidden_size={hidden}",
                           "model.num_attention_heads=2", f"model.memory={dict(overrides)}"])
    assert str(from_config.value) == str(from_layer.value)


INIT_CASES = {
    "ultramem-h2-r2": dict(num_values=1024, value_dim=32, key_dim=32, num_heads=2, topk=8),
    "ultramem-h1-r2-layoutB": dict(num_values=1024, value_dim=32, key_dim=32, num_heads=2, topk=8, num_cores=1,
                                   key_layout="B"),
    "no-tdqkr-ive": dict(num_values=1024, value_dim=32, key_dim=32, num_heads=2, topk=8, num_cores=1, tucker_rank=1),
    "pkm-improved": dict(PKM, num_values=1024, value_dim=64, key_dim=32, topk=8, improved_init=True),
}


@pytest.mark.parametrize("case", sorted(INIT_CASES))
def test_improved_init_output_variance_matches_an_mlp(case: str) -> None:
    """App. A: memory output ~ N(0, 1/(2L)) at init, for inputs like a LayerNorm output, on average over init draws."""
    overrides = INIT_CASES[case]
    hidden, num_layers, draws = 64, 12, 16
    layer = MemoryLayer(MemoryConfig(**overrides), hidden, num_layers=num_layers, seed=5, layer_index=1,
                        lookup=lookup_reduce_reference)
    ratios = []
    for draw in range(draws):
        generator = torch.Generator().manual_seed(1000 + draw)
        layer.reset_parameters(generator)
        with torch.no_grad():
            out = layer(torch.randn(128, 2, hidden, generator=generator))
        ratios.append(out.var().item() * 2 * num_layers)
    paper_variance = layer.config.ive_expansion / (2 * num_layers * layer.config.num_heads * layer.config.topk)
    uncorrected = layer.value_std ** -2 * paper_variance
    mean_ratio = sum(ratios) / draws
    print(f"{case}: Var(o)/target = {mean_ratio:.3f} over {draws} draws (per draw {min(ratios):.2f}-{max(ratios):.2f}); "
          f"without the E[s^2] calibration {mean_ratio * uncorrected:.3f}")
    assert mean_ratio == pytest.approx(1.0, rel=0.2)


def test_config_field_change_changes_the_layer() -> None:
    """Each Table 2 switch is read: flipping one changes the parameters or the output."""
    overrides, hidden = CASES["ultramem"]
    base = make_layer(overrides, hidden)
    x = torch.randn(4, 2, hidden)
    for field, value in [("share_query", False), ("query_key_layernorm", False), ("softmax", True),
                         ("query_conv_kernel", 0), ("improved_init", False), ("key_layout", "B")]:
        other = make_layer(dataclasses.replace(MemoryConfig(**overrides), **{field: value}).__dict__, hidden)
        changed_shapes = other.full_shapes() != base.full_shapes()
        assert changed_shapes or not torch.allclose(other(x), base(x)), field


TABLE2_BASE = dict(num_values=64, value_dim=32, key_dim=8, num_heads=2, topk=4, softmax=True,
                   output_projection=False, share_query=False, query_key_layernorm=False, ive_expansion=1,
                   tucker_rank=1, num_cores=1, improved_init=False, query_conv_kernel=0, value_lr_multiplier=1.0)
TABLE2_CHAIN = [
    ("PKM", {}),
    ("+rm softmax", dict(softmax=False)),
    ("+half vdim+proj", dict(value_dim=16, num_values=121, topk=8, output_projection=True)),
    ("+share query", dict(share_query=True)),
    ("+query/key LN", dict(query_key_layernorm=True)),
    ("+IVE", dict(ive_expansion=4)),
    ("+TDQKR", dict(tucker_rank=2)),
    ("+MCS", dict(num_cores=2)),
    ("+improved init", dict(improved_init=True)),
    ("+value lr decay", dict(value_lr_multiplier=10.0)),
    ("+query conv", dict(query_conv_kernel=5)),
]


def spec_parameter_count(c: MemoryConfig, hidden: int) -> int:
    """Spec section 4's per-layer terms: values, query, keys (layout A/B), W_out, conv, LN, cores."""
    n = c.keys_per_side
    key_width = c.key_dim // c.tucker_rank if c.key_layout == "B" else c.key_dim
    count = c.num_values * c.value_dim + 2 * hidden * c.key_dim * (1 if c.share_query else c.num_heads)
    count += 2 * c.num_heads * c.tucker_rank * n * key_width
    count += c.ive_expansion * c.value_dim * hidden if c.output_projection else 0
    count += c.query_conv_kernel * hidden
    count += 2 * (c.key_dim + key_width) if c.query_key_layernorm else 0
    count += c.num_cores * c.num_heads * c.tucker_rank ** 2 if c.tucker_rank > 1 else 0
    return count


def test_each_table2_row_is_one_config_with_the_spec_parameter_count() -> None:
    """The incremental chain of Table 2 (split big mem & skip is the placements, outside the layer)."""
    overrides, hidden = dict(TABLE2_BASE), 32
    x = torch.randn(3, 2, hidden)
    for row, change in TABLE2_CHAIN:
        overrides.update(change)
        config = MemoryConfig(**overrides)
        config.validate("memory")
        layer = make_layer(overrides, hidden)
        assert sum(p.numel() for p in layer.parameters()) == spec_parameter_count(config, hidden), row
        assert layer(x).shape == x.shape
    layout_b = MemoryConfig(**dict(overrides, key_layout="B"))
    assert sum(p.numel() for p in make_layer(layout_b.__dict__, hidden).parameters()) == \
        spec_parameter_count(layout_b, hidden)
