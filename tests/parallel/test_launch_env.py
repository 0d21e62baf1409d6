"""The tasks of an srun step join one world: Slurm's hostlist, the SLURM_* -> RANK/WORLD_SIZE/MASTER_* mapping, the
`umtrain train` command under it, and two processes started with the SLURM variables only forming one TP=2 world."""

from __future__ import annotations

import logging
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.distributed import tiny_config
from umtrain.cli.main import main
from umtrain.config import ConfigError
from umtrain.parallel.launch_env import (MASTER_PORT_BASE, MASTER_PORT_SPAN, first_host, join_srun_step,
                                         master_port_for, srun_step_env)

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def srun_task(procid: int, ntasks: int = 2, **extra: str) -> dict[str, str]:
    """The variables srun gives task `procid` of a one-node step of job 5."""
    return {"SLURM_JOB_ID": "5", "SLURM_PROCID": str(procid), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_LOCALID": str(procid), "SLURM_STEP_NUM_NODES": "1", **extra}


@pytest.mark.parametrize("nodelist, host", [
    ("gpu-[007-010,012],cpu1", "gpu-007"),
    ("node7", "node7"),
    ("cpu1,gpu-[1-4]", "cpu1"),
    ("gpu[012,001-003]", "gpu012"),          # the first listed, not the smallest
    ("rack[2-3]-n[08-09]", "rack2-n08"),
    ("  n[1-2] ", "n1"),
    ("a.b-c1", "a.b-c1"),
])
def test_first_host_of_a_hostlist(nodelist, host):
    assert first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu-[]", "gpu[1-2", "gpu1-2]", "n 1", ",n1"])
def test_a_malformed_hostlist_is_refused(nodelist):
    with pytest.raises(ValueError, match="not a Slurm hostlist"):
        first_host(nodelist)


def test_a_task_of_a_step_maps_to_the_launcher_variables():
    env = srun_task(3, ntasks=8, SLURM_LOCALID="1", SLURM_STEP_NUM_NODES="2", SLURM_STEP_NODELIST="gpu-[007-008]",
                    SLURM_JOB_NODELIST="all-[1-9]", SLURM_JOB_ID="123456")
    assert srun_step_env(env) == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-007",
                                  "MASTER_PORT": str(10000 + 123456 % 20000)}


