"""The trainer's AdamW runs torch's fused kernel: same updates as torch's foreach AdamW, `step` where the kernel
reads it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.distributed import tiny_config, train_on_ranks
from umtrain.train.optimizer import use_fused_adamw


def chained(adam: torch.optim.Optimizer) -> SimpleNamespace:
    """What `use_fused_adamw` reads of Megatron's ChainedOptimizer."""
    return SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def adamw_pair(seed: int = 0, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 2, 4)]
    params = [torch.randn(shape, generator=generator).to(device) for shape in shapes]
    reference = [p.clone().requires_grad_() for p in params]
    fused = [p.clone().requires_grad_() for p in params]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return (reference, torch.optim.AdamW(reference, foreach=True, **settings),
            fused, torch.optim.AdamW(fused, **settings), generator)


def step_both(reference, reference_adam, fused, fused_adam, generator) -> None:
    for a, b in zip(reference, fused):
        grad = torch.randn(a.shape, generator=generator).to(a.device)
        a.grad, b.grad = grad.clone(), grad.clone()
    reference_adam.step()
    fused_adam.step()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_makes_the_foreach_updates(device):
    reference, reference_adam, fused, fused_adam, generator = adamw_pair(0, device)
    use_fused_adamw(chained(fused_adam))
    assert all(group["fused"] for group in fused_adam.param_groups)
    for _ in range(5):
        step_both(reference, reference_adam, fused, fused_adam, generator)
    for a, b in zip(reference, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_loaded_elsewhere_is_moved_and_keeps_counting(device):
    """A checkpoint may hand back `step` on another device (the host) or in another dtype: the kernel needs the
    parameter's device and float32, and bias correction needs the count to go on from the loaded value."""
    reference, reference_adam, fused, fused_adam, generator = adamw_pair(1, device)
    for _ in range(3):
        step_both(reference, reference_adam, fused, fused_adam, generator)
    for state in fused_adam.state.values():
        state["step"] = state["step"].to("cpu", torch.float64)
    use_fused_adamw(chained(fused_adam))
    for _ in range(2):
        step_both(reference, reference_adam, fused, fused_adam, generator)
    assert {(s["step"].device.type, s["step"].dtype, float(s["step"])) for s in fused_adam.state.values()} == {
        (device, torch.float32, 5.0)}
    for a, b in zip(reference, fused):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_state_saved_unfused_loads_fused():
    """A checkpoint of a run that stepped with foreach AdamW (an older umtrain) holds `fused: None` in its groups,
    which loading would otherwise restore."""
    _, unfused_adam, _, fused_adam, _ = adamw_pair(2)
    use_fused_adamw(chained(fused_adam))
    fused_adam.load_state_dict(unfused_adam.state_dict())
    assert [(group["fused"], group["foreach"]) for group in fused_adam.param_groups] == [(True, None)]


def fused_flags(trainer) -> list[bool]:
    return [group["fused"] for inner in trainer.optimizer.chained_optimizers
            for group in inner.optimizer.param_groups]


@pytest.mark.slow
def test_the_trainers_adamw_is_fused():
    backend = "nccl" if torch.cuda.is_available() else "gloo"    # gloo with a CUDA model crashes its rank
    flags = train_on_ranks(tiny_config(training={"train_iters": 1}), 1, collect=fused_flags, backend=backend)[0]
    assert flags and all(flags)
