"""The main job, as the CLI and launch scripts run it."""

from __future__ import annotations

import logging

from umtrain.checkpoint import REQUEUE_EXIT_CODE, Preempted
from umtrain.config import Config
from umtrain.parallel.state import destroy

logger = logging.getLogger("umtrain")


def train(config: Config) -> int:
    """Train to the end (exit 0), or save and exit with REQUEUE_EXIT_CODE when preempted (exit 1 when a stop
    signal came and there was nowhere to save: a requeued job would start over)."""
    from umtrain.train.trainer import Trainer

    try:
        Trainer(config).train()
    except Preempted as signal:
        if not signal.saved:
            logger.error("%s; exiting with code 1 (not the requeue code: a requeued job would start over)", signal)
            return 1
        logger.warning("%s; exiting with code %d so the job is requeued", signal, REQUEUE_EXIT_CODE)
        return REQUEUE_EXIT_CODE
    finally:
        destroy()
    return 0
