"""`umtrain generate`: greedy or top-k sampling from a portable checkpoint on one process (no Megatron)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from umtrain.config import Config, ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a portable checkpoint (umtrain convert --to portable)")
    p.add_argument("checkpoint", help="portable checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", default=None,
                   help="a SentencePiece .model, or a Hugging Face tokenizer.json or its directory (default: the one "
                        "the checkpoint ships, else its config's data.tokenizer_model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs (default: cuda when available, else cpu)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--top-k", type=int, default=0, help="0: greedy")
    p.add_argument("--temperature", type=float, default=None, help="for sampling (needs --top-k > 0; default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


@torch.no_grad()
def generate(model: torch.nn.Module, tokens: list[int], max_new_tokens: int, context: int, top_k: int = 0,
             temperature: float = 1.0, generator: Optional[torch.Generator] = None, vocab_size: Optional[int] = None,
             eod: Optional[int] = None) -> list[int]:
    """Sample `max_new_tokens` after `tokens`; greedy when top_k is 0. Each new token runs through the model alone,
    against the cached keys and values of the tokens before it (`DecodeCache`), on the model's device; sampling runs
    on CPU, so a seed draws the same tokens on any device. Once the sequence is longer than
    `context` (the trained sequence length), every token is predicted from the last `context` tokens afresh."""
    from umtrain.model.reference import DecodeCache

    device = next(model.parameters()).device
    out = list(tokens)
    cache, pending = DecodeCache(), out[-context:]
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([pending], device=device), cache)[0, -1, :vocab_size].float().cpu()
        if top_k:
            values, indices = torch.topk(logits, min(top_k, logits.numel()))
            # Shifted before the division, in float64 (a float32 temperature below 1e-45 is 0): with a tiny
            # temperature the largest stays 0 and the rest go to -inf (greedy), where logits / temperature would
            # overflow to inf - inf = nan.
            probabilities = ((values.double() - values[0].double()) / temperature).softmax(-1)
            choice = int(indices[torch.multinomial(probabilities, 1, generator=generator)])
        else:
            choice = int(logits.argmax())
        out.append(choice)
        if choice == eod:
            break
        if cache.length < context:
            pending = [choice]
        else:
            cache, pending = DecodeCache(), out[-context:]
    return out


def argument_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the sampling arguments, checked before the checkpoint is loaded."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if args.top_k < 0:
        return f"--top-k must be >= 0 (0: greedy), got {args.top_k}"
    if args.temperature is not None and not args.top_k:
        return "--temperature applies to sampling only: pass --top-k K too (--top-k 0, the default, is greedy)"
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        return (f"--temperature must be a finite number > 0 when sampling (--top-k {args.top_k}), "
                f"got {args.temperature}")
    if not args.prompt:
        return "--prompt is empty: give at least one character to continue"
    return device_problem(args.device)


def device_problem(name: str) -> Optional[str]:
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {name}: this machine has no CUDA device (use --device cpu)"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` is not a portable checkpoint `generate` can read; None when it is one."""
    from umtrain.checkpoint.convert import config_of, is_portable, read_megatron_common, resolve_megatron

    if not path.exists():
        return f"{path} does not exist"
    if is_portable(path):
        return None
    try:
        family = config_of(read_megatron_common(resolve_megatron(path))["config"]).model.family
    except (OSError, KeyError, ConfigError):           # no Megatron checkpoint either: the hint below
        family = None
    if family == "moe":
        return (f"{path} is a Megatron checkpoint of a MoE model: MoE models cannot be decoded (they convert to no "
                "portable form)")
    return f"{path} is not a portable checkpoint (convert it first: umtrain convert {path} OUT --to portable)"


def tokenizer_path(args: argparse.Namespace, config: Config) -> tuple[Optional[Path], str]:
    """The tokenizer to use: --tokenizer when given, else the one the checkpoint ships, else its config's
    data.tokenizer_model; (None, what was tried) when none of them is here."""
    from umtrain.checkpoint.convert import TOKENIZER_DIR, portable_tokenizer

    if args.tokenizer is not None:
        path = Path(args.tokenizer)
        return (path, "") if path.exists() else (None, f"--tokenizer {path} does not exist")
    shipped = portable_tokenizer(Path(args.checkpoint))
    if shipped is not None:
        return shipped, ""
    configured = config.data.tokenizer_model
    if configured and Path(configured).exists():
        return Path(configured), ""
    named = f"names {configured}, which is not here" if configured else "names no tokenizer"
    return None, (f"no tokenizer: the checkpoint ships none in {Path(args.checkpoint) / TOKENIZER_DIR} and its "
                  f"config {named}; pass --tokenizer")


def run(args: argparse.Namespace) -> int:
    from umtrain.checkpoint.convert import load_portable, tokenizer_type_of
    from umtrain.data.tokenizer import load_tokenizer

    problem = argument_problem(args) or checkpoint_problem(Path(args.checkpoint))
    if problem:
        print(f"umtrain generate: {problem}", file=sys.stderr)
        return 2
    model, config = load_portable(args.checkpoint)
    path, problem = tokenizer_path(args, config)
    if path is None:
        print(f"umtrain generate: {problem}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(tokenizer_type_of(path, config.data.tokenizer_type), str(path))
    rows = model.tok_embeddings.num_embeddings
    if tokenizer.vocab_size > rows:
        print(f"umtrain generate: --tokenizer: {path} has {tokenizer.vocab_size} tokens, the model's vocabulary "
              f"{rows}: it was trained with another tokenizer", file=sys.stderr)
        return 2
    prompt = tokenizer.tokenize(args.prompt)
    temperature = 1.0 if args.temperature is None else args.temperature
    ids = generate(model.to(args.device), prompt, args.max_new_tokens, config.data.seq_length, args.top_k,
                   temperature, torch.Generator().manual_seed(args.seed), tokenizer.vocab_size, tokenizer.eod)
    print(tokenizer.detokenize(ids))
    return 0
