"""torchrun whose exit code says "requeue me": `python -m umtrain.checkpoint.launch <torchrun arguments>`.

torchrun itself exits 1 whenever a worker fails, so a preempted run (every worker exits REQUEUE_EXIT_CODE after
saving) would look like a crash to SLURM. This wrapper returns REQUEUE_EXIT_CODE when the first failing worker
exited with it, and the worker's own code (or 1) otherwise.

Signals. torchrun's agent would die of SIGUSR1/SIGUSR2 (orphaning the workers), and on SIGTERM it passes the signal
on, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, kills the workers and exits without their exit codes. SLURM's
pre-timeout signal (`--signal=USR1@300`) and its SIGTERM reach every process of the step, this one included. So the
wrapper handles SIGTERM, SIGUSR1 and SIGUSR2 itself: it passes them on to its workers and keeps supervising them;
they checkpoint at the next step boundary and exit with the requeue code (or 1 when the run has no
`checkpoint.save`), and that is what the wrapper returns. SIGINT, SIGHUP and SIGQUIT stay torchrun's. The shutdown
timeout (the grace the other workers get once one has exited) defaults to `DEFAULT_SHUTDOWN_TIMEOUT_S` instead of
torchrun's 30 s.
"""

from __future__ import annotations

import os
import signal
import sys

import psutil

from umtrain.checkpoint.signals import REQUEUE_EXIT_CODE

PASSED_ON_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
DEFAULT_SHUTDOWN_TIMEOUT_S = 180
WORKER_MODULE = "umtrain.cli.main"


def exit_code_of(error: BaseException) -> int:
    """The exit code to report for torchrun's ChildFailedError (the first failing worker's), or for its
    SignalException (SIGINT, SIGHUP, SIGQUIT reached the launcher): 128 + the signal's number, as a shell reports
    them."""
    signal_number = getattr(error, "sigval", None)
    if signal_number is not None:
        return 128 + int(signal_number)
    first = getattr(error, "get_first_failure", None)
    if first is None:
        return 1
    _, failure = first()
    code = failure.exitcode
    return code if code == REQUEUE_EXIT_CODE or 0 < code < 256 else 1


def pass_on_to_workers(signum: int, frame) -> None:
    """Send the signal to this launcher's training workers (its direct children running `WORKER_MODULE`)."""
    for child in psutil.Process().children():
        try:
            if WORKER_MODULE in " ".join(child.cmdline()):
                child.send_signal(signum)
        except psutil.Error:   # gone meanwhile, or not ours to inspect
            continue


def run_torchrun(argv: list[str]) -> int:
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S))
    for sig in PASSED_ON_SIGNALS:
        signal.signal(sig, pass_on_to_workers)
    try:
        torchrun([f"--signals-to-handle={TORCHRUN_SIGNALS}", *argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except Exception as err:  # ChildFailedError carries every failed worker's exit code
        code = exit_code_of(err)
        if code != REQUEUE_EXIT_CODE:
            print(f"umtrain: training failed: {err}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
