"""Fixtures shared across test packages."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_VOCAB = 1024
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def _model_parallel_is_initialized() -> bool:
    parallel_state = sys.modules.get("megatron.core.parallel_state")   # not imported: not initialised
    return parallel_state is not None and parallel_state.model_parallel_is_initialized()


def process_global_state() -> dict[str, Any]:
    """What one test can leave behind for every later test in this process (fixtures of a wider scope are set up
    before, and torn down after, a test's own checks)."""
    return {"torch.get_num_threads()": torch.get_num_threads(),
            "torch.get_default_dtype()": torch.get_default_dtype(),
            "torch.distributed.is_initialized()": torch.distributed.is_initialized(),
            "model_parallel_is_initialized()": _model_parallel_is_initialized(),
            **{f"os.environ[{name!r}]": os.environ.get(name) for name in LAUNCH_ENV},
            **{f"handler of {sig.name}": signal.getsignal(sig) for sig in STOP_SIGNALS}}


def restore_global_state(before: dict[str, Any]) -> None:
    """Put back what a test changed, so that its leak fails that test alone."""
    torch.set_num_threads(before["torch.get_num_threads()"])
    torch.set_default_dtype(before["torch.get_default_dtype()"])
    if _model_parallel_is_initialized() and not before["model_parallel_is_initialized()"]:
        sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
    if torch.distributed.is_initialized() and not before["torch.distributed.is_initialized()"]:
        torch.distributed.destroy_process_group()
    for name in LAUNCH_ENV:
        if before[f"os.environ[{name!r}]"] is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before[f"os.environ[{name!r}]"]
    for sig in STOP_SIGNALS:
        if before[f"handler of {sig.name}"] is not None:   # None: set outside Python, cannot be put back
            signal.signal(sig, before[f"handler of {sig.name}"])


def fail_if_changed(before: dict[str, Any], culprit: str) -> None:
    after = process_global_state()
    changed = [f"{key}: {before[key]!r} -> {after[key]!r}" for key in before if after[key] != before[key]]
    if changed:
        restore_global_state(before)
        pytest.fail(f"{culprit} changed process-wide state and left it so:\n  " + "\n  ".join(changed),
                    pytrace=False)


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    """Fails the test after which the process-wide state that later tests depend on differs (threads, default
    dtype, process groups, launcher environment, stop-signal handlers), and restores it."""
    before = process_global_state()
    yield
    fail_if_changed(before, "the test")


@pytest.fixture(scope="module", autouse=True)
def no_leaked_global_state_from_module_fixtures():
    """The same for a test file's module-scoped fixtures (set up after, and torn down before, this check); the
    error is reported at the teardown of the file's last test."""
    before = process_global_state()
    yield
    fail_if_changed(before, "this test file (a module-scoped fixture)")


@pytest.fixture
def restored_stop_signals():
    """For tests that build a Trainer in this process: its PreemptionHandler takes SIGTERM and the exit signal and
    does not give them back."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        if handler is not None:
            signal.signal(sig, handler)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """`umtrain demo-data` output (corpus, SentencePiece tokenizer, indexed sources, blend) in a temp dir."""
    from umtrain.cli.main import main

    out = tmp_path_factory.mktemp("demo_data")
    assert main(["demo-data", "--out", str(out), "--vocab-size", str(DEMO_VOCAB), "--workers", "1"]) == 0
    return out


def demo_config(demo_dataset: Path, **sections) -> dict:
    """configs/demo.yaml pointed at `demo_dataset`, with per-section overrides."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data_path = config["data"]["data_path"]
    config["data"]["data_path"] = [str(demo_dataset / Path(p).name) if i % 2 else p for i, p in enumerate(data_path)]
    config["data"]["tokenizer_model"] = str(demo_dataset / "tokenizer.model")
    config["data"]["cache_path"] = None
    config["checkpoint"] = {"save": None}
    config["logging"] = {"log_interval": 1000, "progress_bar": False, "memory_stats": False}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
