"""Decoding speed: dense vs PKM vs UltraMem of the same dense trunk, one new token per sequence per step.

    python benchmarks/decode.py [--batch-sizes 1,4,16,64] [--value-fraction 0.125] [--out docs/benchmarks/decode.json]

The paper's claim (Figure 1, section 1) is that UltraMem decodes almost as fast as the dense model of the same
activated parameters while it holds many times more parameters, because each token reads only its top-m values.
This benchmark measures it with umtrain's single-process model (`umtrain.model.reference.ReferenceGPT`, the model
`umtrain generate` decodes with) and its `DecodeCache` (attention keys and values, the memory layers' query-conv
history): for every model and batch size it prefills a random prompt, then times `--steps` decode steps of one
token per sequence. The models are the paper's 151M configurations (`configs/paper/`): Dense-151M, PKM-151M-x12
and UltraMem-151M-x12, randomly initialised (speed does not depend on training), with each memory table scaled
by `--value-fraction` (default 1/8 on CPU: the full x12 tables are 7.5 GB in float32; 1 on a GPU).

Time: the median over `--repeats` rounds of each step's time; in each round the models run back to back in an order
that rotates, so machine load drifts into every model alike. The table gives ms per decode step, tokens per
second and each model's step time over the dense model's in the same round (the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import machine, synchronize, torch_threads, write_result

from umtrain.config import load_config
from umtrain.model.accounting import count
from umtrain.model.reference import DecodeCache, ModelArgs, ReferenceGPT

CONFIGS = {"dense": "configs/paper/dense-151m.yaml", "pkm": "configs/paper/pkm-151m-x12.yaml",
           "ultramem": "configs/paper/ultramem-151m-x12.yaml"}
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dense,pkm,ultramem", help=f"a subset of {','.join(CONFIGS)}")
    p.add_argument("--batch-sizes", default="1,4,16,64", help="sequences decoded together")
    p.add_argument("--prompt-length", type=int, default=32, help="tokens prefilled before the timed steps")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    p.add_argument("--repeats", type=int, default=3, help="rounds")
    p.add_argument("--value-fraction", type=float, default=1.0 if cuda else 0.125,
                   help="each memory table's size relative to the paper's")
    p.add_argument("--num-layers", type=int, default=None, help="fewer blocks (memory placements must fit)")
    p.add_argument("--hidden-size", type=int, default=None, help="a narrower trunk (smoke runs)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16" if cuda else "float32")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads on CPU (default: torch's)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "decode.json")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    unknown = sorted(set(args.models) - set(CONFIGS))
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(CONFIGS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    repeated = sorted({b for b in args.batch_sizes if args.batch_sizes.count(b) > 1})
    if repeated:
        p.error(f"--batch-sizes: {repeated} given more than once (each size is one result row)")
    if not 0 < args.value_fraction <= 1:
        p.error(f"--value-fraction must be in (0, 1], got {args.value_fraction}")
    return args


def model_config(name: str, args: argparse.Namespace):
    """The paper's config of `name`, with the benchmark's overrides (validated like any run's)."""
    path = REPO / CONFIGS[name]
    paper = load_config(path, check_files=False).model
    overrides = []
    if args.num_layers is not None:
        overrides.append(f"model.num_layers={args.num_layers}")
    if args.hidden_size is not None:
        overrides += [f"model.hidden_size={args.hidden_size}", f"model.ffn_hidden_size={4 * args.hidden_size}"]
        if paper.has_memory and not paper.memory.output_projection:     # PKM: values are hidden-wide
            overrides.append(f"model.memory.value_dim={args.hidden_size}")
    if paper.has_memory and args.value_fraction != 1:
        side = max(round((paper.memory.num_values * args.value_fraction) ** 0.5), 1)
        overrides.append(f"model.memory.num_values={side * side}")
    return load_config(path, overrides, check_files=False)


def build_model(config, dtype: torch.dtype, device: torch.device) -> ReferenceGPT:
    vocab = config.model.vocab_size or config.data.mock_vocab_size
    model = ReferenceGPT(ModelArgs.from_config(config, vocab_size=vocab))
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def decode_step_times(model: ReferenceGPT, batch: int, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Seconds of each of `args.steps` one-token steps after a prefill of `args.prompt_length` tokens."""
    generator = torch.Generator().manual_seed(batch)
    vocab = model.args.vocab_size
    prompt = torch.randint(0, vocab, (batch, args.prompt_length), generator=generator).to(device)
    cache = DecodeCache()
    next_token = model(prompt, cache)[:, -1:].argmax(-1)
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        next_token = model(next_token, cache)[:, -1:].argmax(-1)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    configs = {name: model_config(name, args) for name in args.models}
    models = {}
    for name, config in configs.items():
        print(f"building {name} ...", flush=True)
        models[name] = build_model(config, dtype, device)
    step_ms: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    for batch in args.batch_sizes:
        for round_ in range(args.repeats + 1):                # round 0 warms up
            order = args.models[round_ % len(args.models):] + args.models[:round_ % len(args.models)]
            medians = {name: statistics.median(decode_step_times(models[name], batch, args, device)) for name in order}
            if round_ == 0:
                continue
            for name, seconds in medians.items():
                step_ms.setdefault((name, batch), []).append(1000 * seconds)
                if "dense" in medians:
                    ratios.setdefault((name, batch), []).append(seconds / medians["dense"])
    rows = []
    for name, batch in ((name, batch) for batch in args.batch_sizes for name in args.models):
        times = step_ms[name, batch]
        accounting = count(configs[name])
        ms = statistics.median(times)
        rows.append({"model": name, "batch": batch, "ms_per_step": ms, "tokens_per_s": 1000 * batch / ms,
                     "vs_dense": statistics.median(ratios[name, batch]) if (name, batch) in ratios else None,
                     "ms_per_step_rounds": times, "total_params": accounting.total_params,
                     "activated_params": accounting.activated_params,
                     "num_values": configs[name].model.memory.num_values if configs[name].model.has_memory else 0})
    return {"machine": {**machine(), "device": str(device)}, "dtype": args.dtype, "prompt_length": args.prompt_length,
            "steps": args.steps, "repeats": args.repeats, "value_fraction": args.value_fraction, "results": rows}


def print_table(result: dict) -> None:
    print(f"{'model':<10}{'batch':>6}{'ms/step':>10}{'tokens/s':>11}{'vs dense':>10}{'params M':>10}"
          f"{'activated M':>13}")
    for row in result["results"]:
        ratio = "" if row["vs_dense"] is None else f"{row['vs_dense']:.2f}x"
        print(f"{row['model']:<10}{row['batch']:>6}{row['ms_per_step']:>10.2f}{row['tokens_per_s']:>11.1f}"
              f"{ratio:>10}{row['total_params'] / 1e6:>10.1f}{row['activated_params'] / 1e6:>13.1f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    with torch_threads(args.threads):
        result = run(args)
    print_table(result)
    return write_result(args.out, result, __file__, argv)


if __name__ == "__main__":
    main()
