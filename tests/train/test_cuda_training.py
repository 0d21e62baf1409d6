"""Training on one GPU (NCCL, Triton lookup-reduce, side-stream overlap) against the same run on CPU; skipped
without CUDA. Runs in the device check (scripts/gpu_check.sh)."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.distributed import tiny_config, train_on_ranks

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MEMORY = {"placements": ["1:3"], "num_values": 4096, "value_dim": 32, "key_dim": 16, "topk": 8, "num_cores": 2,
          "tucker_rank": 2, "ive_expansion": 4, "query_conv_kernel": 3}


def ultramem_config(precision: str, overlap: bool) -> dict:
    config = tiny_config(training={"precision": precision, "train_iters": 6})
    config["model"].update(family="ultramem", memory={**MEMORY, "overlap": overlap})
    return config


def losses_on_cpu(config: dict) -> list[float]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUDA_VISIBLE_DEVICES", "")       # the spawned rank sees no GPU: gloo, CPU kernels
        return train_on_ranks(config, 1)[0].loss


def losses_on_gpu(config: dict) -> list[float]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVIDIA_TF32_OVERRIDE", "0")      # float32 means float32 in cuBLAS and cuDNN too
        return train_on_ranks(config, 1, backend="nccl")[0].loss


@pytest.fixture(scope="module")
def fp32_gpu_losses() -> list[float]:
    return losses_on_gpu(ultramem_config("fp32", overlap=False))


def test_fp32_gpu_matches_cpu(fp32_gpu_losses):
    cpu = losses_on_cpu(ultramem_config("fp32", overlap=False))
    assert fp32_gpu_losses == pytest.approx(cpu, rel=1e-4)


def test_side_stream_overlap_gives_the_same_losses(fp32_gpu_losses):
    assert losses_on_gpu(ultramem_config("fp32", overlap=True)) == pytest.approx(fp32_gpu_losses, rel=1e-6)


def test_bf16_tracks_fp32(fp32_gpu_losses):
    bf16 = losses_on_gpu(ultramem_config("bf16", overlap=True))
    assert bf16 == pytest.approx(fp32_gpu_losses, abs=0.05)
    assert bf16[-1] < bf16[0]


def accumulate_grad_stream_warnings(trainer) -> list[str]:
    """PyTorch's warnings about an AccumulateGrad node on another stream than its gradient, in one more step."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train_step()
    return [str(w.message) for w in caught if "AccumulateGrad" in str(w.message)]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_memory_gradients_accumulate_on_the_side_stream(precision):
    """The side-stream runner makes the memory parameters' accumulators before Megatron's DDP (and after the bf16
    cast): otherwise the default stream waits there for the memory layer's backward."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVIDIA_TF32_OVERRIDE", "0")
        (found,) = train_on_ranks(ultramem_config(precision, overlap=True), 1, collect=accumulate_grad_stream_warnings,
                                  backend="nccl")
    assert found == []
