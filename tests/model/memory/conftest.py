"""Memory-layer tests use tiny tensors: one intra-op thread avoids thread overhead on a shared 2-core runner."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_intra_op_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
