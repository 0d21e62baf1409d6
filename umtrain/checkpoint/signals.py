"""Preemption: SIGTERM or the configured pre-timeout signal (SLURM's `--signal=USR1@<seconds>`) asks the run to
checkpoint at the next step boundary and exit with REQUEUE_EXIT_CODE, which the launch scripts requeue."""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Optional

from umtrain.config.schema import parse_signal
from umtrain.parallel.collectives import any_rank

logger = logging.getLogger("umtrain")

REQUEUE_EXIT_CODE = 42
"""Exit code of a run that saved a checkpoint because it was asked to stop; `launch/slurm.sbatch` requeues it."""


class Preempted(Exception):
    """Raised by the training loop when a stop signal ends the run: after the preemption checkpoint is written
    (`saved`), or without one when the run has no `checkpoint.save` (then a requeue would start over)."""

    def __init__(self, message: str, saved: bool):
        super().__init__(message)
        self.saved = saved


class PreemptionHandler:
    """Records SIGTERM and `exit_signal` on this process; `requested()` makes every rank agree.

    Only the main thread can install handlers; elsewhere (e.g. a test harness thread) the handler is inactive
    and says so in the log.
    """

    def __init__(self, exit_signal: str):
        self.signals = sorted({signal.SIGTERM, parse_signal(exit_signal)})
        self.received: Optional[signal.Signals] = None
        self._previous = {}
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        except ValueError:
            logger.warning("not in the main thread: preemption signals %s are not handled", self.signals)

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Collective (every rank calls it at the same step): True on all ranks if any rank got a signal."""
        requested = any_rank(self.received is not None)
        if requested and self.received is not None:
            logger.warning("received %s: stopping at the end of this step, to be requeued", self.received.name)
        return requested

    def restore(self) -> None:
        """Put back the handlers that were installed before this one."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
