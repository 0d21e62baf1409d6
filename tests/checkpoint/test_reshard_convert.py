"""Resharding ((TP, PP, DP) = (2, 2, 1) -> (1, 1, 1) and (2, 1, 2)) and conversion (portable round trip, Hugging
Face export) of a checkpoint written by a real training run."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint.helpers import FIXED_BATCH, ULTRAMEM, run_config, train
from umtrain.checkpoint import manager
from umtrain.checkpoint.convert import convert, load_portable, read_megatron, read_portable

SAVED_AT, TOTAL = 3, 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A (2, 2, 1) run of TOTAL steps that saved at SAVED_AT; its losses are the reference."""
    root = tmp_path_factory.mktemp("reshard") / "ckpt"
    run = train(run_config(TOTAL, tp=2, pp=2, save=str(root), save_interval=SAVED_AT), 4)
    return root / manager.checkpoint_name(SAVED_AT), run["loss"]


def resume(checkpoint, tp: int, world: int) -> dict:
    return train(run_config(TOTAL, tp=tp, load=str(checkpoint)), world, logits=True)


@pytest.fixture(scope="module")
def single(saved):
    return resume(saved[0], tp=1, world=1)


@pytest.mark.slow
def test_reshard_to_one_process_and_to_tp2_dp2(saved, single):
    checkpoint, losses = saved
    tp2dp2 = resume(checkpoint, tp=2, world=4)
    for run in (single, tp2dp2):
        assert run["start"] == SAVED_AT
        assert run["loss"][SAVED_AT] == pytest.approx(losses[SAVED_AT], abs=1e-5)     # the next step
    torch.testing.assert_close(tp2dp2["logits"], single["logits"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_portable_round_trip_and_hf_export_give_the_same_logits(saved, single, tmp_path):
    from transformers import GPTNeoXForCausalLM

    checkpoint, _ = saved
    portable = convert(checkpoint, tmp_path / "portable", to="portable")
    reference, _ = load_portable(portable)
    with torch.no_grad():
        logits = reference(FIXED_BATCH)[..., :256]
    torch.testing.assert_close(logits, single["logits"], rtol=0, atol=1e-5)

    back = convert(portable, tmp_path / "megatron", to="megatron")
    original, _ = read_megatron(checkpoint)
    round_tripped, _ = read_megatron(back)
    assert original.keys() == round_tripped.keys()
    assert all(torch.equal(original[k], round_tripped[k]) for k in original)
    assert resume(back, tp=1, world=1)["logits"].equal(single["logits"])

    hf_dir = convert(portable, tmp_path / "hf", to="hf")
    hf_model = GPTNeoXForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_logits = hf_model(FIXED_BATCH).logits[..., :256]
    torch.testing.assert_close(hf_logits, single["logits"], rtol=0, atol=1e-4)
    again = convert(hf_dir, tmp_path / "portable-again", to="portable")
    tensors, _, _ = read_portable(portable)
    tensors_again, _, _ = read_portable(again)
    assert all(torch.equal(tensors[k], tensors_again[k]) for k in tensors)


@pytest.mark.slow
def test_ultramem_reference_model_matches_megatron(tmp_path):
    root = tmp_path / "ckpt"
    run = train(run_config(2, save=str(root), model=ULTRAMEM), 1, logits=True)
    reference, _ = load_portable(convert(root, tmp_path / "portable", to="portable"))
    with torch.no_grad():
        logits = reference(FIXED_BATCH)[..., :256]
    torch.testing.assert_close(logits, run["final_logits"], rtol=0, atol=1e-5)
