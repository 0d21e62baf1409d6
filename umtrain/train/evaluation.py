"""Evaluation of a saved checkpoint: loss and perplexity on the validation or test split, under any parallel layout.

The weights load through the trainer's own checkpoint code (`checkpoint.load`, verified, weights only) into the
model alone (no gradient buffers or optimizer state are allocated), so a checkpoint saved under one (TP, PP, DP)
layout evaluates under another. The batches are the trainer's validation
batches: global batches 0..iters-1 of the split, in Megatron's sample order, so `iters = training.eval_iters` on
the validation split repeats the training run's own validation exactly. Nothing is saved or logged to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from umtrain.config import Config, ConfigError, config_from_dict, load_config
from umtrain.config.base import set_dotted, to_dict
from umtrain.train.metrics import perplexity_of

SPLITS = ("valid", "test")
"""The evaluable parts of `data.split` (the second and third numbers)."""


@dataclass
class Evaluation:
    checkpoint: str
    iteration: int
    split: str
    iters: int
    loss: float
    """Mean over the global batches of their token-mean cross entropy (as the training run's validation loss)."""
    perplexity: float
    tokens: int
    """Token positions evaluated: iters x global_batch_size x seq_length."""
    layout: dict[str, int]


def checkpoint_to_evaluate(path: str) -> Path:
    """The checkpoint directory `path` names: itself, or a checkpoint root's `latest` (its newest checkpoint when
    there is no `latest`). Checked by file sizes here (no data is read); the load verifies the checksums. A `latest`
    that fails is an error, not a fall back to an older checkpoint: an evaluation reports on the one asked for."""
    from umtrain.checkpoint import manager   # imports Megatron: kept out of the CLI's start-up
    from umtrain.checkpoint.convert import conversion_hint

    given = Path(path)
    if not given.exists():
        raise ConfigError("--checkpoint", f"{given} does not exist")
    checkpoint: Optional[Path] = given
    if not manager.is_checkpoint_dir(given) and manager.iteration_of(given) is None:
        published = manager.list_checkpoints(given)
        checkpoint = manager.read_latest(given) or (published[-1].path if published else None)
        if checkpoint is None:
            raise ConfigError("--checkpoint", f"{given} holds no checkpoint (neither {manager.LATEST} nor an iter_N "
                                              f"directory){conversion_hint(given)}")
    error = manager.verification_error(checkpoint, checksums=False)
    if error is not None:
        raise ConfigError("--checkpoint", f"{error}; to evaluate another checkpoint, name its iter_N directory")
    return checkpoint


def evaluation_config(checkpoint: Path, config_path: Optional[str | Path], overrides: Iterable[str],
                      world_size: Optional[int], iters: Optional[int]) -> Config:
    """The run's config (`config_path`, default the checkpoint's saved config.yaml) with `overrides`, set to load
    `checkpoint`'s weights only and to save and log nothing; `training.eval_iters` becomes `iters` (default: the
    config's own)."""
    from umtrain.checkpoint.manager import CONFIG_FILE

    if config_path is None:
        config_path = checkpoint / CONFIG_FILE
        if not config_path.is_file():
            raise ConfigError("--config", f"{checkpoint} holds no {CONFIG_FILE}; pass the run's config")
    config = load_config(config_path, overrides, world_size=world_size)
    if iters is None:
        iters = config.training.eval_iters
        if iters < 1:
            raise ConfigError("--iters", "is unset and the config's training.eval_iters is 0: pass --iters N")
    elif iters < 1:
        raise ConfigError("--iters", f"must be >= 1, got {iters}")
    forced: dict[str, Any] = {
        "checkpoint.load": str(checkpoint), "checkpoint.no_load_optim": True, "checkpoint.save": None,
        "checkpoint.save_interval": 0, "checkpoint.async_save": False, "training.eval_iters": iters,
        "logging.tensorboard_dir": None, "logging.wandb_project": None, "logging.progress_bar": False,
    }
    data = to_dict(config)
    for key, value in forced.items():
        set_dotted(data, key, value, Config)
    return config_from_dict(data, world_size=world_size)


def check_split_has_data(config: Config, split: str) -> None:
    """Refuse a split the data section leaves empty (mock data has every split)."""
    d = config.data
    if d.mock:
        return
    if d.valid_data_path:
        if split == "test":
            raise ConfigError("data.valid_data_path", "a separate validation blend leaves no test split: evaluate "
                                                      "--split valid")
        return
    weight = float(d.split.replace("/", ",").split(",")[1 + SPLITS.index(split)])
    if weight == 0:
        raise ConfigError("data.split", f"{d.split!r} gives the {split} part no data: nothing to evaluate with "
                                        f"--split {split}")


def evaluate_checkpoint(config: Config, split: str) -> Evaluation:
    """Build the model under this process group's layout (no gradient buffers, no optimizer), load
    `checkpoint.load`'s weights into it, evaluate `training.eval_iters` global batches of `split` in eval mode (no
    dropout). Collective; every rank returns the same result. The caller tears the process group down."""
    from umtrain.checkpoint.state import layout_of
    from umtrain.parallel.memory_tables import check_table_overflow
    from umtrain.train.runner import CheckpointRunner

    runner = CheckpointRunner(config)
    runner.load_weights()
    batches = runner.valid_batches if split == "valid" else runner.batches_of(runner.datasets[2])
    loss = runner.evaluate(batches)
    check_table_overflow(runner.memory_layers)   # a fixed-capacity lookup that overflowed gave wrong outputs
    t = config.training
    return Evaluation(checkpoint=config.checkpoint.load, iteration=runner.iteration, split=split,
                      iters=t.eval_iters, loss=loss, perplexity=perplexity_of(loss),
                      tokens=t.eval_iters * t.global_batch_size * config.data.seq_length, layout=layout_of(runner))
