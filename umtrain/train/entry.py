"""The main job, as the CLI and launch scripts run it."""

from __future__ import annotations

from umtrain.config import Config
from umtrain.parallel.state import destroy


def train(config: Config) -> int:
    from umtrain.train.trainer import Trainer

    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        destroy()
    return 0
