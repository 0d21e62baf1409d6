"""The command line registers every subcommand it lists."""

from __future__ import annotations

import importlib

from umtrain.cli.main import COMMAND_MODULES, build_parser


def test_every_listed_command_module_exists_and_registers():
    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(f"umtrain.cli.{name}").register), name
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in ("train", "evaluate", "sweep", "demo-data", "preprocess", "count", "plan", "convert", "generate"):
        assert command in commands, command
