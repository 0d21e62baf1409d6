"""`umtrain train`: validate the config, launch the processes (or join torchrun's or an srun step's), train."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from umtrain.cli.main import positive_int
from umtrain.config import ConfigError, dump_config, load_config
from umtrain.parallel.launch_env import join_srun_step


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a model (dense, MoE, PKM or UltraMem)")
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. training.train_iters=10")
    p.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="spawn this many local processes (torchrun --standalone); omit under torchrun/SLURM")
    p.add_argument("--resume", metavar="PATH", help="start from this checkpoint or checkpoint directory (sets "
                   "checkpoint.load; once checkpoint.save holds a checkpoint, the run continues from its latest)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and exit (the layout is checked for --nproc-per-node N processes, "
                        "or for the launched job's; without either, not)")
    p.set_defaults(func=run)


def world_size_from(args) -> int:
    """The processes of the job this one joins (torchrun's or an srun step's, see `join_srun_step`), or the ones
    --nproc-per-node will start."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return args.nproc_per_node or 1


def run(args) -> int:
    join_srun_step(args.nproc_per_node)
    if args.resume:
        args.overrides = [*args.overrides, f"checkpoint.load={json.dumps(args.resume)}"]   # a quoted YAML string
    world_size_given = bool(args.nproc_per_node) or "WORLD_SIZE" in os.environ
    world_size = world_size_from(args) if world_size_given or not args.dry_run else None
    config = load_config(args.config, args.overrides, world_size=world_size)
    check_start_checkpoint_exists(config)
    if args.dry_run:
        print(dump_config(config), end="")
        if world_size is None:
            print("umtrain: the layout was not checked against a world size: pass --nproc-per-node N to check it "
                  "for N processes", file=sys.stderr)
        return 0
    if args.nproc_per_node and args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch_local(args)
    from umtrain.train.entry import train

    return train(config)


def check_start_checkpoint_exists(config) -> None:
    """A `checkpoint.load` (`--resume`) that does not exist, refused before any process starts; unless
    `checkpoint.save` holds checkpoints already: the run then continues from those and never reads `load` (a requeued
    job whose `--resume` source was cleaned up since must still start)."""
    from umtrain.checkpoint.manager import list_checkpoints

    c = config.checkpoint
    if c.load and not Path(c.load).exists() and not (c.save and list_checkpoints(Path(c.save))):
        raise ConfigError("checkpoint.load", f"{c.load} does not exist")


def launch_local(args) -> int:
    """Re-run this command under torchrun with N local processes."""
    from umtrain.checkpoint.launch import run_local

    return run_local(args.nproc_per_node, ["train", "--config", args.config, *args.overrides])
