"""The overlap runners against the synchronous one: a memory layer started before other work and finished after
it gives the same output and gradients (the thread runner on CPU; the side-stream runner on a GPU, skipped here)."""

from __future__ import annotations

import pytest
import torch

from umtrain.config.schema import MemoryConfig
from umtrain.model.memory import MemoryLayer
from umtrain.ops.lookup_reduce import get_lookup_reduce
from umtrain.parallel.overlap import StreamRunner, SyncRunner, ThreadRunner

MEMORY = MemoryConfig(num_values=1024, value_dim=32, key_dim=16, num_heads=2, topk=8, ive_expansion=4, tucker_rank=2,
                      num_cores=2, query_conv_kernel=3)
HIDDEN = 64


def run_through(runner, device: str, lookup_impl: str) -> list[torch.Tensor]:
    """Block a: x = LN-like input, start the layer on it; blocks a..b: unrelated matmuls on the main path; block b:
    finish and add; then backward. Returns the output and every gradient."""
    torch.manual_seed(0)
    layer = MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=0, layer_index=0,
                        lookup=get_lookup_reduce(lookup_impl)).to(device)
    inputs = torch.randn(16, 2, HIDDEN, device=device, requires_grad=True)
    block = torch.randn(HIDDEN, HIDDEN, device=device, requires_grad=True)
    x = torch.tanh(inputs)
    h, pending = runner.start(layer, x, x)
    for _ in range(8):
        h = torch.tanh(h @ block)
    out = runner.finish(pending) + h
    (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
    return [out.detach(), inputs.grad, block.grad, *(p.grad for p in layer.parameters())]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], tolerance: float) -> None:
    assert len(actual) == len(expected)
    for i, (got, want) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("backward", [True, False])
def test_thread_runner_matches_sync(backward: bool):
    expected = run_through(SyncRunner(), "cpu", "reference")
    assert_same(run_through(ThreadRunner(backward=backward), "cpu", "reference"), expected, tolerance=0)


def test_thread_runner_backward_runs_on_the_worker():
    """The memory layer's backward (here: its parameters' gradient hooks) runs on the worker thread, off the
    thread that called backward(); without gradients (eval) the forward still runs there and returns the same."""
    import threading

    runner = ThreadRunner()
    layer = MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=0, layer_index=0, lookup=get_lookup_reduce("reference"))
    threads = set()
    for param in layer.parameters():
        param.register_hook(lambda grad: threads.add(threading.current_thread().name) or grad)
    x = torch.randn(4, 2, HIDDEN, requires_grad=True)
    main, pending = runner.start(layer, x, x * 2)
    (runner.finish(pending) + main).sum().backward()
    assert threads and all(name.startswith("umtrain-memory") for name in threads)
    with torch.no_grad():
        main, pending = runner.start(layer, x, x)
        torch.testing.assert_close(runner.finish(pending), layer(x), rtol=0, atol=0)


def test_a_memory_output_without_gradient_does_not_block_backward():
    """If the loss does not depend on the memory output, block a's backward must not wait for a memory backward
    that never starts."""
    runner = ThreadRunner()
    layer = MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=0, layer_index=0, lookup=get_lookup_reduce("reference"))
    x = torch.randn(4, 2, HIDDEN, requires_grad=True)
    main, pending = runner.start(layer, x, x)
    runner.finish(pending)
    main.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lookup_impl", ["reference", "triton"])
def test_stream_runner_matches_sync(lookup_impl: str):
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = run_through(SyncRunner(), "cuda", lookup_impl)
    # Table gradients accumulate with atomics on CUDA (order not fixed): equal to float32 rounding.
    assert_same(run_through(StreamRunner(), "cuda", lookup_impl), expected, tolerance=1e-6)
