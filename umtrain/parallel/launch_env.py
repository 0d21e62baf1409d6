"""Join the job of an srun step whose tasks run `umtrain` directly (`srun -n 8 umtrain train ...`, no torchrun).

torch.distributed's env:// rendezvous reads RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, which torchrun sets and
srun does not: srun gives each task SLURM_PROCID, SLURM_STEP_NUM_TASKS and SLURM_LOCALID instead. Without a mapping
every task would train alone as a 1-process job. When RANK and WORLD_SIZE are both unset and SLURM_STEP_NUM_TASKS
> 1 with SLURM_PROCID set, `join_srun_step` sets

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID,
    MASTER_ADDR = the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST; 127.0.0.1 on one node without
                  either),
    MASTER_PORT = MASTER_PORT_BASE + SLURM_JOB_ID mod MASTER_PORT_SPAN (the same on every task of the job),

keeping a MASTER_ADDR or MASTER_PORT already set. The step's variables, not the job's: a batch script's own shell
has SLURM_PROCID 0 and the job's SLURM_NTASKS, and `umtrain train --nproc-per-node 8` run there is one process.
Under torchrun (launch/torchrun.sh, one srun task per node) the workers have RANK and WORLD_SIZE, and nothing is
changed. Two concurrent multi-task steps of one job on the same node would share the derived port: give one of them
its own MASTER_PORT.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Mapping, MutableMapping, Optional

from umtrain.config import ConfigError

logger = logging.getLogger("umtrain")

MASTER_PORT_BASE = 10000
MASTER_PORT_SPAN = 20000   # ports 10000-29999: unprivileged, below Linux's ephemeral range (32768-60999)
_BRACKET = re.compile(r"\[([0-9][^\[\]]*)\]")   # a range list: `[007-010,012]`
_HOST = re.compile(r"[A-Za-z0-9._-]+")


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist, compressed or not: `gpu-[007-010,012],cpu1` -> `gpu-007` (zero padding
    kept), `rack[1-2]-n[01-04]` -> `rack1-n01`."""
    host = _BRACKET.sub(lambda ranges: ranges.group(1).split(",")[0].split("-")[0], _first_entry(nodelist.strip()))
    if not _HOST.fullmatch(host):
        raise ValueError(f"not a Slurm hostlist: {nodelist!r}")
    return host


def _first_entry(nodelist: str) -> str:
    """The text before the first comma outside brackets."""
    depth = 0
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            return nodelist[:i]
    return nodelist


def master_port_for(job_id: str) -> int:
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def is_srun_step_task(environ: Mapping[str, str]) -> bool:
    """A task of an srun step of several tasks, started without torchrun (which sets RANK and WORLD_SIZE)."""
    unlaunched = "RANK" not in environ and "WORLD_SIZE" not in environ
    return unlaunched and "SLURM_PROCID" in environ and int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def srun_step_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The launcher variables to set for a task of an srun step (see the module docstring); empty when `environ`
    is not such a task."""
    if not is_srun_step_task(environ):
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = _master_addr(environ)
    if "MASTER_PORT" not in environ:
        if "SLURM_JOB_ID" not in environ:
            raise ConfigError("SLURM_JOB_ID", "an srun step without SLURM_JOB_ID: set MASTER_PORT on every task")
        env["MASTER_PORT"] = str(master_port_for(environ["SLURM_JOB_ID"]))
    return env


def _master_addr(environ: Mapping[str, str]) -> str:
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if environ.get(name):
            try:
                return first_host(environ[name])
            except ValueError as err:
                raise ConfigError(name, str(err)) from None
    if environ.get("SLURM_STEP_NUM_NODES", "1") == "1":
        return "127.0.0.1"
    raise ConfigError("SLURM_STEP_NODELIST", "an srun step on several nodes without a node list: set MASTER_ADDR "
                                             "(the first node's address) on every task")


def join_srun_step(nproc_per_node: Optional[int], environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set the launcher variables of this srun step's task in `environ` (once, before the config is checked against
    the world size); whether it was such a task. `--nproc-per-node` would start a second world inside it."""
    env = srun_step_env(environ)
    if not env:
        return False
    if nproc_per_node:
        raise ConfigError("--nproc-per-node", f"this is one of the {environ['SLURM_STEP_NUM_TASKS']} tasks of an srun step, "
                                              f"which are the processes: omit --nproc-per-node (or run launch/"
                                              f"torchrun.sh as one task per node)")
    environ.update(env)
    if env["RANK"] == "0":
        logger.info("world of %s processes from SLURM (srun step tasks, SLURM_PROCID -> RANK); rendezvous at %s:%s",
                    env["WORLD_SIZE"], environ["MASTER_ADDR"], environ["MASTER_PORT"])
    return True
