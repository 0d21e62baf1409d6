"""Checkpoint save / load time and bytes written, synchronous vs asynchronous, on one process.

    python benchmarks/checkpoint_io.py [--hidden 768 --layers 8 --vocab 32768] [--dir /tmp/umtrain-ckpt-bench]

Builds the Trainer (AdamW, distributed optimizer) for a dense GPT, takes one training step so that the Adam states
exist, then times two saves per mode: synchronous (returns when published) and asynchronous (the time `save()`
blocks training, and the time until it is published); then a resume (load + verification) and the manifest check
alone. Bytes are the files of one checkpoint.
Results (JSON, with the command, date and machine) go to stdout; docs/checkpoints.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import with_provenance


def build_trainer(args, save: Path, async_save: bool):
    from umtrain.config import config_from_dict
    from umtrain.train.trainer import Trainer

    config = config_from_dict({
        "model": {"family": "dense", "num_layers": args.layers, "hidden_size": args.hidden,
                  "num_attention_heads": args.hidden // 64, "make_vocab_size_divisible_by": 128},
        "data": {"mock": True, "seq_length": 128, "mock_vocab_size": args.vocab},
        "training": {"micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1, "eval_iters": 1},
        "checkpoint": {"save": str(save), "async_save": async_save, "keep_last": 10},
        "logging": {"progress_bar": False, "memory_stats": False},
    }, world_size=1)
    return Trainer(config)


def timed_save(trainer) -> dict[str, float]:
    start = time.perf_counter()
    trainer.checkpointer.save(trainer)
    blocking = time.perf_counter() - start
    trainer.checkpointer.finalize()
    return {"blocking_s": blocking, "published_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--modes", default="sync,async", help="which saves to time, in this order")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args()

    from umtrain.checkpoint import Checkpointer, manager
    from umtrain.parallel.state import destroy

    scratch = Path(args.dir or tempfile.mkdtemp(prefix="umtrain-ckpt-bench-"))
    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    try:
        for mode in args.modes.split(","):
            async_save = mode == "async"
            save = scratch / mode
            trainer = build_trainer(args, save, async_save)
            trainer.train_step()
            params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
            results["parameters"] = params
            results["model_mb"] = params * 4 / 1e6
            timing = {}
            for iteration in (1, 2):        # the first save of a process also pays one-time set-up
                trainer.iteration = iteration
                timing[f"save{iteration}"] = timed_save(trainer)
            latest = save / manager.checkpoint_name(2)
            timing["bytes_written"] = manager.bytes_of(latest)
            timing["write_mb_per_s"] = timing["bytes_written"] / 1e6 / timing["save2"]["published_s"]
            start = time.perf_counter()
            Checkpointer(trainer.config).resume(trainer)   # a restarted run's: it resolves `latest` anew
            timing["load_s"] = time.perf_counter() - start
            start = time.perf_counter()
            manager.verification_error(latest)
            timing["verify_s"] = time.perf_counter() - start
            results[mode] = timing
            destroy()
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(with_provenance(results, __file__), indent=1))


if __name__ == "__main__":
    main()
