"""Fixtures of the checkpoint tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.checkpoint import helpers


@pytest.fixture
def launch_cli(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """`launch_cli(config_dict, nproc, *extra)`: helpers.launch_cli in this test's tmp_path. Every session it
    started is killed in teardown, so a failed assertion or timeout leaves no training run behind on the CPUs."""
    sessions: list[subprocess.Popen] = []

    def launch(config_dict: dict, nproc: int, *extra: str) -> subprocess.Popen:
        sessions.append(helpers.launch_cli(tmp_path, config_dict, nproc, *extra))
        return sessions[-1]

    yield launch
    for proc in sessions:
        helpers.kill_session(proc)
