"""`torch.profiler` over a window of training steps (`logging.profile_dir`, `profile_start`, `profile_steps`).

Every rank records its own trace (`trace_rank{R}_steps{A}-{B}.json`, for chrome://tracing or Perfetto) and its own
summary (`summary_rank{R}_steps{A}-{B}.txt`: operators ranked by their own device time on CUDA, CPU time on CPU);
the logging rank also logs its summary. Steps are the 1-based numbers of the log lines: `profile_start: 10,
profile_steps: 2` records steps 10 and 11, and what runs between them (a log line, validation, a save).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch.profiler import ProfilerActivity, profile

from umtrain.config.schema import LoggingConfig

logger = logging.getLogger("umtrain")

SUMMARY_ROWS = 25


class StepProfiler:
    """Starts before step `profile_start`, stops after step `profile_start + profile_steps - 1`; inert without a
    `profile_dir`."""

    def __init__(self, config: LoggingConfig, rank: int, log_summary: bool):
        self.directory = Path(config.profile_dir) if config.profile_dir else None
        self.first, self.last = config.profile_start, config.profile_start + config.profile_steps - 1
        self.rank, self.log_summary = rank, log_summary
        self.profiler: Optional[profile] = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)     # an unusable directory fails before training

    def before_step(self, step: int) -> None:
        if self.directory is not None and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities, record_shapes=True)
            self.profiler.start()

    def after_step(self, step: int) -> None:
        if self.profiler is not None and step == self.last:
            self.stop()

    def stop(self) -> None:
        """Stop and write (also when training ends inside the window)."""
        if self.profiler is None:
            return
        profiler, self.profiler = self.profiler, None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        profiler.stop()
        window = f"rank{self.rank}_steps{self.first}-{self.last}"
        profiler.export_chrome_trace(str(self.directory / f"trace_{window}.json"))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        summary = profiler.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS, max_name_column_width=60)
        (self.directory / f"summary_{window}.txt").write_text(summary)
        if self.log_summary:
            logger.info("profile of steps %d-%d (rank %d; trace and summary in %s):\n%s", self.first, self.last,
                        self.rank, self.directory, summary)
