"""`umtrain evaluate`: validation or test loss and perplexity of a checkpoint, under any parallel layout."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from umtrain.cli.main import positive_int
from umtrain.cli.train import world_size_from
from umtrain.config import ConfigError
from umtrain.parallel.launch_env import join_srun_step
from umtrain.train.evaluation import (SPLITS, Evaluation, check_split_has_data, checkpoint_to_evaluate,
                                      evaluation_config)


def register(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="loss and perplexity of a checkpoint on the validation or test split")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint (iter_N) or checkpoint directory (its latest); any layout it was saved with")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the config.yaml saved in the checkpoint)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. parallel.tensor_model_parallel_size=2")
    p.add_argument("--split", choices=SPLITS, default="valid", help="data split to evaluate (default: valid)")
    p.add_argument("--iters", type=int, default=None,
                   help="global batches to evaluate (default: training.eval_iters, the training run's validation)")
    p.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="spawn this many local processes (torchrun --standalone); omit under torchrun/SLURM")
    p.add_argument("--json", metavar="OUT.json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    join_srun_step(args.nproc_per_node)
    checkpoint = checkpoint_to_evaluate(args.checkpoint)
    config = evaluation_config(checkpoint, args.config, args.overrides, world_size_from(args), args.iters)
    check_split_has_data(config, args.split)
    if args.json is not None and not Path(args.json).parent.is_dir():
        raise ConfigError("--json", f"the directory of {args.json} does not exist")
    if args.json is not None and Path(args.json).is_dir():
        raise ConfigError("--json", f"{args.json} is a directory; name the JSON file to write")
    if args.nproc_per_node and args.nproc_per_node > 1 and "LOCAL_RANK" not in os.environ:
        return launch_local(args, checkpoint)
    from umtrain.parallel.collectives import is_rank0
    from umtrain.parallel.state import destroy
    from umtrain.train.evaluation import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(config, args.split)
        if is_rank0():
            report(result, args.json)
    except ConfigError as err:
        if err.key != "checkpoint.load":
            raise
        raise ConfigError("--checkpoint", str(err).removeprefix(f"{err.key}: ")) from None   # the user's name for it
    finally:
        destroy()
    return 0


def report(result: Evaluation, json_path: str | None) -> None:
    print(f"{result.checkpoint} (iteration {result.iteration}), {result.split} split, {result.iters} batches, "
          f"{result.tokens:,} tokens: loss {result.loss:.6f} | perplexity {result.perplexity:.4f}", flush=True)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(asdict(result), indent=1) + "\n")


def launch_local(args, checkpoint: Path) -> int:
    """Re-run this command under torchrun with N local processes, on the checkpoint resolved here."""
    from umtrain.checkpoint.launch import run_local

    command = ["evaluate", "--checkpoint", str(checkpoint), "--split", args.split]
    for flag, value in (("--config", args.config), ("--iters", args.iters), ("--json", args.json)):
        if value is not None:
            command += [flag, str(value)]
    return run_local(args.nproc_per_node, [*command, *args.overrides])
