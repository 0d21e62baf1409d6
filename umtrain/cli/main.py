"""`umtrain` command line: one subcommand per job, each registered by its own module."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional

from umtrain.config import ConfigError

COMMAND_MODULES = ("train", "evaluate", "sweep", "data_commands", "count", "plan", "checkpoint_commands", "generate")


def positive_int(text: str) -> int:
    """argparse type of counts that must be >= 1 (processes, iterations)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="umtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = __import__(f"umtrain.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name != f"umtrain.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The subcommand's arguments; `key=value` overrides may also come after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or not all("=" in e and not e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        sys.stderr.write(f"umtrain: configuration error: {err}\n")   # one write: ranks' lines do not run together
        return 2


if __name__ == "__main__":
    sys.exit(main())
