"""`umtrain convert`: Megatron checkpoints <-> portable (safetensors + YAML) <-> Hugging Face GPTNeoX."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint: megatron <-> portable <-> hf (dense models)",
        description="INPUT may be a Megatron checkpoint (a directory of iter_* checkpoints resolves to its "
                    "latest valid one), a portable checkpoint or a Hugging Face GPTNeoX directory. OUTPUT must "
                    "not exist. See docs/checkpoints.md.")
    p.add_argument("input", help="checkpoint to read")
    p.add_argument("output", help="directory to write (must not exist)")
    p.add_argument("--to", required=True, choices=("portable", "hf", "megatron"), help="form to write")
    p.add_argument("--config", default=None,
                   help="umtrain YAML for a Hugging Face input without an exported umtrain config")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from umtrain.checkpoint.convert import convert

    try:
        out = convert(args.input, args.output, to=args.to, config_path=args.config)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"umtrain convert: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.to} checkpoint {out}")
    return 0
