"""`Checkpointer`: the training loop's save / resume, collective over all ranks, files handled by rank 0."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from umtrain.checkpoint import manager
from umtrain.checkpoint.compat import check_model_shape
from umtrain.checkpoint.convert import conversion_hint
from umtrain.checkpoint.state import (
    FULL_CONTENTS,
    load_state_dict_template,
    restore_trainer,
    same_layout,
    save_state_dict,
    sync_params_before_save,
    with_absolute_data_paths,
)
from umtrain.config import Config, dump_config
from umtrain.config.base import ConfigError
from umtrain.data.datasets import next_samples_fingerprint
from umtrain.parallel.collectives import barrier, is_rank0, on_rank0

logger = logging.getLogger("umtrain")


_UNRESOLVED = object()


@dataclass(frozen=True)
class ResumeSource:
    path: Path
    own: bool
    """A checkpoint of this run's `checkpoint.save` (it continues), not `checkpoint.load` (a run starting from it)."""
    common: dict[str, Any]
    """Its common state: iteration, consumed_samples, train_samples, config, history, ..."""

    @classmethod
    def of(cls, path: Path, own: bool) -> ResumeSource:
        return cls(path, own, dist_checkpointing.load_common_state_dict(str(path)))


class Checkpointer:
    """Saves every `checkpoint.save_interval` steps into `checkpoint.save`; resumes from `latest` there, or, while
    that holds no checkpoint, from `checkpoint.load`. See umtrain/checkpoint/manager.py for the directory layout and
    its guarantees."""

    def __init__(self, config: Config):
        c = config.checkpoint
        self.config = config
        self.root: Optional[Path] = Path(c.save) if c.save else None
        self.enabled = self.root is not None
        self.last_saved_iteration: Optional[int] = None
        self.written: set[int] = set()
        self.async_queue = AsyncCallsQueue() if c.async_save and self.enabled else None
        self._resume_source: Optional[ResumeSource] | object = _UNRESOLVED
        self._weights_source: Optional[ResumeSource] = None

    # ----------------------------------------------------------------------------------------- save
    def should_save(self, iteration: int) -> bool:
        """Whether to save after `iteration`. Also publishes a finished asynchronous save (collective)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=False)
        interval = self.config.checkpoint.save_interval
        return self.enabled and interval > 0 and iteration % interval == 0

    def save(self, trainer) -> None:
        """Write `iteration`'s checkpoint (collective); synchronous unless checkpoint.async_save."""
        if not self.enabled or self.last_saved_iteration == trainer.iteration:
            return
        self.finalize()
        iteration = trainer.iteration
        tmp = on_rank0(manager.prepare_temporary, self.root, iteration)
        sync_params_before_save(trainer)
        request = dist_checkpointing.save(save_state_dict(trainer), str(tmp),
                                          async_sharded_save=self.async_queue is not None)
        commit = functools.partial(self._commit, tmp, iteration)
        if request is None:
            commit()
        else:
            request.finalize_fns.append(commit)
            self.async_queue.schedule_async_request(request)
        self.last_saved_iteration = iteration

    def _commit(self, tmp: Path, iteration: int) -> None:
        """After every rank's files are written: verify, publish atomically, update `latest`, apply retention."""
        barrier()
        final = on_rank0(self._publish, tmp, iteration)
        self.written.add(iteration)
        if is_rank0():
            logger.info("saved checkpoint %s", final)

    def _publish(self, tmp: Path, iteration: int) -> Path:
        manager.write_file_atomically(tmp / manager.CONFIG_FILE, dump_config(with_absolute_data_paths(self.config)))
        final = self.root / manager.checkpoint_name(iteration)
        if final.exists() and iteration not in self.written:
            manager.set_aside(final)
        final = manager.publish(tmp, iteration)
        c = self.config.checkpoint
        for removed in manager.apply_retention(self.root, c.keep_last, c.keep_every, iteration):
            logger.info("retention removed %s", removed)
        return final

    def finalize(self) -> None:
        """Wait for an asynchronous save to be written and published (collective)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=True)

    # ----------------------------------------------------------------------------------------- resume
    def resume_source(self) -> Optional[ResumeSource]:
        """The checkpoint a resume loads, resolved and verified once (collective): the `latest` of `checkpoint.save`
        once the run has saved, else `checkpoint.load`; None for a fresh start."""
        if self._resume_source is _UNRESOLVED:
            self._resume_source = self._resolve_resume_source()
        return self._resume_source

    def _resolve_resume_source(self) -> Optional[ResumeSource]:
        self._claim_save_directory()
        own = self._own_checkpoint()
        if own is not None:
            load = self.config.checkpoint.load
            if load and Path(load).resolve() != self.root.resolve() and is_rank0():
                logger.warning("checkpoint.load=%s passed over: %s already holds %s, and a run continues from its "
                               "own latest (to roll back, point %s at an older iter_N)", load,
                               self.root, own.path.name, self.root / manager.LATEST)
            return ResumeSource.of(own.path, own=True)
        start = self._start_checkpoint()
        return None if start is None else ResumeSource.of(start.path, own=False)

    def _claim_save_directory(self) -> None:
        """Before reading `latest` or touching anything in `checkpoint.save`: no other live run saves there."""
        if not self.enabled:
            return
        try:
            on_rank0(manager.claim, self.root)
        except manager.DirectoryInUse as err:
            raise ConfigError("checkpoint.save", str(err)) from None

    def release(self) -> None:
        """Give up `checkpoint.save` for another run (once training has ended, its saves finalized); rank 0 holds
        it, on other ranks this does nothing."""
        if self.enabled:
            manager.release(self.root)

    def resume(self, trainer) -> bool:
        """Load model, optimizer, RNG, iteration and data position; False when there is nothing to resume."""
        source = self.resume_source()
        if source is None:
            return False
        fresh_optimizer = not source.own and self.config.checkpoint.no_load_optim
        if not self._load(trainer, source, fresh_optimizer):
            trainer.optimizer.reload_model_params()  # fresh optimizer: its main (fp32) params follow the loaded model
        warn_if_data_order_changed(trainer, source)
        return True

    def weights_source(self) -> ResumeSource:
        """`checkpoint.load`, resolved and verified (checksums) once, as for a resume (collective)."""
        if self._weights_source is None:
            start = self._start_checkpoint()
            if start is None:
                raise ConfigError("checkpoint.load", "is unset: there are no weights to load")
            self._weights_source = ResumeSource.of(start.path, own=False)
        return self._weights_source

    def load_weights(self, runner) -> None:
        """`checkpoint.load`'s weights, iteration and history into `runner`, a `ModelRunner` without an optimizer
        (evaluation)."""
        self._load(runner, self.weights_source(), fresh_optimizer=True)

    def _start_checkpoint(self) -> Optional[manager.Checkpoint]:
        """`checkpoint.load`, where a run without checkpoints of its own starts (pretrained weights, another run)."""
        if not self.config.checkpoint.load:
            return None
        load = Path(self.config.checkpoint.load)
        if not load.exists():
            raise ConfigError("checkpoint.load", f"{load} does not exist")
        checkpoint, _ = self._resolve(load, "checkpoint.load")
        if checkpoint is None:
            raise ConfigError("checkpoint.load", f"no valid checkpoint in {load}{conversion_hint(load)}")
        return checkpoint

    def _own_checkpoint(self) -> Optional[manager.Checkpoint]:
        """`latest` of `checkpoint.save` (or the newest that verifies). Once a run has saved, a restart or a requeue
        with the same command line continues from there, never from `checkpoint.load` again. A save directory whose
        checkpoints all fail verification is an error, not a fresh start at step 0."""
        if self.root is None or not self.root.exists():
            return None
        checkpoint, skipped = self._resolve(self.root, "checkpoint.save")
        if checkpoint is None and skipped:
            raise ConfigError("checkpoint.save", f"{self.root} holds checkpoints but none verifies ("
                                                 f"{'; '.join(skipped)}); move them aside to start this run over")
        return checkpoint

    def _resolve(self, path: Path, key: str) -> tuple[Optional[manager.Checkpoint], list[str]]:
        """`manager.resolve_resume` on rank 0, its warnings logged; a checkpoint that fails its check names `key`."""
        try:
            checkpoint, skipped = on_rank0(manager.resolve_resume, path)
        except manager.CheckpointError as err:
            raise ConfigError(key, str(err)) from None
        if is_rank0():
            for warning in skipped:
                logger.warning(warning)
        return checkpoint, skipped

    def _load(self, trainer, source: ResumeSource, fresh_optimizer: bool) -> bool:
        """Load `source` into `trainer` (its optimizer state too unless `fresh_optimizer`); whether it did."""
        path, common = source.path, source.common
        check_model_shape(common["config"], common["padded_vocab_size"], trainer.config, trainer.vocab_size, str(path))
        contents = common.get("contents", FULL_CONTENTS)
        load_optimizer = not fresh_optimizer and "optimizer" in contents
        if load_optimizer:
            check_optimizer_format(common, trainer.config, path)
            if is_rank0():
                warn_if_optimizer_state_may_be_shifted(common, path)
        load_rng = "rng" in contents and same_layout(common["layout"], trainer)
        if is_rank0():
            if not fresh_optimizer and not load_optimizer:
                logger.warning("%s holds no optimizer state (a converted checkpoint?): the optimizer starts fresh", path)
            if not load_rng:
                logger.warning("%s: RNG states are not restored", "the checkpoint holds none (a converted one?)"
                               if "rng" not in contents else f"its layout {common['layout']} differs from this run's")
        template = load_state_dict_template(trainer, contents, load_optimizer, load_rng)
        loaded = dist_checkpointing.load(template, str(path))
        restore_trainer(trainer, loaded, load_optimizer, load_rng)
        self.last_saved_iteration = trainer.iteration
        if is_rank0():
            logger.info("resumed from %s at iteration %d (%d samples consumed)", path, trainer.iteration,
                        trainer.consumed_samples)
        return load_optimizer


def check_optimizer_format(common: dict, config: Config, path: Path) -> None:
    """Refuse, by name, an optimizer state that Megatron would fail on deep inside: the distributed optimizer and
    the plain one store it in different formats, and before format 2 a MoE run at expert-parallel size 1 kept the
    experts' state with the dense weights' (one optimizer instead of two chained ones)."""
    saved_config = common["config"]
    if ((saved_config.get("model") or {}).get("family") == "moe" and common.get("format_version", 1) < 2
            and common.get("layout", {}).get("ep") == 1):
        raise ConfigError("checkpoint.no_load_optim",
                          f"{path} is a MoE checkpoint saved at expert_model_parallel_size 1 by an older umtrain "
                          f"(format {common.get('format_version', 1)}), whose optimizer state this version cannot "
                          f"load; start a new run (new checkpoint.save) from its weights with a fresh optimizer: "
                          f"--resume {path} checkpoint.no_load_optim=true")
    saved = (saved_config.get("parallel") or {}).get("use_distributed_optimizer", True)
    current = config.parallel.use_distributed_optimizer
    if saved != current:
        raise ConfigError("parallel.use_distributed_optimizer",
                          f"{path} was saved with use_distributed_optimizer: {str(saved).lower()}, this run has "
                          f"{str(current).lower()}; the two store the optimizer state in different formats. Set "
                          f"it back, or start a new run (new checkpoint.save) from its weights with a fresh "
                          f"optimizer: --resume {path} checkpoint.no_load_optim=true")


def warn_if_optimizer_state_may_be_shifted(common: dict, path: Path) -> None:
    """Before format 3, a distributed optimizer whose gradient buffers had several buckets (the shared embedding of
    a pipeline-parallel run with tied embeddings; `overlap_grad_reduce` buckets of a large model) saved the state
    of the parameters after a padded bucket shifted (`state.bucket_padding_kept`)."""
    saved = common["config"]
    parallel, model = saved.get("parallel") or {}, saved.get("model") or {}
    several_buckets = ((parallel.get("pipeline_model_parallel_size", 1) > 1
                        and not model.get("untie_embeddings_and_output_weights", False))
                       or parallel.get("overlap_grad_reduce", False))
    if common.get("format_version", 1) < 3 and parallel.get("use_distributed_optimizer", True) and several_buckets:
        logger.warning("%s was saved by an older umtrain whose distributed-optimizer state may be shifted for some "
                       "parameters (pipeline parallelism with tied embeddings, or overlap_grad_reduce: the state "
                       "after a padded gradient bucket was saved misaligned); if the loss jumps after this resume, "
                       "start a new run (new checkpoint.save) from its weights with a fresh optimizer: --resume %s "
                       "checkpoint.no_load_optim=true", path, path)


def warn_if_data_order_changed(trainer, source: ResumeSource) -> None:
    """Warn when the samples a resumed run reads next differ from those the saved run would have read (its next one,
    and each blend source's next one): its data, blend, `seq_length`, seed or split changed, or a larger sample
    budget (more `train_iters`, another global batch) changed Megatron's sample order. A deliberate change (a new
    data mixture) is allowed; a silent one is not."""
    saved = source.common.get("next_sample")
    if saved is None or not is_rank0():
        return
    current = next_samples_fingerprint(trainer.datasets[0], trainer.consumed_samples)
    if current != saved:
        logger.warning("the training data after %s is not what that run would have read next (the samples from %d "
                       "on differ): its data, data.split, seq_length, seed, or its sample budget (train_iters x "
                       "global batch: Megatron's sample order depends on it, %d samples then, %d now) changed; "
                       "training goes on with the new order", source.path, trainer.consumed_samples,
                       source.common["train_samples"], trainer.train_samples)
