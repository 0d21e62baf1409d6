"""The overlap runners against the synchronous one: a memory layer started before other work and finished after
it gives the same output and gradients (the thread runner on CPU; the side-stream runner on a GPU, skipped here)."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from umtrain.config.base import ConfigError
from umtrain.config.schema import MemoryConfig
from umtrain.model.memory import MemoryLayer
from umtrain.ops.lookup_reduce import get_lookup_reduce
from umtrain.parallel.overlap import StreamRunner, SyncRunner, ThreadRunner, memory_runner

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


def reference_layer() -> MemoryLayer:
    return MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=0, layer_index=0, lookup=get_lookup_reduce("reference"))


def test_a_memory_output_without_gradient_does_not_block_backward():
    """If the loss does not depend on the memory output, block a's backward must not wait for a memory backward
    that never starts (run in a thread, so that a hang fails instead of blocking the suite)."""
    runner, layer = ThreadRunner(), reference_layer()
    x = torch.randn(4, 2, HIDDEN, requires_grad=True)
    main, pending = runner.start(layer, x, x)
    runner.finish(pending)
    worker = threading.Thread(target=lambda: main.sum().backward(), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "backward blocked"
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_aux_loss_routed_on_the_worker_matches_sync():
    """The TDQKR aux loss rides on the memory output through Megatron's scaler inside the memory computation, as
    MemoryTransformerLayer.memory_with_aux_loss does: its gradient reaches the cores through the worker's backward."""
    def with_aux(layer):
        return lambda x: MoEAuxLossAutoScaler.apply(layer(x), layer.aux_loss)

    grads = []
    for runner in (SyncRunner(), ThreadRunner()):
        layer = reference_layer()
        x = torch.randn(4, 2, HIDDEN, generator=torch.Generator().manual_seed(0), requires_grad=True)
        main, pending = runner.start(with_aux(layer), x, x)
        (runner.finish(pending) + main).sum().backward()
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    assert layer.aux_loss.requires_grad and layer.aux_loss.item() > 0
    assert_same(grads[1], grads[0], tolerance=0)


def test_worker_errors_and_second_backward_are_reported():
    runner, layer = ThreadRunner(), reference_layer()
    x = torch.randn(4, 2, HIDDEN, requires_grad=True)
    main, pending = runner.start(layer, x, x)
    loss = (runner.finish(pending) + main).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()

    def failing(_: torch.Tensor) -> torch.Tensor:
        raise ValueError("lookup failed")

    main, pending = runner.start(failing, x, x)
    with pytest.raises(ValueError, match="lookup failed"):
        runner.finish(pending)


def test_cpu_overlap_refuses_param_gather_hooks_on_the_worker():
    if torch.cuda.is_available():
        pytest.skip("the GPU runner keeps the forward on the calling thread")
    with pytest.raises(ConfigError, match="model.memory.overlap"):
        memory_runner(True, overlap_param_gather=True)
    assert isinstance(memory_runner(True, overlap_grad_reduce=True), ThreadRunner)
    assert isinstance(memory_runner(False, overlap_param_gather=True), SyncRunner)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("lookup_impl", ["reference", "triton"])
def test_stream_runner_matches_sync(lookup_impl: str):
    torch.backends.cuda.matmul.allow_tf32 = False
    expected = run_through(SyncRunner(), "cuda", lookup_impl)
    # Table gradients accumulate with atomics on CUDA (order not fixed): equal to float32 rounding.
    assert_same(run_through(StreamRunner(), "cuda", lookup_impl), expected, tolerance=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_runner_accumulates_memory_gradients_on_its_stream():
    """With the accumulators adopted before a DDP-like wrapper takes hold of them (Megatron's DDP keeps
    `param.expand_as(param).grad_fn.next_functions[0][0]`), PyTorch does not warn that an AccumulateGrad node's
    stream differs from its gradient's."""
    layer = MemoryLayer(MEMORY, HIDDEN, num_layers=4, seed=0, layer_index=0,
                        lookup=get_lookup_reduce("triton")).cuda()
    runner = StreamRunner()
    runner.adopt_parameters(layer.parameters())
    held_like_ddp = [p.expand_as(p).grad_fn.next_functions[0][0] for p in layer.parameters()]
    inputs = torch.randn(16, 2, HIDDEN, device="cuda", requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x = torch.tanh(inputs)  # not a leaf, as block a's output is: a leaf read on both streams would warn itself
            main, pending = runner.start(layer, x, x)
            (runner.finish(pending) + main).sum().backward()
        torch.cuda.synchronize()
    assert held_like_ddp and not [w for w in caught if "AccumulateGrad" in str(w.message)]
