"""Sweep grid expansion, run names, value typing and per-point validation (umtrain/config/sweep.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.distributed import tiny_config
from umtrain.config import ConfigError, load_config
from umtrain.config.base import to_dict
from umtrain.config.sweep import (MAX_NAME, Axis, ZipGroup, check_axes, expand, number_text, parse_axis, parse_zip,
                                  point_names, resolve_sweep, run_directories)

ULTRAMEM = {"family": "ultramem", "memory": {"placements": ["2:3"], "num_values": 64, "value_dim": 32, "key_dim": 16,
                                             "num_heads": 2, "topk": 4, "ive_expansion": 4, "tucker_rank": 2,
                                             "num_cores": 2}}


@pytest.fixture
def base_yaml(tmp_path: Path) -> Path:
    config = tiny_config(model=ULTRAMEM, logging={"tensorboard_dir": "tb"})
    config["run_name"] = "base"
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_values_are_typed_as_yaml():
    assert parse_axis("optimizer.lr=[1e-3, 3e-4]") == Axis("optimizer.lr", (0.001, 0.0003))
    assert parse_axis("model.memory.softmax=[true,false]").values == (True, False)
    assert parse_axis("model.memory.placements=[[1:2],[1:2,3:4]]").values == (["1:2"], ["1:2", "3:4"])
    assert parse_axis("run_name=[007, a]").values == ("007", "a")          # YAML 1.2: no octal surprise
    assert parse_axis("model.memory.num_candidates=[null, 8]").values == (None, 8)


@pytest.mark.parametrize("text, key, words", [
    ("optimizer.lrr=[1,2]", "optimizer.lrr", "did you mean 'lr'"),
    ("optimizer.lr=3e-4", "optimizer.lr", "non-empty YAML list"),
    ("optimizer.lr=[]", "optimizer.lr", "non-empty YAML list"),
    ("optimizer.lr=[1e-3,1e-3]", "optimizer.lr", "listed twice"),
    ("optimizer.lr", "optimizer.lr", "key.path=[v1,v2,...]"),
    ("sched:optimizer.lr=[1,2]", "sched:optimizer.lr", "only for --zip"),
])
def test_bad_axes_name_the_key(text, key, words):
    with pytest.raises(ConfigError) as err:
        parse_axis(text)
    assert err.value.key == key and words in str(err.value)


def test_product_and_zip_against_nested_loops():
    grid = [Axis("optimizer.lr", (1e-3, 3e-4)), Axis("model.memory.topk", (16, 32, 64))]
    zipped = [ZipGroup("", (Axis("model.memory.value_dim", (32, 64)), Axis("model.memory.num_cores", (2, 4))))]
    expected = [{"optimizer.lr": lr, "model.memory.topk": m, "model.memory.value_dim": dv,
                 "model.memory.num_cores": h}
                for lr in (1e-3, 3e-4) for m in (16, 32, 64) for dv, h in ((32, 2), (64, 4))]
    points = expand(grid, zipped)
    assert points == expected and len(points) == 2 * 3 * 2
    assert [list(p) for p in points] == [list(expected[0])] * len(points)     # keys in axis order
    assert expand([], zipped) == [{"model.memory.value_dim": 32, "model.memory.num_cores": 2},
                                  {"model.memory.value_dim": 64, "model.memory.num_cores": 4}]


def test_zip_groups_are_independent_factors_against_nested_loops():
    grid = [Axis("model.memory.topk", (16, 32))]
    groups = parse_zip(["cores:model.memory.value_dim=[32,64,128]", "sched:optimizer.lr=[1e-3,3e-4]",
                        "cores:model.memory.num_cores=[2,4,8]", "sched:optimizer.min_lr=[1e-4,3e-5]"])
    assert [g.label for g in groups] == ["cores", "sched"]                   # in order of first appearance
    assert [[a.key for a in g.axes] for g in groups] == [["model.memory.value_dim", "model.memory.num_cores"],
                                                         ["optimizer.lr", "optimizer.min_lr"]]
    expected = [{"model.memory.topk": m, "model.memory.value_dim": dv, "model.memory.num_cores": h,
                 "optimizer.lr": lr, "optimizer.min_lr": min_lr}
                for m in (16, 32) for dv, h in ((32, 2), (64, 4), (128, 8)) for lr, min_lr in ((1e-3, 1e-4),
                                                                                           (3e-4, 3e-5))]
    points = expand(grid, groups)
    assert points == expected and len(points) == 2 * 3 * 2
    assert all(list(p) == list(expected[0]) for p in points)
    check_axes(grid, groups)


def test_unlabelled_zip_arguments_form_one_group_as_before():
    texts = ["model.memory.value_dim=[32,64]", "model.memory.num_cores=[2,4]"]
    assert parse_zip(texts) == [ZipGroup("", tuple(parse_axis(t) for t in texts))]
    assert parse_zip([]) == []
    mixed = parse_zip(["sched:optimizer.lr=[1e-3,3e-4]", "model.memory.value_dim=[32,64]",
                       "model.memory.num_cores=[2,4]", " sched : optimizer.min_lr=[1e-4,3e-5]"])
    assert [(g.label, len(g.axes)) for g in mixed] == [("sched", 2), ("", 2)]
    assert mixed[0].axes[1] == Axis("optimizer.min_lr", (1e-4, 3e-5))
    assert parse_zip(["model.memory.placements=[[1:2],[3:4]]"])[0].axes[0].values == (["1:2"], ["3:4"])


@pytest.mark.parametrize("text, key", [(":optimizer.lr=[1,2]", ":optimizer.lr"),
                                       ("my group:optimizer.lr=[1,2]", "my group:optimizer.lr")])
def test_a_bad_zip_label_is_named(text, key):
    with pytest.raises(ConfigError, match="zip group label") as err:
        parse_zip([text])
    assert err.value.key == key


@pytest.mark.parametrize("value, text", [(0.0003, "3e-4"), (0.001, "1e-3"), (1e-5, "1e-5"), (2.5e-4, "2.5e-4"),
                                         (0.5, "0.5"), (32, "32"), (1.0, "1"), (1234.5, "1234.5")])
def test_number_text(value, text):
    assert number_text(value) == text


def test_names_are_readable_unique_and_stable():
    points = expand([Axis("optimizer.lr", (1e-3, 3e-4)), Axis("model.memory.topk", (16, 32))])
    assert point_names(points) == ["lr1e-3_topk16", "lr1e-3_topk32", "lr3e-4_topk16", "lr3e-4_topk32"]
    assert point_names(expand([Axis("model.memory.softmax", (True, False)),
                               Axis("model.memory.placements", (["1:2"], ["1:2", "3:4"]))])) == [
        "softmax-on_placements1-2", "softmax-on_placements1-2+3-4",
        "softmax-off_placements1-2", "softmax-off_placements1-2+3-4"]
    assert point_names(expand([Axis("model.memory.topk", (8,)), Axis("model.moe.topk", (2,))])) == \
        ["model.memory.topk8_model.moe.topk2"]                                  # a shared last segment: full keys
    clash = point_names(expand([Axis("data.cache_path", ("a/b", "a b", "c"))]))
    assert clash == ["cache-path-a-b-p0", "cache-path-a-b-p1", "cache-path-c"]   # `_` separates keys only
    assert len(set(clash)) == 3


def test_axis_conflicts_are_refused():
    lr = Axis("optimizer.lr", (1e-3, 3e-4))
    with pytest.raises(ConfigError, match="swept twice"):
        check_axes([lr], [ZipGroup("", (lr,))])
    with pytest.raises(ConfigError, match="swept twice"):
        check_axes([], parse_zip(["a:optimizer.lr=[1,2]", "b:optimizer.lr=[3,4]"]))
    with pytest.raises(ConfigError, match="both swept and fixed"):
        check_axes([lr], [], ["optimizer.lr=1e-2"])
    with pytest.raises(ConfigError, match="set per run by the sweep") as err:
        check_axes([lr], [], ["checkpoint.save=/x"])
    assert err.value.key == "checkpoint.save"
    with pytest.raises(ConfigError) as err:
        check_axes([], [ZipGroup("", (lr, Axis("training.seed", (1, 2, 3))))])
    assert "the unlabelled zip group must have the same number of values (optimizer.lr has 2, training.seed has 3)" \
        in str(err.value)
    groups = parse_zip(["a:optimizer.lr=[1,2]", "b:training.seed=[1,2,3]", "b:model.memory.topk=[4,8]",
                        "a:optimizer.min_lr=[0,1]"])
    with pytest.raises(ConfigError) as err:
        check_axes([], groups)
    assert err.value.key == "training.seed"
    assert "zip group 'b' must have the same number of values (training.seed has 3, model.memory.topk has 2)" \
        in str(err.value)
    with pytest.raises(ConfigError, match="at least one"):
        check_axes([], [])


@pytest.mark.parametrize("axes, fixed, key, words", [
    (["model.memory=[{topk: 16},{topk: 32}]", "model.memory.topk=[4,8]"], [], "model.memory.topk",
     "is swept twice (model.memory.topk and model.memory (whose value sets model.memory.topk) overlap)"),
    (["model.memory.topk=[4,8]", "model=[{memory: {topk: 16}}]"], [], "model",
     "is swept twice (model (whose value sets model.memory.topk) and model.memory.topk overlap)"),
    (["model.memory=[null, {topk: 16}]", "model.memory.value_dim=[32,64]"], [], "model.memory.value_dim",
     "is swept twice (model.memory.value_dim and model.memory overlap)"),
    (["optimizer.lr=[1e-3,3e-4]"], ["optimizer={lr: 1e-2}"], "optimizer.lr",
     "is both swept and fixed by an override (optimizer.lr and optimizer (whose value sets optimizer.lr) overlap)"),
    (["optimizer=[{lr: 1e-3},{lr: 3e-4}]"], ["optimizer.lr=1e-2"], "optimizer", "is both swept and fixed"),
    (["optimizer.lr=[1e-3,3e-4]"], ["checkpoint={save: /tmp/x}"], "checkpoint",
     "sets checkpoint.save, which is set per run by the sweep (under --out); it cannot be overridden"),
    (["checkpoint=[{save: a},{save: b}]"], [], "checkpoint",
     "sets checkpoint.save, which is set per run by the sweep (under --out); it cannot be swept"),
    (["logging=[{tensorboard_dir: a},{wandb_project: p}]"], [], "logging", "sets logging.tensorboard_dir"),
])
def test_a_mapping_value_conflicts_with_the_sub_keys_it_sets(axes, fixed, key, words):
    """The dotted forms are refused; a section mapping setting the same leaf is the same conflict (it used to pass,
    and a run named `memory-topk-16_topk4` trained topk 4, or a fixed value was dropped)."""
    with pytest.raises(ConfigError) as err:
        check_axes([parse_axis(text) for text in axes[:1]], parse_zip(axes[1:]), fixed)
    assert err.value.key == key and words in str(err.value)


def test_a_mapping_value_leaves_the_sections_other_keys_free():
    check_axes([parse_axis("model.memory=[{topk: 16},{topk: 32}]"), parse_axis("model.memory.value_dim=[32,64]")],
               [], ["optimizer={min_lr: 1e-5}", "checkpoint={save_interval: 5}", "model.memory={num_heads: 2}"])
    check_axes([parse_axis("optimizer.lr=[1e-3,3e-4]")], [], ["optimizer={}", "optimizer.min_lr=0"])


def test_each_run_is_the_base_config_with_its_overrides(base_yaml, tmp_path):
    out = tmp_path / "sweep"
    zipped = parse_zip(["model.memory.value_dim=[32,64]", "model.memory.softmax=[false,true]"])
    runs = resolve_sweep(base_yaml, [parse_axis("optimizer.lr=[1e-3,3e-4]")], zipped,
                         ["training.train_iters=3", "model.memory.num_cores=1", "model.memory.tucker_rank=1"], out)
    assert [r.name for r in runs] == ["lr1e-3_value-dim32_softmax-off", "lr1e-3_value-dim64_softmax-on",
                                      "lr3e-4_value-dim32_softmax-off", "lr3e-4_value-dim64_softmax-on"]
    for run, (lr, dv, softmax) in zip(runs, [("1e-3", 32, "false"), ("1e-3", 64, "true"),
                                             ("3e-4", 32, "false"), ("3e-4", 64, "true")]):
        run_dir = out / run.name
        reference = load_config(base_yaml, [
            "training.train_iters=3", "model.memory.num_cores=1", "model.memory.tucker_rank=1",
            f"optimizer.lr={lr}", f"model.memory.value_dim={dv}", f"model.memory.softmax={softmax}",
            f"run_name=base-{run.name}", f"checkpoint.save={run_dir / 'checkpoints'}",
            f"logging.tensorboard_dir={run_dir / 'tensorboard'}"])
        assert to_dict(run.config) == to_dict(reference)
    assert not out.exists()


def test_a_mapping_value_merges_into_the_base_section(base_yaml, tmp_path):
    """`--grid 'model.memory=[{topk: 2},{topk: 8}]'` sets topk and keeps the base config's other memory keys."""
    out = tmp_path / "sweep"
    runs = resolve_sweep(base_yaml, [parse_axis("model.memory=[{topk: 2},{topk: 8, num_heads: 4}]")], [], [], out)
    for run, (topk, heads) in zip(runs, [(2, 2), (8, 4)]):
        expected = {**ULTRAMEM["memory"], "topk": topk, "num_heads": heads}
        memory = to_dict(run.config.model.memory)
        assert {key: memory[key] for key in expected} == expected


