"""umtrain.ops.host_sync against a table of what each call does on CUDA (PyTorch's kernels, written out by hand)."""

from __future__ import annotations

import threading

import pytest
import torch

from umtrain.ops.host_sync import record_host_syncs

X = torch.arange(6.0)
MASK = X > 2
REPEATS = torch.tensor([1, 2, 0, 1, 1, 1])


def assign_scalar():
    X.clone()[MASK] = 0.0


def assign_rows():
    X.clone()[MASK] = torch.ones(3)


def assign_a_computed_scalar():
    X.clone()[MASK] = X.max()            # a tensor of the device: on CUDA not a masked_fill


CASES = {
    # name: (call, synchronises on CUDA)
    "item": (lambda: X.sum().item(), True),
    "bool": (lambda: bool(X.sum() > 0), True),
    "tolist": (lambda: X.tolist(), True),
    "numpy": (lambda: X.numpy(), True),
    "cpu": (lambda: X.cpu(), True),
    "to cpu": (lambda: X.to("cpu"), True),
    "to dtype": (lambda: X.to(torch.float64), False),
    "to dtype, copy": (lambda: X.to(torch.float64, copy=True), False),
    "to a tensor's device": (lambda: X.to(torch.zeros(1)), True),
    "nonzero": (lambda: X.nonzero(), True),
    "mask read": (lambda: X[MASK], True),
    "mask fill with a scalar": (assign_scalar, False),
    "mask assign a tensor": (assign_rows, True),
    "mask assign a computed scalar": (assign_a_computed_scalar, True),
    "long index": (lambda: X[torch.tensor([0, 2])], False),
    "repeat_interleave, tensor repeats": (lambda: X.repeat_interleave(REPEATS), True),
    "repeat_interleave, output size given": (lambda: X.repeat_interleave(REPEATS, output_size=6), False),
    "repeat_interleave, int repeats": (lambda: X.repeat_interleave(2), False),
    "histc without range": (lambda: torch.histc(X, bins=3), True),
    "histc with range": (lambda: torch.histc(X, bins=3, min=0, max=6), False),
    "allclose": (lambda: torch.allclose(X, X), True),
    "svdvals": (lambda: torch.linalg.svdvals(torch.eye(2)), True),
    "multinomial": (lambda: torch.multinomial(X + 1, 1), True),
    "multinomial, several with replacement": (lambda: torch.multinomial(X + 1, 4, replacement=True), False),
    "topk": (lambda: X.topk(2), False),
    "matmul": (lambda: X[:4].view(2, 2) @ X[:4].view(2, 2), False),
    "scatter_add": (lambda: torch.zeros(3).scatter_add(0, torch.tensor([0, 0]), torch.ones(2)), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_recorded_exactly_when_cuda_would_wait(name):
    call, expected = CASES[name]
    with record_host_syncs() as found:
        call()
    assert bool(found) == expected, found
    assert all(" at " in entry and __file__ in entry for entry in found)   # the call site is this file


def test_recorders_on_two_threads_restore_the_tensor_methods_whatever_order_they_close():
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "to")}
    opened, release = threading.Event(), threading.Event()
    other: list = []

    def second_recorder():
        with record_host_syncs() as found:
            opened.set()
            release.wait()
        other.append(found)

    thread = threading.Thread(target=second_recorder)
    with record_host_syncs() as first:
        thread.start()
        opened.wait()
        X.tolist()                                   # seen by both recorders
    release.set()
    thread.join()
    X.tolist()                                       # after both closed: seen by neither
    assert len(first) == 1 and len(other[0]) == 1
    assert {name: getattr(torch.Tensor, name) for name in originals} == originals
