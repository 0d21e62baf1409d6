"""Shared pieces of the checkpoint tests: tiny configs, in-process workers, a CLI launcher, tree snapshots."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state

from tests.distributed import tiny_config
from umtrain.config import config_from_dict
from umtrain.parallel.comm import run_local_group

REPO = Path(__file__).resolve().parents[2]
FIXED_BATCH = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

ULTRAMEM = {"family": "ultramem", "num_layers": 4, "hidden_size": 64, "num_attention_heads": 4,
            "memory": {"placements": ["2:3"], "num_values": 64, "value_dim": 32, "key_dim": 16, "num_heads": 2,
                       "topk": 4, "ive_expansion": 4, "tucker_rank": 2, "num_cores": 2,
                       "lookup_impl": "reference"}}


def run_config(iters: int, tp: int = 1, pp: int = 1, save: str | None = None, model: dict | None = None,
               parallel: dict | None = None, **checkpoint) -> dict:
    """A tiny run of `iters` steps (checkpoint section: save=..., save_interval=..., load=...; `parallel`: more
    keys of the parallel section)."""
    sections = dict(parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, **(parallel or {})},
                    training={"train_iters": iters, "eval_interval": 1000},
                    checkpoint={"save": save, **checkpoint})
    if model is not None:
        sections["model"] = model
    return tiny_config(**sections)


def fixed_batch_logits(trainer) -> torch.Tensor:
    """Full-vocabulary logits of FIXED_BATCH (PP=1 layouts), identical on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    model = trainer.model[0]
    model.eval()
    with torch.no_grad():
        positions = torch.arange(FIXED_BATCH.shape[1]).expand_as(FIXED_BATCH)
        logits = model(FIXED_BATCH, positions, None)
        logits = gather_from_tensor_model_parallel_region(logits)
    model.train()
    return logits[..., : trainer.tokenizer.vocab_size].clone()


class StopAt:
    """Stands in for the PreemptionHandler: 'preempts' the run once it reaches `iteration` (same config, same
    save-and-exit path as a real signal)."""

    def __init__(self, trainer, iteration: int):
        self.trainer, self.iteration = trainer, iteration

    def requested(self) -> bool:
        return self.trainer.iteration >= self.iteration

    def restore(self) -> None:
        """The stand-in installed no signal handler: nothing to give back."""


def trainer_worker(rank: int, world_size: int, config_dict: dict, logits: bool = False,
                   preempt_at: int | None = None) -> dict:
    """Build a Trainer (which resumes), train, report; with `logits`, fixed-batch logits before and after."""
    from umtrain.checkpoint import Preempted
    from umtrain.train.trainer import Trainer

    torch.set_num_threads(1)  # as torchrun's workers (and launch_cli's): reductions then sum in the same order
    trainer = Trainer(config_from_dict(config_dict, world_size=world_size))
    if preempt_at is not None:
        trainer.preemption = StopAt(trainer, preempt_at)
    try:
        result = {"start": trainer.iteration, "logits": fixed_batch_logits(trainer) if logits else None,
                  "preempted": False}
        try:
            trainer.train()
        except Preempted as stop:
            result["preempted"] = "saved" if stop.saved else "not saved"
        result["loss"] = trainer.history.loss
        result["final_logits"] = fixed_batch_logits(trainer) if logits else None
        return result
    finally:
        parallel_state.destroy_model_parallel()


def train(config_dict: dict, world_size: int, logits: bool = False, preempt_at: int | None = None) -> dict:
    """Rank 0's report (every rank agrees on the losses)."""
    return run_local_group(trainer_worker, world_size, config_dict, logits, preempt_at)[0]


def launch_cli(tmp_path: Path, config_dict: dict, nproc: int, *extra: str) -> subprocess.Popen:
    """`umtrain train --nproc-per-node N` in its own session (so tests can signal its workers). Tests launch through
    the `launch_cli` fixture (tests/checkpoint/conftest.py), which kills the session whatever the test's outcome."""
    config_path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    config_path.write_text(yaml.safe_dump(config_dict))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "umtrain.cli.main", "train", "--config", str(config_path),
               "--nproc-per-node", str(nproc), *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a `launch_cli` session still running (launcher and workers) and reap the launcher."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def saved_losses(checkpoint_dir: Path) -> list[float]:
    """The per-step losses recorded in a checkpoint (the history the run had when it saved)."""
    common = torch.load(checkpoint_dir / "common.pt", weights_only=False)
    return common["history"]["loss"]


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under root (to prove nothing was touched), but for the save
    directory's lock file, which every run that saves there rewrites with its pid."""
    from umtrain.checkpoint.manager import LOCK

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}
