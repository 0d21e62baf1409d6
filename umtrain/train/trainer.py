"""The training loop: Megatron-Core schedules over (TP, PP, DP) model chunks, AdamW, evaluation and logging."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from umtrain.checkpoint import Checkpointer, PreemptionHandler, Preempted
from umtrain.config import Config
from umtrain.model.build import unwrap
from umtrain.model.memory_block import MEMORY_AUX_LOSS
from umtrain.parallel.collectives import aux_losses_over_pipeline, memory_health_over_ranks
from umtrain.parallel.memory_tables import check_table_overflow
from umtrain.parallel.parallelize import wrap_data_parallel
from umtrain.train.metrics import (
    MetricsWriter,
    format_line,
    format_memory_health,
    memory_in_use_gib,
    perplexity_of,
    peak_flops_per_device,
    training_flops_per_token,
)
from umtrain.train.optimizer import build_optimizer, guarded_step
from umtrain.train.profiling import StepProfiler
from umtrain.train.runner import History, ModelRunner
from umtrain.train.schedule import apply_lr, warmup_overrun

logger = logging.getLogger("umtrain")

AUX_LOSS_LOG_NAMES = {MEMORY_AUX_LOSS: "aux_loss", "load_balancing_loss": "moe_aux_loss"}


class TrainStep(NamedTuple):
    """What one training step reports."""
    loss: float
    grad_norm: float
    applied: bool
    """False when the update was skipped (non-finite loss or gradient norm)."""
    lr: float


@dataclass
class StepWindow:
    """Seconds spent in training steps (evaluation and saving excluded) and the steps taken since the last log line;
    steps skipped so far in this run."""

    seconds: float = 0.0
    steps: int = 0
    skipped: int = 0

    def restart(self) -> None:
        self.seconds, self.steps = 0.0, 0


def resumed_sample_budget(train_iters: int, global_batch_size: int, common: dict) -> int:
    """Training samples to build for a run resumed from a checkpoint with `common` state: enough for the steps
    left after its `consumed_samples` (also when the global batch changed), and at least the saved run's own budget,
    since Megatron's sample order depends on the budget: keeping it keeps the order."""
    remaining = max(train_iters - int(common["iteration"]), 0) * global_batch_size
    return max(int(common.get("train_samples", 0)), int(common["consumed_samples"]) + remaining)


