"""`umtrain demo-data`, `umtrain preprocess` and `umtrain train-tokenizer`.

The handlers import their modules lazily: importing megatron.core takes seconds, `umtrain --help` should not.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

from umtrain.data.formats import FORMATS

DEMO_TOKENIZER = "tokenizer.model"
DEMO_BLEND = "blend.txt"
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
INPUT_HELP = f"files or globs ({', '.join(FORMATS)})"


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_demo_data(subparsers)
    _register_preprocess(subparsers)
    _register_train_tokenizer(subparsers)


def _register_demo_data(subparsers) -> None:
    p = subparsers.add_parser(
        "demo-data", help="build the offline demo corpus (Python's own documentation), tokenizer and indexed data",
        description="Writes OUT/jsonl/<source>.jsonl, OUT/tokenizer.model (SentencePiece), "
                    "OUT/<source>_text_document.bin/.idx per source and OUT/blend.txt (weights by token count).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo dataset in --out")
    p.set_defaults(func=_reports_data_errors(demo_data))


def _register_preprocess(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess", help="tokenise JSONL/Parquet shards into Megatron's indexed dataset (.bin/.idx)",
        description="Every record's --text-key becomes one document of OUTPUT_PREFIX.bin/.idx, in input order.")
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    p.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface"], required=True)
    p.add_argument("--tokenizer-model", required=True, help="a SentencePiece .model or a tokenizer.json")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    p.add_argument("--text-key", default="text")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false",
                   help="do not end each document with the end-of-document token")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_reports_data_errors(preprocess_command))


def _register_train_tokenizer(subparsers) -> None:
    p = subparsers.add_parser("train-tokenizer", help="train a SentencePiece or byte-level BPE tokenizer on a corpus")
    p.add_argument("--input", nargs="+", required=True, help=INPUT_HELP)
    p.add_argument("--output", required=True, help="OUTPUT.model (sentencepiece) or a tokenizer.json path (bpe)")
    p.add_argument("--kind", choices=["sentencepiece", "bpe"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--text-key", default="text")
    p.add_argument("--overwrite", action="store_true", help="replace an existing tokenizer at --output")
    p.set_defaults(func=_reports_data_errors(train_tokenizer_command))


def _reports_data_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A bad record -> one line on stderr (file, line, what is wrong) and exit status 2, a dead worker -> one line
    and exit status 1, not a traceback. Configuration errors propagate to `umtrain.cli.main`, which reports them
    the same way."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from umtrain.data.preprocess import WorkerDied
        from umtrain.data.readers import DataInputError

        try:
            return handler(args)
        except DataInputError as err:
            print(f"umtrain: input error: {err}", file=sys.stderr)
            return 2
        except WorkerDied as err:
            print(f"umtrain: error: {err}", file=sys.stderr)
            return 1

    return wrapped


def demo_data(args: argparse.Namespace) -> int:
    from umtrain.data.demo_corpus import SOURCES, build_demo_corpus
    from umtrain.data.preprocess import preprocess
    from umtrain.data.tokenizer import train_tokenizer

    out = Path(args.out).resolve()
    _refuse_existing_demo(out, SOURCES, args.overwrite)
    jsonl_files = build_demo_corpus(str(out / "jsonl"))
    tokenizer = train_tokenizer([str(p) for p in jsonl_files], str(out / DEMO_TOKENIZER), "sentencepiece",
                                args.vocab_size, overwrite=args.overwrite)
    tokens = {}
    for source, path in zip(SOURCES, jsonl_files):
        stats = preprocess([str(path)], str(_demo_prefix(out, source)), "sentencepiece", tokenizer,
                           workers=args.workers, overwrite=args.overwrite)
        tokens[source] = stats["tokens"]
    blend = demo_blend(out, tokens)
    (out / DEMO_BLEND).write_text("\n".join(f"{w} {p}" for w, p in zip(blend[0::2], blend[1::2])) + "\n")
    for source in SOURCES:
        print(f"{source}: {tokens[source]} tokens -> {_demo_prefix(out, source)}.bin/.idx")
    print(f"tokenizer: {tokenizer}\nblend: {out / DEMO_BLEND}\n\ndata:\n"
          f"  tokenizer_type: sentencepiece\n  tokenizer_model: {tokenizer}\n  data_path: {json.dumps(blend)}")
    return 0


def demo_blend(out: Path, tokens: dict[str, int]) -> list[str]:
    """Megatron's flat blend list, each source weighted by its share of the tokens."""
    total = sum(tokens.values())
    blend = []
    for source, count in tokens.items():
        blend += [f"{count / total:.4f}", str(_demo_prefix(out, source))]
    return blend


def _demo_prefix(out: Path, source: str) -> Path:
    return out / f"{source}_text_document"


def _refuse_existing_demo(out: Path, sources: tuple[str, ...], overwrite: bool) -> None:
    from umtrain.config.base import ConfigError

    outputs = [out / DEMO_TOKENIZER, out / DEMO_BLEND] + [
        Path(f"{_demo_prefix(out, s)}{suffix}") for s in sources for suffix in (".bin", ".idx")]
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not overwrite:
        raise ConfigError(str(out), f"holds a demo dataset already ({existing[0]}, ...); pass --overwrite")


def preprocess_command(args: argparse.Namespace) -> int:
    from umtrain.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                       workers=args.workers, text_key=args.text_key, append_eod=args.append_eod,
                       overwrite=args.overwrite)
    print(json.dumps(stats))
    return 0


def train_tokenizer_command(args: argparse.Namespace) -> int:
    from umtrain.data.tokenizer import load_tokenizer, train_tokenizer

    path = train_tokenizer(args.input, args.output, args.kind, args.vocab_size, text_key=args.text_key,
                           overwrite=args.overwrite)
    tokenizer = load_tokenizer("sentencepiece" if args.kind == "sentencepiece" else "huggingface", path)
    print(f"wrote {path} (vocab_size={tokenizer.vocab_size}, eod={tokenizer.eod})")
    return 0
