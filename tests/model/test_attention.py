"""Per-document attention (`data.reset_attention_mask`): in a sequence holding two documents, the second one's
logits equal those of the same document run on its own (the model's real path: Megatron's GPTModel around
SDPACoreAttention, the dataset's own mask builder)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from tests.distributed import tiny_config, train_on_ranks

EOD = 0


def second_document_logits(trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(with the per-document mask, with the plain causal mask, alone), the second document's logits."""
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randint(1, 256, (9,), generator=generator), torch.randint(1, 256, (7,), generator=generator)
    tokens = torch.cat([first, torch.tensor([EOD]), second])
    mask, _, positions = _get_ltor_masks_and_position_ids(tokens, EOD, reset_position_ids=True,
                                                          reset_attention_mask=True, eod_mask_loss=False,
                                                          create_attention_mask=True)
    model = trainer.model[0]
    model.eval()
    with torch.no_grad():
        masked = model(tokens[None], positions[None], mask[None])[0, -len(second):]
        causal = model(tokens[None], positions[None], None)[0, -len(second):]
        alone = model(second[None], torch.arange(len(second))[None], None)[0]
    return masked, causal, alone


@pytest.mark.slow
def test_a_document_attends_to_itself_only():
    config = tiny_config(training={"train_iters": 1})
    ((masked, causal, alone),) = train_on_ranks(config, 1, collect=second_document_logits)
    torch.testing.assert_close(masked, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(causal, alone, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_training_applies_the_per_document_mask():
    """The trainer hands the batch's mask to the model: the mock corpus has document ends within sequences, so the
    losses change with the flag (they were bit-identical when the mask was dropped)."""
    runs = [train_on_ranks(tiny_config(training={"train_iters": 2}, data={"reset_attention_mask": flag}), 1)[0].loss
            for flag in (False, True)]
    assert runs[0] != runs[1]
