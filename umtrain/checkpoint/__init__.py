"""Checkpoints: sharded save/resume through Megatron-Core `dist_checkpointing`, preemption, conversion.

The training loop uses `Checkpointer`, `PreemptionHandler`, `Preempted` and `REQUEUE_EXIT_CODE`; see
docs/checkpoints.md for the directory layout, the guarantees and `umtrain convert`.
"""

from umtrain.checkpoint.checkpointer import Checkpointer
from umtrain.checkpoint.signals import REQUEUE_EXIT_CODE, Preempted, PreemptionHandler

__all__ = ["Checkpointer", "Preempted", "PreemptionHandler", "REQUEUE_EXIT_CODE"]
