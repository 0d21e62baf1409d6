"""The training samples a resumed run reads: never a replay of samples the saved run trained on, also when the
global batch or train_iters change; a resume that reads other samples than the saved run would have is reported."""

from __future__ import annotations

import logging

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_dataset import BlendedDataset

from tests.checkpoint.helpers import run_config
from tests.conftest import demo_config
from umtrain.config import config_from_dict
from umtrain.parallel.comm import run_local_group
from umtrain.train.batches import MicroBatches
from umtrain.train.trainer import resumed_sample_budget

CHANGED_ORDER = "is not what that run would have read next"
TINY_DENSE = {"family": "dense", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "memory": None}


def sample_span(dataset, index: int) -> tuple[int, ...]:
    """Where sample `index` of a (one-epoch) GPTDataset or blend lies in the corpus, whatever the sample order: its
    source, its first document and offset, its last document and offset. (Mock documents are token ranges, so two
    samples can hold the same tokens: their tokens do not tell them apart.)"""
    source = 0
    if isinstance(dataset, BlendedDataset):
        dataset[index]   # maps the lazily loaded blend indices
        source = int(dataset.dataset_index[index])
        dataset, index = dataset.datasets[source], int(dataset.dataset_sample_index[index])
    j = int(dataset.shuffle_index[index])
    (begin, begin_offset), (end, end_offset) = dataset.sample_index[j], dataset.sample_index[j + 1]
    return (source, int(dataset.document_index[begin]), int(begin_offset), int(dataset.document_index[end]),
            int(end_offset))


def sample_recording_worker(rank: int, world_size: int, config_dict: dict) -> dict:
    """Train (resuming if the config's save directory holds a checkpoint); the spans of the training samples read,
    in order, and the umtrain warnings logged."""
    from umtrain.train.trainer import Trainer

    warnings: list[str] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("umtrain").addHandler(handler)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config_from_dict(config_dict, world_size=world_size))
        batches = trainer.train_batches
        read: list[tuple[int, ...]] = []
        read_micro_batch = batches.micro_batch

        def recording(consumed: int, micro: int) -> dict:
            read.extend(sample_span(batches.dataset, i) for i in batches.micro_batch_indices(consumed, micro))
            return read_micro_batch(consumed, micro)

        batches.micro_batch = recording
        trainer.train()
        return {"read": read, "warnings": warnings}
    finally:
        logging.getLogger("umtrain").removeHandler(handler)
        parallel_state.destroy_model_parallel()


def run(config: dict) -> dict:
    return run_local_group(sample_recording_worker, 1, config)[0]


def with_training(config: dict, **training) -> dict:
    return {**config, "training": {**config["training"], **training}}


@pytest.mark.slow
def test_a_smaller_global_batch_on_resume_reads_new_samples(demo_dataset, tmp_path):
    """4 steps of 8 samples of a blend, then 4 more of 4: the resumed steps need samples 32..47, past the 32 the
    first run asked for (the blend used to be rebuilt for train_iters x the new batch = 32 samples, and the resumed
    steps read samples 0..15 again)."""
    config = demo_config(demo_dataset, model=TINY_DENSE, parallel={"tensor_model_parallel_size": 1},
                         training={"train_iters": 4, "global_batch_size": 8, "micro_batch_size": 4, "eval_iters": 0},
                         checkpoint={"save": str(tmp_path / "ckpt")})
    first = run(config)
    resumed = run(with_training(config, train_iters=8, global_batch_size=4))
    assert len(first["read"]) == 32 and len(resumed["read"]) == 16
    assert not set(resumed["read"]) & set(first["read"])
    assert not [w for w in resumed["warnings"] if CHANGED_ORDER in w]


@pytest.mark.slow
def test_a_resume_that_reads_other_samples_is_reported(tmp_path):
    """The same steps after the checkpoint, with another seed (another shuffle): a warning names the change."""
    config = run_config(2, save=str(tmp_path / "ckpt"))
    run(config)
    resumed = run(with_training(config, train_iters=3, seed=7))
    assert [w for w in resumed["warnings"] if CHANGED_ORDER in w]


def test_the_resumed_budget_covers_the_remaining_steps_and_keeps_the_saved_one():
    saved = {"iteration": 4, "consumed_samples": 32, "train_samples": 32}
    assert resumed_sample_budget(8, 4, saved) == 32 + 4 * 4
    assert resumed_sample_budget(8, 16, saved) == 32 + 4 * 16
    assert resumed_sample_budget(5, 8, {**saved, "train_samples": 100}) == 100   # the saved order is kept
    assert resumed_sample_budget(4, 8, saved) == 32                              # nothing left to train
    assert resumed_sample_budget(8, 4, {"iteration": 4, "consumed_samples": 32}) == 48   # before train_samples


def test_reading_past_the_split_is_an_error_not_a_replay():
    dataset = [{"tokens": torch.tensor([i])} for i in range(8)]
    batches = MicroBatches(dataset, global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    assert batches.micro_batch(4, 1)["tokens"].flatten().tolist() == [6, 7]
    with pytest.raises(RuntimeError, match="past the 8"):
        batches.micro_batch(8, 0)
