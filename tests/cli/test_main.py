"""The command line: every listed subcommand registers, counts are positive, top-1 MoE routing trains."""

from __future__ import annotations

import importlib
import math

import pytest
import yaml

from umtrain.cli import plan
from umtrain.cli.main import COMMAND_MODULES, build_parser, main, positive_int
from umtrain.config import load_config
from umtrain.parallel.comm import free_port


def test_every_listed_command_module_exists_and_registers():
    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(f"umtrain.cli.{name}").register), name
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("train", "evaluate", "sweep", "demo-data", "preprocess", "count", "plan", "convert", "generate"):
        assert command in commands, command


@pytest.mark.parametrize("command", [["train", "--config", "c.yaml"], ["evaluate", "--checkpoint", "ckpt"],
                                     ["sweep", "--config", "c.yaml", "--out", "out"]])
@pytest.mark.parametrize("count", ["0", "-2"])
def test_nproc_per_node_must_be_positive(command, count, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--nproc-per-node", count])
    assert info.value.code == 2
    assert f"--nproc-per-node: must be >= 1, got {count}" in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--nproc-per-node", "3"]).nproc_per_node == 3


def test_positive_int_is_the_one_shared_type():
    commands = build_parser()._subparsers._group_actions[0].choices
    for command, dest in (("train", "nproc_per_node"), ("evaluate", "nproc_per_node"), ("sweep", "nproc_per_node"),
                          ("calibrate-comm", "iters")):
        (action,) = [a for a in commands[command]._actions if a.dest == dest]
        assert action.type is positive_int, command
    assert plan.positive_int is positive_int


MOE_TOP1 = {"run_name": "moe-top1", "data": {"mock": True, "seq_length": 16},
            "model": {"family": "moe", "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                      "moe": {"num_experts": 4, "moe_router_topk": 1}},
            "training": {"micro_batch_size": 2, "global_batch_size": 2, "train_iters": 2, "eval_iters": 0},
            "logging": {"log_interval": 1, "progress_bar": False}}


@pytest.mark.parametrize("topk", [1, 2])
def test_top1_routing_applies_the_softmax_before_the_top_k(topk):
    """Megatron-Core refuses top-1 without it: a softmax over the one selected logit is 1, with no router gradient."""
    from umtrain.model.gpt import transformer_config

    config = load_config(None, ["data.mock=true", "model.family=moe", f"model.moe.moe_router_topk={topk}"])
    assert transformer_config(config).moe_router_pre_softmax == (topk == 1)


def test_a_top1_moe_model_trains_two_steps_in_one_process(tmp_path, monkeypatch, capsys):
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(MOE_TOP1))
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--config", str(path)]) == 0
    steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].split()[1] for line in steps] == ["1/2", "2/2"]
    assert all(math.isfinite(float(line.split("|")[1].split()[1])) for line in steps)


def test_a_resume_path_that_does_not_exist_is_refused_before_any_process_starts(tmp_path, capsys):
    """Refused in the launching process (no torchrun, no save directory made), unless the save directory holds
    checkpoints already: a requeued run continues from those and never reads `--resume` (`--dry-run` stops it
    there)."""
    save, missing = tmp_path / "run", tmp_path / "gone"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"mock": True}, "checkpoint": {"save": str(save)}}))
    assert main(["train", "--config", str(config), "--nproc-per-node", "2", "--resume", str(missing)]) == 2
    assert capsys.readouterr().err == f"umtrain: configuration error: checkpoint.load: {missing} does not exist\n"
    assert not save.exists()
    (save / "iter_0000004").mkdir(parents=True)
    assert main(["train", "--config", str(config), "--resume", str(missing), "--dry-run"]) == 0
