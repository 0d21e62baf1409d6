"""The main job, as the CLI and launch scripts run it."""

from __future__ import annotations

import logging

from umtrain.checkpoint import REQUEUE_EXIT_CODE, Preempted
from umtrain.config import Config
from umtrain.parallel.state import destroy

logger = logging.getLogger("umtrain")


def train(config: Config) -> int:
    """Train to the end (exit 0), or save and exit with REQUEUE_EXIT_CODE when preempted."""
    from umtrain.train.trainer import Trainer

    try:
        Trainer(config).train()
    except Preempted as signal:
        logger.warning("%s; exiting with code %d so the job is requeued", signal, REQUEUE_EXIT_CODE)
        return REQUEUE_EXIT_CODE
    finally:
        destroy()
    return 0
