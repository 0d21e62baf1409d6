"""`umtrain generate`: greedy or top-k sampling from a portable checkpoint on one process (no Megatron)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a portable checkpoint (umtrain convert --to portable)")
    p.add_argument("checkpoint", help="portable checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer model (default: the checkpoint config's data.tokenizer_model)")
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
    against the cached keys and values of the tokens before it (`DecodeCache`). Once the sequence is longer than
    `context` (the trained sequence length), every token is predicted from the last `context` tokens afresh."""
    from umtrain.model.reference import DecodeCache

    out = list(tokens)
    cache, pending = DecodeCache(), out[-context:]
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([pending]), cache)[0, -1, :vocab_size].float()
        if top_k:
            values, indices = torch.topk(logits / temperature, min(top_k, logits.numel()))
            choice = int(indices[torch.multinomial(values.softmax(-1), 1, generator=generator)])
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
    if args.temperature is not None and args.temperature <= 0:
        return f"--temperature must be > 0 when sampling (--top-k {args.top_k}), got {args.temperature}"
    if not args.prompt:
        return "--prompt is empty: give at least one character to continue"
    return None


def run(args: argparse.Namespace) -> int:
    from umtrain.checkpoint.convert import is_portable, load_portable, portable_tokenizer
    from umtrain.data.tokenizer import load_tokenizer

    problem = argument_problem(args)
    if problem is None and not is_portable(Path(args.checkpoint)):
        problem = (f"{args.checkpoint} is not a portable checkpoint (convert it first: umtrain convert "
                   f"{args.checkpoint} OUT --to portable)")
    if problem:
        print(f"umtrain generate: {problem}", file=sys.stderr)
        return 2
    model, config = load_portable(args.checkpoint)
    path = args.tokenizer or portable_tokenizer(Path(args.checkpoint)) or config.data.tokenizer_model
    if path is None or not Path(path).exists():
        named = f"names {path}, which is not here" if path else "names no tokenizer"
        print(f"umtrain generate: the checkpoint carries no tokenizer and its config {named}; pass --tokenizer",
              file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(config.data.tokenizer_type, path)
    prompt = tokenizer.tokenize(args.prompt)
    temperature = 1.0 if args.temperature is None else args.temperature
    ids = generate(model, prompt, args.max_new_tokens, config.data.seq_length, args.top_k, temperature,
                   torch.Generator().manual_seed(args.seed), tokenizer.vocab_size, tokenizer.eod)
    print(tokenizer.detokenize(ids))
    return 0