def test_the_job_nodelist_is_the_fallback_and_one_node_needs_none():
    assert srun_step_env(srun_task(0, SLURM_JOB_NODELIST="c[3-4]"))["MASTER_ADDR"] == "c3"
    assert srun_step_env(srun_task(0))["MASTER_ADDR"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST"):
        srun_step_env(srun_task(0, SLURM_STEP_NUM_NODES="2"))
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST: not a Slurm hostlist"):
        srun_step_env(srun_task(0, SLURM_STEP_NODELIST="gpu[1-"))


def test_a_master_address_or_port_already_set_wins():
    env = srun_step_env(srun_task(1, MASTER_ADDR="head", MASTER_PORT="29999", SLURM_STEP_NODELIST="n[1-2]"))
    assert env == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("environ", [
    {},                                                              # no SLURM
    srun_task(0, ntasks=1),                                          # a one-task step
    {k: v for k, v in srun_task(0).items() if k != "SLURM_PROCID"},  # not a task of a step
    {**srun_task(1, ntasks=4), "RANK": "5", "WORLD_SIZE": "16"},     # a torchrun worker inside an srun step
    {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_NNODES": "1"},  # a batch script's shell
])
def test_nothing_is_mapped_outside_a_several_task_step(environ):
    assert srun_step_env(environ) == {}
    assert join_srun_step(None, environ) is False


def test_the_job_id_gives_every_task_one_unprivileged_port():
    ports = {master_port_for(str(job)) for job in (0, 1, 19999, 20000, 10**9 + 7)}
    assert all(MASTER_PORT_BASE <= p < MASTER_PORT_BASE + MASTER_PORT_SPAN for p in ports) and min(ports) > 1023
    assert master_port_for("77") == master_port_for("77") != master_port_for("78")


def test_join_sets_the_variables_once_and_rank0_logs_it(caplog):
    environ = srun_task(0)
    with caplog.at_level(logging.INFO, logger="umtrain"):
        assert join_srun_step(None, environ) is True
    assert {k: environ[k] for k in LAUNCHER_VARS} == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "10005"}
    assert [r.getMessage() for r in caplog.records] == [
        "world of 2 processes from SLURM (srun step tasks, SLURM_PROCID -> RANK); rendezvous at 127.0.0.1:10005"]
    assert join_srun_step(None, environ) is False                    # RANK is set now: a second call is a no-op


def test_nproc_per_node_inside_a_step_is_refused():
    environ = srun_task(1)
    with pytest.raises(ConfigError, match="--nproc-per-node: this is one of the 2 tasks of an srun step"):
        join_srun_step(2, environ)
    assert environ == srun_task(1)


@pytest.fixture
def srun_task_env(monkeypatch):
    """This process as task 1 of a 2-task step: SLURM's variables, none of the launcher's (restored afterwards)."""
    for name in [*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.setenv(name, "")   # recorded, so that the values the command sets are undone
        monkeypatch.delenv(name)
    for name, value in srun_task(1).items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def tp2_yaml(tmp_path) -> Path:
    path = tmp_path / "tp2.yaml"
    config = tiny_config(training={"train_iters": 2, "global_batch_size": 2, "micro_batch_size": 1, "eval_iters": 0},
                         parallel={"tensor_model_parallel_size": 2})
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_under_an_srun_step_validates_against_the_step_world(srun_task_env, tp2_yaml, capsys):
    assert main(["train", "--config", str(tp2_yaml), "--dry-run"]) == 0
    assert "tensor_model_parallel_size: 2" in capsys.readouterr().out
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("1", "2")


def test_train_with_nproc_per_node_in_an_srun_step_is_an_error(srun_task_env, tp2_yaml, capsys):
    assert main(["train", "--config", str(tp2_yaml), "--nproc-per-node", "2", "--dry-run"]) == 2
    assert "configuration error: --nproc-per-node: this is one of the 2 tasks" in capsys.readouterr().err
    assert "RANK" not in os.environ


def test_evaluate_joins_the_step_too(srun_task_env, capsys):
    assert main(["evaluate", "--checkpoint", "/nonexistent", "--nproc-per-node", "2"]) == 2
    assert "configuration error: --nproc-per-node: this is one of the 2 tasks" in capsys.readouterr().err


def free_job_id() -> str:
    """A SLURM_JOB_ID whose derived port is free here now."""
    while True:
        job_id = str(random.randrange(10**6))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", master_port_for(job_id)))
                return job_id
            except OSError:
                continue


@pytest.mark.slow
def test_two_srun_tasks_form_one_tp2_world(tp2_yaml, tmp_path):
    from umtrain.checkpoint.convert import read_megatron_common
    from umtrain.checkpoint.manager import read_latest

    save = tmp_path / "checkpoints"
    base = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    job_id = free_job_id()
    logs = [tmp_path / f"task{r}.log" for r in range(2)]
    tasks = []
    for rank, log in enumerate(logs):
        env = {**base, **srun_task(rank, SLURM_JOB_ID=job_id, SLURM_STEP_NODELIST="localhost"),
               "OMP_NUM_THREADS": "1"}
        with open(log, "w") as f:
            tasks.append(subprocess.Popen([sys.executable, "-m", "umtrain.cli.main", "train", "--config",
                                           str(tp2_yaml), f"checkpoint.save={save}"], stdout=f,
                                          stderr=subprocess.STDOUT, env=env))
    codes = [task.wait(timeout=300) for task in tasks]
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    assert f"world of 2 processes from SLURM (srun step tasks, SLURM_PROCID -> RANK); rendezvous at localhost:" \
           f"{master_port_for(job_id)}" in logs[0].read_text()
    common = read_megatron_common(read_latest(save))
    assert common["iteration"] == 2
    assert (common["layout"]["world_size"], common["layout"]["tp"], common["layout"]["dp"]) == (2, 2, 1)



def test_a_task_bound_to_its_own_gpu_uses_the_one_it_sees(monkeypatch):
    """`srun --gpus-per-task 1`: task 3 of a node sees one device, its device 0 (set_device(3) failed)."""
    import torch

    from umtrain.parallel.state import local_device_index

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_device_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_device_index() == 3