class Trainer(ModelRunner):
    def __init__(self, config: Config):
        self.preemption = PreemptionHandler(config.training.exit_signal)   # first: a signal during setup is kept
        self.checkpointer = Checkpointer(config)
        try:
            self._build(config)
        except BaseException:
            self.preemption.restore()      # a Trainer that could not be built gives the stop signals back
            self.checkpointer.release()
            raise
        self.metrics = MetricsWriter(config, enabled=self.layout.is_logging_rank, start_step=self.iteration)
        self.profiler = StepProfiler(config.logging, self.layout.rank, log_summary=self.layout.is_logging_rank)
        if self.profiler.directory is not None and self.iteration >= config.logging.profile_start:
            if self.layout.is_logging_rank:
                logger.warning("logging.profile_start=%d: the run resumes at step %d, after it; nothing will be "
                               "profiled", config.logging.profile_start, self.iteration + 1)
        overrun = warmup_overrun(config)
        if overrun and self.layout.is_logging_rank:
            logger.warning(overrun)

    def _build(self, config: Config) -> None:
        super().__init__(config)
        self.model = wrap_data_parallel(config, self.tconfig, self.model)
        self.optimizer = build_optimizer(config, self.model)
        self.train_batches = self.batches_of(self.datasets[0])
        self.flops_per_token = self._training_flops_per_token()
        self.checkpointer.resume(self)

    def _training_samples(self) -> int:
        source = self.checkpointer.resume_source()
        if source is None:
            return super()._training_samples()
        t = self.config.training
        return resumed_sample_budget(t.train_iters, t.global_batch_size, source.common)

    def _training_flops_per_token(self) -> float:
        from umtrain.model.accounting import count

        return training_flops_per_token(self.config, count(self.config).flops_per_token, self.vocab_size)

    @property
    def validates(self) -> bool:
        """Validation runs unless `training.eval_iters` is 0 or the split leaves no validation data."""
        return self.config.training.eval_iters > 0 and self.datasets[1] is not None

    # ----------------------------------------------------------------------------------------- steps
    def train_step(self) -> TrainStep:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr, value_lr = apply_lr(self.config, self.optimizer.param_groups, self.iteration)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # Assigned, not `set_loss_scale`'s in-place copy: a backward through an aux loss before any scale was set
        # (another model in this process) leaves a 0-d tensor there, into which no [1]-shaped scale can be copied.
        MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor([1.0 / self.train_batches.num_micro_batches],
                                                                     device=device)
        loss_dicts = self._run_schedule(self.train_batches, self.consumed_samples, forward_only=False)
        loss = self._mean_loss(loss_dicts)
        self.history.lr.append(lr)
        self.history.value_lr.append(value_lr)
        if not math.isfinite(loss):
            return TrainStep(loss, math.nan, False, lr)
        result = guarded_step(self.optimizer, self.config.optimizer.clip_grad)
        if result.applied:
            for memory in self.memory_layers:
                memory.refresh_tdqkr_factors(at_next_forward=self.config.parallel.overlap_param_gather)
        return TrainStep(loss, result.grad_norm, result.applied, lr)

    # ----------------------------------------------------------------------------------------- logging
    def _aux_losses(self, steps: int) -> dict[str, float]:
        """The auxiliary losses tracked over the last `steps` training steps (since the last call), summed over layers
        and averaged over steps and micro-batches: one step's value, whatever the logging interval. Collective over
        the pipeline group."""
        totals = aux_losses_over_pipeline(self.tconfig.num_layers)
        clear_aux_losses_tracker()
        micro_batches = steps * self.train_batches.num_micro_batches
        return {AUX_LOSS_LOG_NAMES.get(name, name): total / micro_batches for name, total in totals.items()}

    def _memory_health(self) -> dict[str, float]:
        """Per memory layer: fraction of values hit, mean top-1 score, output std. Collective over the world."""
        return memory_health_over_ranks([layer for chunk in self.model for layer in unwrap(chunk).modules()
                                         if hasattr(getattr(layer, "memory", None), "health_sums")],
                                        len(self.config.model.memory.placements))

    def _log(self, values: dict[str, float], bar: tqdm) -> None:
        self.metrics.scalars(values, self.iteration)
        if self.layout.is_logging_rank:
            bar.write(format_line(self.iteration, self.config.training.train_iters, values))
            health = format_memory_health(values)
            if health:
                bar.write("    " + health)

    # ----------------------------------------------------------------------------------------- loop
    def train(self) -> History:
        """Train to `training.train_iters`; log records go through the progress bar (not into its line). The stop
        signals' handlers and the save directory are given back at the end, however it ends."""
        try:
            with logging_redirect_tqdm():
                return self._train_loop()
        finally:
            try:
                self.profiler.stop()      # a window that the end of training (or a signal) cut short is written too
            finally:
                self.preemption.restore()
                self.checkpointer.release()

    def _train_loop(self) -> History:
        train_iters = self.config.training.train_iters
        bar = self._progress_bar()
        window = StepWindow()
        if self.iteration >= train_iters and self.layout.is_logging_rank:
            logger.warning("nothing to train: the run is at iteration %d, training.train_iters is %d (raise it to "
                           "train on)", self.iteration, train_iters)
        while self.iteration < train_iters:
            step = self._timed_step(window)
            bar.update(1)
            bar.set_postfix(loss=f"{step.loss:.4f}")
            if self._due(self.config.logging.log_interval):
                self._log_window(step, window, bar)
            if self.validates and self._due(self.config.training.eval_interval):
                self._validate(bar)      # before saving, so that the step's checkpoint holds its validation loss
            if self.checkpointer.should_save(self.iteration):
                self._save()
            self._stop_if_preempted()
        bar.close()
        return self._finish()

    def _progress_bar(self) -> tqdm:
        t = self.config.training
        shown = self.layout.is_logging_rank and self.config.logging.progress_bar and sys.stderr.isatty()
        return tqdm(total=t.train_iters, initial=self.iteration, desc="train", dynamic_ncols=True, disable=not shown)

    def _due(self, interval: int) -> bool:
        """Whether something done every `interval` steps, and after the last step, is due now."""
        return self.iteration % interval == 0 or self.iteration == self.config.training.train_iters

    def _timed_step(self, window: StepWindow) -> TrainStep:
        """One training step, counted in `window` and recorded in the history; a skipped one follows nan_policy."""
        self.profiler.before_step(self.iteration + 1)
        start = time.perf_counter()
        step = self.train_step()
        window.seconds += time.perf_counter() - start   # throughput counts training steps only
        if not step.applied:
            window.skipped += 1
            self._handle_bad_step(step.loss, step.grad_norm)
        self.iteration += 1
        self.consumed_samples += self.config.training.global_batch_size
        window.steps += 1
        self.history.loss.append(step.loss)
        self.history.grad_norm.append(step.grad_norm)
        self.profiler.after_step(self.iteration)
        return step

    def _log_window(self, step: TrainStep, window: StepWindow, bar: tqdm) -> None:
        """Log the last step's values and the window's throughput and auxiliary losses; start a new window."""
        check_table_overflow(self.memory_layers)
        tokens_per_step = self.config.training.global_batch_size * self.config.data.seq_length
        seconds = window.seconds / window.steps
        values = {"loss": step.loss, "lr": step.lr, "grad_norm": step.grad_norm,
                  "tokens_per_s": tokens_per_step / seconds, "ms_per_step": 1000 * seconds,
                  "tflops_per_device": self.flops_per_token * tokens_per_step / seconds / self.layout.world_size / 1e12,
                  "memory_gib": memory_in_use_gib(), "skipped": window.skipped, **self._aux_losses(window.steps)}
        peak = peak_flops_per_device()
        if peak:
            values["mfu"] = values["tflops_per_device"] * 1e12 / peak
        if self.config.logging.memory_stats and self.config.model.has_memory:
            values.update(self._memory_health())
        self._log(values, bar)
        window.restart()

    def _stop_if_preempted(self) -> None:
        """On a requested stop (the exit signal): save, and raise `Preempted`."""
        if not self.preemption.requested():
            return
        self._save()
        self.checkpointer.finalize()
        if not self.checkpointer.enabled:
            raise Preempted(f"stopped by a signal at step {self.iteration}; nothing saved (no checkpoint.save)",
                            saved=False)
        raise Preempted(f"preempted at step {self.iteration}; checkpoint saved", saved=True)

    def _validate(self, bar: tqdm) -> None:
        valid = self.evaluate()
        check_table_overflow(self.memory_layers)
        self.history.valid_loss[self.iteration] = valid
        self.metrics.scalars({"valid_loss": valid}, self.iteration)
        if self.layout.is_logging_rank:
            bar.write(f"validation at step {self.iteration}: loss {valid:.4f} | ppl {perplexity_of(valid):.2f}")

    def _finish(self) -> History:
        """Save the last step unless already saved, wait for an asynchronous save, close the metrics."""
        if self.checkpointer.enabled and self.checkpointer.last_saved_iteration != self.iteration:
            self._save()
        self.checkpointer.finalize()
        self.metrics.close()
        return self.history

    def _save(self) -> None:
        """Save, unless a fixed-capacity table lookup overflowed since the last check: weights trained on wrong
        memory outputs must not become `latest`."""
        check_table_overflow(self.memory_layers)
        self.checkpointer.save(self)

    def _handle_bad_step(self, loss: float, grad_norm: float) -> None:
        message = f"step {self.iteration + 1}: non-finite loss {loss} or grad norm {grad_norm}"
        if self.config.training.nan_policy == "stop":
            if self.checkpointer.enabled:
                self._save()  # the update was not applied: this is the last good state
                self.checkpointer.finalize()
            raise FloatingPointError(message + " (training.nan_policy=stop)")
        if self.layout.is_logging_rank:
            logger.warning(message + "; update skipped (training.nan_policy=skip)")