def test_a_bad_value_names_the_key_and_the_point(base_yaml, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_sweep(base_yaml, [parse_axis("model.memory.topk=[4,0]")], [], [], tmp_path / "sweep")
    assert err.value.key == "model.memory.topk"
    assert "sweep point 'topk0'" in str(err.value) and "model.memory.topk=0" in str(err.value)
    assert not (tmp_path / "sweep").exists()


def test_long_values_give_bounded_distinct_names():
    prefix = "/lustre/fsw/portfolios/llm/projects/pretraining/tokenized/demo_sentencepiece_4k"
    blends = [["0.5", f"{prefix}/a_text_document", "0.5", f"{prefix}/b_text_document"],
              ["0.2", f"{prefix}/a_text_document", "0.8", f"{prefix}/b_text_document"]]
    names = point_names([{"data.data_path": blend, "optimizer.lr": lr} for blend in blends for lr in (1e-3, 3e-4)])
    assert len(set(names)) == 4 and all(len(name) <= MAX_NAME for name in names)
    assert point_names([{"data.data_path": blends[0]}]) == point_names([{"data.data_path": blends[0]}])
    many = {f"model.memory.key{i}": "x" * 40 for i in range(12)}
    assert len(point_names([many])[0]) <= MAX_NAME


def test_tensorboard_and_profiles_get_a_directory_per_run_when_the_base_has_them(tmp_path):
    run_dir = tmp_path / "lr1e-3"
    assert run_directories(run_dir, {"logging": {"profile_dir": "p", "tensorboard_dir": "tb"}}) == {
        "checkpoint.save": str(run_dir / "checkpoints"), "logging.tensorboard_dir": str(run_dir / "tensorboard"),
        "logging.profile_dir": str(run_dir / "profile")}
    only_checkpoints = {"checkpoint.save": str(run_dir / "checkpoints")}
    assert run_directories(run_dir, {"logging": {"log_interval": 5}}) == only_checkpoints
