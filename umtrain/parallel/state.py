"""Process groups: torch.distributed and Megatron-Core's parallel_state, from the config and the environment."""

from __future__ import annotations

import datetime
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel

from umtrain.config import Config
from umtrain.parallel import cpu_compat
from umtrain.parallel.sequence import destroy_memory_sequence_group, ensure_memory_sequence_group


PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    ep: int

    @property
    def is_logging_rank(self) -> bool:
        """The last pipeline stage's first rank: it sees the loss."""
        return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
                and parallel_state.get_data_parallel_rank() == 0)


def resolve_backend(name: str) -> str:
    """`auto`: NCCL where there is a GPU, gloo otherwise."""
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return name


def backend_for(config: Config) -> str:
    return resolve_backend(config.parallel.distributed_backend)


def local_device_index() -> int:
    """This process's GPU: LOCAL_RANK among the visible devices (torchrun's workers see all of the node's; an srun
    task bound to its own GPU, `--gpus-per-task 1`, sees one, as device 0)."""
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


def initialize_distributed(config: Config) -> Layout:
    """Init torch.distributed (env:// from torchrun or an srun step, see `launch_env`; or a 1-process group) and
    Megatron's parallel state."""
    cpu_compat.apply()
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + random.Random(os.getpid()).randint(0, 2000)))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device_index())
        torch.distributed.init_process_group(backend=backend_for(config), timeout=PROCESS_GROUP_TIMEOUT)
    p = config.parallel
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=1 if p.memory_parallel_group == "tensor_data" else None,
        )
    if p.sequence_parallel and config.model.has_memory:
        ensure_memory_sequence_group(PROCESS_GROUP_TIMEOUT)
    return Layout(
        world_size=torch.distributed.get_world_size(),
        rank=torch.distributed.get_rank(),
        tp=p.tensor_model_parallel_size,
        pp=p.pipeline_model_parallel_size,
        dp=parallel_state.get_data_parallel_world_size(),
        ep=p.expert_model_parallel_size,
    )


@contextmanager
def process_group_of_one() -> Iterator[None]:
    """A 1-process gloo group for one-process work that goes through torch.distributed (`dist_checkpointing` reads
    and writes, the barriers of Megatron's dataset builder): made if none exists, and then destroyed on exit; a
    group that exists is used and kept."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python and NumPy seeded alike on every rank; torch's dropout streams distinct per pipeline stage (`seed + 100
    x stage`, as Megatron-LM: the stages would otherwise draw the same masks for different layers) and per TP rank
    (Megatron's RNG tracker). Weights do not depend on it: they come from per-parameter generators."""
    random.seed(seed)
    np.random.seed(seed)
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    destroy_memory_sequence_group()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
