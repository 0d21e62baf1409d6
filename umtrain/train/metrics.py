"""What a training run reports: console lines, a progress bar, tensorboard and wandb."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
from typing import Optional

import torch

from umtrain.config import Config, dump_config
from umtrain.config.base import to_dict

logger = logging.getLogger("umtrain")

PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H800 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12,
                   "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}
"""Dense bf16 peaks (NVIDIA's data sheets), the first key found in the device name counts: the PCIe and NVL
cards, whose names also contain "H100", come before the SXM ones."""


def peak_flops_per_device() -> Optional[float]:
    """Dense bf16 peak of the local GPU, when known (MFU is reported only then)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_in_use_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def training_flops_per_token(config: Config, activated_flops_per_token: float, vocab_size: int) -> float:
    """Forward+backward = 3x forward; forward = the paper's count (2 x activated params + pooling) plus the LM head
    (2 D V) and causal attention scores (2 L s D: QK^T and AV over s/2 keys on average)."""
    m = config.model
    forward = activated_flops_per_token + 2 * m.hidden_size * vocab_size + 2 * m.num_layers * config.data.seq_length * m.hidden_size
    return 3 * forward


class MetricsWriter:
    """Console (via the progress bar), tensorboard and wandb, on the logging rank only.

    A restarted run continues the same records: tensorboard drops the events after `start_step` that an earlier
    attempt wrote past its last checkpoint (a crash, a rollback; from step 1 when it had none), and wandb resumes the
    run of the same `checkpoint.save`."""

    def __init__(self, config: Config, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.tensorboard = None
        self.wandb = None
        if not enabled:
            return
        log = config.logging
        if log.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # Events past start_step are an earlier attempt's after its last checkpoint (or all of them, after a
            # crash before the first): the run writes those steps again.
            self.tensorboard = SummaryWriter(log_dir=log.tensorboard_dir, purge_step=start_step + 1)
            self.tensorboard.add_text("config", "```\n" + dump_config(config) + "\n```", global_step=start_step)
        mode = os.environ.get("WANDB_MODE", log.wandb_mode)
        if log.wandb_project and mode != "disabled":
            import wandb

            os.makedirs(log.wandb_dir or "wandb", exist_ok=True)
            self.wandb = wandb.init(project=log.wandb_project, name=config.run_name, mode=mode, dir=log.wandb_dir,
                                    config=to_dict(config), **wandb_resume(config))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_resume(config: Config) -> dict:
    """A run that saves checkpoints has one wandb run, whatever its restarts: its id follows `checkpoint.save`."""
    if config.checkpoint.save is None:
        return {}
    digest = hashlib.sha1(os.path.abspath(config.checkpoint.save).encode()).hexdigest()[:16]
    return {"id": f"umtrain-{digest}", "resume": "allow"}


def format_line(step: int, total: int, values: dict[str, float]) -> str:
    parts = [f"step {step:>6d}/{total}"]
    formats = {"loss": "loss {:.4f}", "lr": "lr {:.3e}", "grad_norm": "grad-norm {:.3f}", "tokens_per_s": "{:,.0f} tok/s",
               "ms_per_step": "{:.0f} ms/step", "tflops_per_device": "{:.3g} TFLOP/s/dev", "mfu": "MFU {:.1%}",
               "memory_gib": "mem {:.2f} GiB", "aux_loss": "aux {:.2e}", "moe_aux_loss": "moe-aux {:.3e}",
               "skipped": "skipped {:.0f}"}
    for key, fmt in formats.items():
        if key in values:
            parts.append(fmt.format(values[key]))
    return " | ".join(parts)


def perplexity_of(loss: float) -> float:
    """exp(loss); inf past the largest float (an early validation of a diverged run)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def format_memory_health(values: dict[str, float]) -> str:
    """'memory L2: hit 43% top1 0.81 std 0.120 | L4: ...' from the memory/layer{b}/... entries."""
    layers: dict[str, dict[str, float]] = {}
    for key, value in values.items():
        if key.startswith("memory/"):
            _, layer, name = key.split("/", 2)
            layers.setdefault(layer, {})[name] = value
    parts = [f"L{layer[len('layer'):]}: hit {m.get('value_hit_fraction', 0):.0%} top1 {m.get('top1_score', 0):.3f} "
             f"std {m.get('output_std', 0):.3f}"
             for layer, m in sorted(layers.items(), key=lambda item: int(item[0][len("layer"):]))]
    return ("memory " + " | ".join(parts)) if parts else ""
