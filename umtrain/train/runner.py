"""A model under this process group's (TP, PP, DP) layout with its data and its forward-only evaluation: what
`umtrain evaluate` needs, and what `Trainer` extends with data-parallel wrapping, the optimizer and checkpoints."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from umtrain.checkpoint import Checkpointer
from umtrain.config import Config
from umtrain.model.build import build_model_chunks, unwrap
from umtrain.model.gpt import padded_vocab_size, transformer_config
from umtrain.model.memory_block import memory_modules
from umtrain.parallel.collectives import loss_on_every_rank
from umtrain.parallel.memory_tables import mark_memory_parameters
from umtrain.parallel.parallelize import mark_expert_parameters, memory_layer_parallelism
from umtrain.parallel.state import Layout, initialize_distributed, seed_everything
from umtrain.train.batches import MicroBatches


@dataclass
class History:
    """Per-step values every rank agrees on (tests compare them across layouts)."""

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    value_lr: list[float] = field(default_factory=list)
    valid_loss: dict[int, float] = field(default_factory=dict)


def masked_mean_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean cross entropy of one micro-batch (Megatron divides it by the micro-batch count in place)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, functools.partial(masked_mean_loss, batch["loss_mask"])


def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Through pinned host memory: a copy from pageable memory may wait for the stream, i.e. for the step before."""
    if not torch.cuda.is_available():
        return batch
    return {k: v.pin_memory().cuda(non_blocking=True) for k, v in batch.items()}


class ModelRunner:
    """Builds the process groups, the data splits (the training split for `_training_samples()` samples) and the
    model chunks, unwrapped: no gradient buffers, no optimizer. `iteration`, `consumed_samples` and `history` are
    the progress a loaded checkpoint restores."""

    def __init__(self, config: Config):
        self.config = config
        self.layout: Layout = initialize_distributed(config)
        seed_everything(config.training.seed)
        self.tokenizer = self._load_tokenizer()
        self.vocab_size = padded_vocab_size(config, self.tokenizer.vocab_size)
        self.tconfig = transformer_config(config)
        self.train_samples = self._training_samples()   # first: a checkpoint that cannot be used fails before the model
        self.model = self._build_model()   # before the data: a model that cannot run here fails before any index build
        self.datasets = self._build_datasets(self.train_samples)
        self.valid_batches = self.batches_of(self.datasets[1])
        self.iteration = 0
        self.consumed_samples = 0
        self.history = History()

    def _training_samples(self) -> int:
        """Samples to build the training split for (called once the process groups exist): the run's own
        `train_iters x global_batch_size`. Megatron builds every split of a blend, and caches each split's index
        under its size: asking for the size the training run asked for finds its index in the cache."""
        return self.config.training.train_iters * self.config.training.global_batch_size

    def _load_tokenizer(self):
        from umtrain.data.tokenizer import MockTokenizer, load_tokenizer

        d = self.config.data
        return MockTokenizer(d.mock_vocab_size) if d.mock else load_tokenizer(d.tokenizer_type, d.tokenizer_model)

    def _build_datasets(self, train_samples: int):
        from umtrain.data.datasets import build_gpt_datasets

        # Every validation reads the same first eval_iters batches: asking for just those keeps them the same
        # whatever train_iters and eval_interval are (Megatron's sample order changes with the epochs it covers).
        eval_samples = self.config.training.eval_iters * self.config.training.global_batch_size
        return build_gpt_datasets(self.config, self.tokenizer, train_samples, eval_samples, eval_samples)

    def _build_model(self) -> list[torch.nn.Module]:
        config = self.config
        chunks = build_model_chunks(config, self.tconfig, self.vocab_size, memory_layer_parallelism(config))
        for chunk in chunks:
            mark_memory_parameters(memory_modules(chunk), config)
            mark_expert_parameters(chunk)
        if self.tconfig.bf16:
            chunks = [Float16Module(self.tconfig, chunk) for chunk in chunks]
        return chunks

    def batches_of(self, dataset) -> MicroBatches:
        """This rank's micro-batches of `dataset` (token ids checked against the tokenizer)."""
        t = self.config.training
        return MicroBatches(dataset, t.global_batch_size, t.micro_batch_size, parallel_state.get_data_parallel_rank(),
                            parallel_state.get_data_parallel_world_size(), self.tokenizer.vocab_size)

    @property
    def num_chunks(self) -> int:
        return len(self.model)

    @property
    def memory_layers(self) -> list[torch.nn.Module]:
        return [m for chunk in self.model for m in memory_modules(unwrap(chunk))]

    def _run_schedule(self, batches: MicroBatches, consumed: int, forward_only: bool) -> list[dict]:
        t = self.config.training
        iterators = batches.iterators(consumed, self.num_chunks, to_device)
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if self.num_chunks > 1 else iterators[0],
            model=self.model if self.num_chunks > 1 else self.model[0],
            num_microbatches=batches.num_micro_batches,
            seq_length=self.config.data.seq_length,
            micro_batch_size=t.micro_batch_size,
            forward_only=forward_only,
        )

    def _mean_loss(self, loss_dicts: list[dict]) -> float:
        """DP-mean of this global batch's micro-batch losses, known on every rank afterwards."""
        return loss_on_every_rank([d["lm loss"] for d in loss_dicts], self.layout.is_logging_rank)

    @torch.no_grad()
    def evaluate(self, batches: Optional[MicroBatches] = None) -> float:
        """Mean loss of the first `training.eval_iters` global batches of `batches` (default: the validation
        split's), in eval mode."""
        batches = self.valid_batches if batches is None else batches
        for chunk in self.model:
            chunk.eval()
        losses = []
        batch_size = self.config.training.global_batch_size
        for i in range(self.config.training.eval_iters):
            losses.append(self._mean_loss(self._run_schedule(batches, i * batch_size, forward_only=True)))
        for chunk in self.model:
            chunk.train()
        return sum(losses) / len(losses)


class CheckpointRunner(ModelRunner):
    """The runner of `checkpoint.load`'s weights (evaluation): its training split is built for the sample budget
    the checkpoint's run built it for, whose index is in the cache (another size would build, and write, another).
    `load_weights()` loads them; the checkpoint is verified before anything of it is read."""

    def __init__(self, config: Config):
        self.checkpointer = Checkpointer(config)
        super().__init__(config)

    def _training_samples(self) -> int:
        common = self.checkpointer.weights_source().common
        return common.get("train_samples") or super()._training_samples()

    def load_weights(self) -> None:
        self.checkpointer.load_weights(self)
