"""launch/torchrun.sh and launch/slurm.sbatch with fake `python`, `srun` and `scontrol` on PATH: the torchrun
arguments each node gets, and the requeue on umtrain's requeue code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from umtrain.checkpoint import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
RECORD_ARGS = 'import json, os, sys\nopen(os.environ["ARGS_LOG"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'


def fake_bin(tmp_path: Path, exit_code: int) -> Path:
    """`python` records its arguments and exits with `exit_code`; `srun` runs its command once; `scontrol` lists
    two hosts and records requeues."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "record.py").write_text(RECORD_ARGS)
    scripts = {
        "python": f'#!/bin/sh\n"{sys.executable}" "{tmp_path / "record.py"}" "$@"\nexit {exit_code}\n',
        "srun": '#!/bin/sh\nshift\nexec "$@"\n',
        "scontrol": '#!/bin/sh\nif [ "$1" = requeue ]; then echo "requeue $2" >> "$SCONTROL_LOG"; '
                    'else printf "node-a\\nnode-b\\n"; fi\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, script: str, env: dict, exit_code: int = 0) -> tuple[int, list[list[str]], str]:
    bin_dir = fake_bin(tmp_path, exit_code)
    log, requeues = tmp_path / "args.log", tmp_path / "scontrol.log"
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGS_LOG": str(log), "SCONTROL_LOG": str(requeues)}
    proc = subprocess.run(["bash", script, "--config", "my run.yaml", "training.train_iters=5"], cwd=REPO,
                          env={**base, **env}, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, calls, requeues.read_text() if requeues.exists() else ""


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_torchrun_sh_outside_slurm_takes_the_nodes_from_the_environment(tmp_path):
    rc, calls, _ = run_script(tmp_path, "launch/torchrun.sh",
                              {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "head01", "NPROC_PER_NODE": "4"})
    assert rc == 0 and len(calls) == 1
    args = calls[0]
    assert args[:2] == ["-m", "umtrain.checkpoint.launch"]
    assert (option(args, "--nnodes"), option(args, "--node-rank"), option(args, "--nproc-per-node")) == ("2", "1", "4")
    assert (option(args, "--master-addr"), option(args, "--master-port")) == ("head01", "29500")
    assert args[-6:] == ["-m", "umtrain.cli.main", "train", "--config", "my run.yaml", "training.train_iters=5"]


def test_torchrun_sh_outside_slurm_needs_the_rendezvous_address_for_several_nodes(tmp_path):
    rc, calls, _ = run_script(tmp_path, "launch/torchrun.sh", {"NNODES": "2", "NODE_RANK": "1"})
    assert rc == 2 and calls == []


def test_torchrun_sh_under_slurm_rendezvous_on_the_first_node(tmp_path):
    """SLURM's values win over NNODES/NODE_RANK the job inherited from the submitting shell."""
    rc, calls, _ = run_script(tmp_path, "launch/torchrun.sh",
                              {"SLURM_JOB_ID": "5", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
                               "SLURM_JOB_NODELIST": "node-[a-b]", "NNODES": "2", "NODE_RANK": "0"})
    assert rc == 0
    args = calls[0]
    assert (option(args, "--nnodes"), option(args, "--node-rank"), option(args, "--nproc-per-node")) == ("3", "2", "1")
    assert option(args, "--master-addr") == "node-a"


@pytest.mark.parametrize("exit_code,requeued,rc", [(REQUEUE_EXIT_CODE, True, 0), (1, False, 1), (0, False, 0)])
def test_slurm_sbatch_requeues_only_on_the_requeue_code(tmp_path, exit_code, requeued, rc):
    got_rc, calls, requeues = run_script(tmp_path, "launch/slurm.sbatch",
                                         {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-[a-b]",
                                          "SLURM_NNODES": "2", "SLURM_NODEID": "0"}, exit_code)
    assert got_rc == rc and len(calls) == 1
    assert option(calls[0], "--master-addr") == "node-a"
    assert requeues == ("requeue 77\n" if requeued else "")
