"""Preemption and crashes of subprocess-launched training: SIGTERM saves and exits with the requeue code; SIGKILL
between checkpoints resumes from the last one; either way the resumed run reproduces the uninterrupted losses."""

from __future__ import annotations

import codecs
import os
import re
import selectors
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml
from torch.distributed.elastic.multiprocessing.api import SignalException

from tests.checkpoint.helpers import run_config, saved_losses, train
from umtrain.checkpoint import REQUEUE_EXIT_CODE, PreemptionHandler, manager
from umtrain.checkpoint.launch import exit_code_of, handles_signal, workers_save_checkpoints
from umtrain.checkpoint.signals import parse_signal
from umtrain.config import ConfigError

ITERS, INTERVAL = 24, 4


def wait_for_checkpoint(proc, root: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while manager.read_latest(root) is None:
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before its first checkpoint:\n"
                                 + proc.stdout.read())
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.02)


def wait_for_logged_step(proc, step: int, timeout: float = 300.0) -> str:
    """Read the run's output until it logs `step` (a run with logging.log_interval=1); returns what was read. Reads
    the pipe itself (no buffer of proc.stdout's), so `finish` reads on from there."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    seen = ""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout.fileno(), selectors.EVENT_READ)
        while not any(int(logged) >= step for logged in re.findall(r"step +(\d+)/", seen)):
            left = deadline - time.monotonic()
            assert left > 0, f"training logged no step {step} in {timeout:.0f} s:\n{seen}"
            if not selector.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise AssertionError(f"training exited with {proc.wait(timeout=60)} before logging step {step}:\n"
                                     + seen)
            seen += decoder.decode(chunk)
    return seen


def finish(proc, timeout: float = 300.0) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def training_workers(proc) -> list[psutil.Process]:
    return [p for p in psutil.Process(proc.pid).children() if "umtrain.cli.main" in " ".join(p.cmdline())]


@pytest.mark.slow
def test_sigterm_saves_exits_with_requeue_code_and_resumes_exactly(tmp_path, launch_cli):
    root = tmp_path / "ckpt"
    config = run_config(ITERS, save=str(root), save_interval=INTERVAL)
    reference = train(run_config(ITERS), 2)["loss"]

    proc = launch_cli({**config, "logging": {**config["logging"], "log_interval": 1}}, 2)
    before = wait_for_logged_step(proc, INTERVAL + 1)   # past the first interval checkpoint, whatever the load
    training_workers(proc)[-1].send_signal(signal.SIGTERM)   # one rank only: the flag is all-reduced
    code, output = finish(proc)
    output = before + output
    assert code == REQUEUE_EXIT_CODE, output
    stopped = manager.iteration_of(manager.read_latest(root))
    assert INTERVAL < stopped < ITERS, "the signal should stop the run between two interval checkpoints"

    code, output = finish(launch_cli(config, 2))
    assert code == 0, output
    assert saved_losses(manager.read_latest(root)) == reference


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_the_launcher_passes_stop_signals_on_to_its_workers(tmp_path, launch_cli, stop):
    """SLURM's `--signal=USR1@300` and its SIGTERM reach the launcher too; torchrun's agent alone would die of SIGUSR1
    and orphan the workers (SIGTERM it passes on itself). Here only the launcher gets the signal, so the workers can
    only have it from the launcher."""
    root = tmp_path / "ckpt"
    proc = launch_cli(run_config(ITERS, save=str(root), save_interval=INTERVAL), 2)
    wait_for_checkpoint(proc, root)
    workers = training_workers(proc)
    proc.send_signal(stop)
    code, output = finish(proc)
    assert code == REQUEUE_EXIT_CODE, output
    assert INTERVAL <= manager.iteration_of(manager.read_latest(root)) < ITERS   # = when it came during that save
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def test_handles_signal_reads_whether_a_process_catches_it(restored_stop_signals):
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    assert not handles_signal(os.getpid(), signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    assert handles_signal(os.getpid(), signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)


@pytest.mark.slow
def test_a_signal_the_launcher_gets_before_its_workers_can_handle_it_is_kept(tmp_path, launch_cli):
    """SIGUSR1 to the launcher while its workers are still importing (or not yet started, as during a multi-node
    rendezvous) reached no worker, or killed one without a save: the relay hands it to each worker once it handles
    it, and the run stops with a checkpoint."""
    root = tmp_path / "ckpt"
    proc = launch_cli(run_config(ITERS, save=str(root), save_interval=INTERVAL), 2)
    deadline = time.monotonic() + 120
    while not handles_signal(proc.pid, signal.SIGUSR1):          # the launcher's own relay is installed
        assert proc.poll() is None and time.monotonic() < deadline, "the launcher never installed its relay"
        time.sleep(0.01)
    assert not any(handles_signal(w.pid, signal.SIGUSR1) for w in training_workers(proc))
    proc.send_signal(signal.SIGUSR1)
    code, output = finish(proc)
    assert code == REQUEUE_EXIT_CODE, output
    assert manager.iteration_of(manager.read_latest(root)) < ITERS


@pytest.mark.slow
def test_sigkill_between_checkpoints_resumes_from_the_last_one(tmp_path, launch_cli):
    root = tmp_path / "ckpt"
    config = run_config(ITERS, save=str(root), save_interval=INTERVAL, keep_last=2)
    proc = launch_cli(config, 1)
    wait_for_checkpoint(proc, root)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    killed_at = manager.iteration_of(manager.read_latest(root))
    assert killed_at < ITERS

    code, output = finish(launch_cli(config, 1))
    assert code == 0, output
    assert f"resumed from {root / manager.checkpoint_name(killed_at)}" in output
    assert saved_losses(manager.read_latest(root)) == train(run_config(ITERS), 1)["loss"]
    assert [c.iteration for c in manager.list_checkpoints(root)] == [ITERS - INTERVAL, ITERS]


def test_signal_names_and_local_flag():
    assert parse_signal("USR1") == signal.SIGUSR1 == parse_signal("SIGUSR1") == parse_signal(str(int(signal.SIGUSR1)))
    with pytest.raises(ConfigError, match="training.exit_signal"):
        parse_signal("SIGNOPE")
    handler = PreemptionHandler("SIGUSR2")
    try:
        assert not handler.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert handler.requested()
    finally:
        handler.restore()


def test_torchrun_failures_map_to_the_requeue_code():
    def failed(*codes):
        failures = [SimpleNamespace(exitcode=c) for c in codes]
        return SimpleNamespace(get_first_failure=lambda: (0, failures[0]))

    assert exit_code_of(failed(REQUEUE_EXIT_CODE, -15), workers_save=True) == REQUEUE_EXIT_CODE
    assert exit_code_of(failed(3), workers_save=True) == 3
    assert exit_code_of(failed(-9), workers_save=True) == 1
    assert exit_code_of(RuntimeError("no failures"), workers_save=True) == 1
    # The launcher itself signalled (scancel, preemption: SIGTERM to the whole step): workers that save checkpoint
    # on SIGTERM, so the job is requeued; without checkpoint.save, or on Ctrl-C, it is not.
    assert exit_code_of(SignalException("launcher got SIGTERM", signal.SIGTERM), workers_save=True) == REQUEUE_EXIT_CODE
    assert exit_code_of(SignalException("launcher got SIGTERM", signal.SIGTERM), workers_save=False) == 143
    assert exit_code_of(SignalException("launcher got SIGINT", signal.SIGINT), workers_save=True) == 130


def test_the_launcher_reads_checkpoint_save_from_the_workers_command(tmp_path):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(run_config(2)))
    workers = ["--standalone", "--nproc-per-node=2", "-m", "umtrain.cli.main", "train", "--config", str(config_path)]
    assert not workers_save_checkpoints(workers)
    assert workers_save_checkpoints([*workers, f"checkpoint.save={tmp_path / 'ckpt'}"])
    assert not workers_save_checkpoints([*workers, "model.no_such_key=1", f"checkpoint.save={tmp_path}"])
    assert not workers_save_checkpoints(["--standalone", "train.py", "--config", str(config_path)])
