"""torchrun whose exit code says "requeue me": `python -m umtrain.checkpoint.launch <torchrun arguments>`.

torchrun itself exits 1 whenever a worker fails, so a preempted run (every worker exits REQUEUE_EXIT_CODE after
saving) would look like a crash to SLURM. This wrapper returns REQUEUE_EXIT_CODE when the first failing worker
exited with it, and the worker's own code (or 1) otherwise.

Signals. torchrun's agent handles SIGTERM, SIGINT, SIGHUP and SIGQUIT: it passes the signal on to the workers,
waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, then kills them; the workers checkpoint on SIGTERM, so a SIGTERM
(scancel, preemption) reports the requeue code. It would die of SIGUSR1/SIGUSR2 and leave the workers running, yet
SLURM's pre-timeout signal (`--signal=USR1@300`) reaches every process of the step, this one included: the wrapper
passes SIGUSR1/SIGUSR2 on to its workers (`SignalRelay`: to each once it handles the signal, so a worker still
starting gets it too) and keeps supervising them; they checkpoint at the next step boundary and exit with the
requeue code, which the wrapper returns. The shutdown timeout defaults to `DEFAULT_SHUTDOWN_TIMEOUT_S`
instead of torchrun's 30 s, so that the rest of a step and the save can fit.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil

from umtrain.checkpoint.signals import REQUEUE_EXIT_CODE

PASSED_ON_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
DEFAULT_SHUTDOWN_TIMEOUT_S = 180
WORKER_MODULE = "umtrain.cli.main"


def exit_code_of(error: BaseException, workers_save: bool) -> int:
    """The exit code to report for torchrun's ChildFailedError (the first failing worker's), or for its
    SignalException: the launcher itself got a signal and passed it on to the workers. SIGTERM is how scancel and
    preemption stop a job; workers that save checkpoints save on it, so that is a requeue too. Other signals, and
    SIGTERM to workers that save nothing (a requeue would start again from step 0), give 128 + the signal's number,
    as a shell reports them."""
    signal_number = getattr(error, "sigval", None)
    if signal_number is not None:
        requeue = signal_number == signal.SIGTERM and workers_save
        return REQUEUE_EXIT_CODE if requeue else 128 + int(signal_number)
    first = getattr(error, "get_first_failure", None)
    if first is None:
        return 1
    _, failure = first()
    code = failure.exitcode
    return code if code == REQUEUE_EXIT_CODE or 0 < code < 256 else 1


def workers_save_checkpoints(argv: list[str]) -> bool:
    """Whether the workers' command (`... -m umtrain.cli.main train --config ...`) sets `checkpoint.save`. A config
    the workers will reject counts as saving nothing."""
    from umtrain.cli.main import parse_args
    from umtrain.config import ConfigError, load_config

    if WORKER_MODULE not in argv:
        return False
    worker_argv = argv[argv.index(WORKER_MODULE) + 1:]
    if not worker_argv or worker_argv[0] != "train":
        return False
    try:
        args = parse_args(worker_argv)
        return load_config(args.config, args.overrides, check_files=False).checkpoint.save is not None
    except (ConfigError, SystemExit):
        return False


def handles_signal(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: the SigCgt mask in /proc/<pid>/status). A worker that
    is still importing has none yet, and the signal's default action would kill it without a save."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = next((line.split()[1] for line in status if line.startswith("SigCgt:")), "0")
    except OSError:     # gone meanwhile
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


def training_workers() -> list[psutil.Process]:
    """This launcher's training workers: its direct children running `WORKER_MODULE`."""
    workers = []
    for child in psutil.Process().children():
        try:
            if WORKER_MODULE in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:   # gone meanwhile, or not ours to inspect
            continue
    return workers


class SignalRelay:
    """Passes the signals in PASSED_ON_SIGNALS on to the training workers, to each worker once it handles the
    signal. A signal that comes before the workers exist (the rendezvous of a multi-node job can take minutes) or
    while they import would otherwise reach none of them, or kill them without a save. A worker that never handles
    it (SIGUSR2 while `training.exit_signal` is SIGUSR1; `umtrain evaluate`) never gets it. The handler only records the
    signal; a daemon thread, started at the first one, delivers every `POLL_S` seconds until the launcher exits
    (workers that torchrun restarts get it too)."""

    POLL_S = 0.1

    def __init__(self):
        self.received: list[tuple[int, set[int]]] = []
        """Each signal received, with the pids of the workers it was passed on to."""
        self.thread: threading.Thread | None = None

    def install(self) -> None:
        for sig in PASSED_ON_SIGNALS:
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum: int, frame) -> None:
        self.received.append((signum, set()))
        if self.thread is None:
            self.thread = threading.Thread(target=self._deliver_forever, name="umtrain-signal-relay", daemon=True)
            self.thread.start()

    def _deliver_forever(self) -> None:
        announced = 0
        while True:
            for signum, _ in self.received[announced:]:
                print(f"umtrain: received {signal.Signals(signum).name}: passing it on to the training workers, "
                      f"each once it handles it", file=sys.stderr, flush=True)
                announced += 1
            self.deliver()
            time.sleep(self.POLL_S)

    def deliver(self) -> None:
        for worker in training_workers():
            for signum, passed_to in list(self.received):
                if worker.pid not in passed_to and handles_signal(worker.pid, signum):
                    try:
                        worker.send_signal(signum)
                    except psutil.Error:
                        continue
                    passed_to.add(worker.pid)


def run_local(nproc_per_node: int, command: list[str]) -> int:
    """`umtrain <command>` on this machine under torchrun with N processes (rendezvous on a free local port)."""
    return run_torchrun(["--standalone", f"--nproc-per-node={nproc_per_node}", "-m", WORKER_MODULE, *command])


def run_torchrun(argv: list[str]) -> int:
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S))
    SignalRelay().install()
    try:
        torchrun(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # ChildFailedError carries every failed worker's exit code
        code = exit_code_of(err, workers_save_checkpoints(argv))
        if code != REQUEUE_EXIT_CODE:
            print(f"umtrain: a worker failed: {err}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
