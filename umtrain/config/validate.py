"""Rules that span sections: the parallel layout against the model, the batch and the files on disk.

All of them run before any process group, dataset or model exists, so a bad config costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from umtrain.config.base import ConfigError
from umtrain.config.schema import Config


def data_parallel_size(config: Config, world_size: int) -> int:
    p = config.parallel
    return world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)


def pipeline_chunk_of_layer(config: Config, layer: int) -> int:
    """Index of the pipeline chunk (stage x virtual stage) that holds 1-based `layer`, with uniform splits."""
    p = config.parallel
    chunks = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
    return (layer - 1) // (config.model.num_layers // chunks)


def validate_config(config: Config, world_size: Optional[int] = None, check_files: bool = True) -> None:
    _validate_model_parallel(config)
    _validate_memory_placements(config)
    _validate_profile_window(config)
    if world_size is not None:
        _validate_world(config, world_size)
    if check_files:
        _validate_files(config)


def _validate_model_parallel(config: Config) -> None:
    m, p = config.model, config.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if m.num_attention_heads % tp:
        raise ConfigError("parallel.tensor_model_parallel_size",
                          f"TP={tp} does not divide model.num_attention_heads={m.num_attention_heads}")
    if m.ffn_size % tp:
        raise ConfigError("parallel.tensor_model_parallel_size", f"TP={tp} does not divide the FFN size {m.ffn_size}")
    if m.vocab_size is not None and m.vocab_size % tp:
        raise ConfigError("model.vocab_size", f"{m.vocab_size} is not divisible by TP={tp} (the embedding is split "
                                              f"over the TP ranks)")
    if m.family == "moe" and m.moe.moe_ffn_hidden_size is not None and m.moe.moe_ffn_hidden_size % tp:
        raise ConfigError("model.moe.moe_ffn_hidden_size", f"{m.moe.moe_ffn_hidden_size} is not divisible by TP={tp}")
    chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
    if m.num_layers % chunks:
        raise ConfigError("parallel.pipeline_model_parallel_size",
                          f"num_layers={m.num_layers} is not divisible into {chunks} pipeline chunks")
    if p.virtual_pipeline_model_parallel_size and pp == 1:
        raise ConfigError("parallel.virtual_pipeline_model_parallel_size", "needs pipeline_model_parallel_size > 1")
    if p.sequence_parallel and config.data.seq_length % tp:
        raise ConfigError("data.seq_length", f"sequence parallel needs seq_length divisible by TP={tp}")
    t = config.training
    if t.recompute_granularity == "full" and (m.num_layers // chunks) % t.recompute_num_layers:
        raise ConfigError("training.recompute_num_layers",
                          f"full recompute runs in chunks of {t.recompute_num_layers} layers, which must divide the "
                          f"{m.num_layers // chunks} layers of each pipeline chunk (model.num_layers={m.num_layers} "
                          f"over {chunks} chunks)")
    if m.family == "moe" and tp > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel", "Megatron-Core's MoE layer refuses to train with TP > 1 "
                          "without sequence parallelism: set it to true")
    if m.family == "moe" and m.moe.num_experts % p.expert_model_parallel_size:
        raise ConfigError("parallel.expert_model_parallel_size",
                          f"EP={p.expert_model_parallel_size} does not divide model.moe.num_experts={m.moe.num_experts}")
    if m.has_memory:
        _validate_memory_sharding(config)
        _validate_memory_sequence_split(config)
    elif p.memory_parallel_group != "data":
        raise ConfigError("parallel.memory_parallel_group", f"is for memory families (pkm, ultramem), not {m.family}")


def _validate_profile_window(config: Config) -> None:
    log = config.logging
    if log.profile_dir is not None and log.profile_start > config.training.train_iters:
        raise ConfigError("logging.profile_start", f"step {log.profile_start} is after the last step, "
                                                   f"training.train_iters={config.training.train_iters}")


def _validate_memory_sharding(config: Config) -> None:
    from umtrain.parallel.cost_model import dimension_wise_problem

    memory, size = config.model.memory, config.parallel.expert_model_parallel_size
    if memory.sharding_mode == "dimension":
        problem = dimension_wise_problem(memory.value_dim, memory.num_cores, size)
        if problem:
            raise ConfigError("model.memory.sharding_mode", problem)
    if memory.sharding_mode != "dimension" and memory.num_values % size:
        raise ConfigError("model.memory.num_values",
                          f"N={memory.num_values} is not divisible by the memory-parallel size P={size}: "
                          "number-wise shards must be equal for checkpoint resharding")


def _validate_memory_sequence_split(config: Config) -> None:
    """Under sequence parallelism a memory layer runs on this rank's slice, and its query conv takes the k-1 tokens
    before the slice from the previous TP rank only (umtrain.parallel.sequence)."""
    p, kernel = config.parallel, config.model.memory.query_conv_kernel
    local = config.data.seq_length // p.tensor_model_parallel_size
    if p.sequence_parallel and kernel - 1 > local:
        raise ConfigError("model.memory.query_conv_kernel",
                          f"a kernel of {kernel} reaches {kernel - 1} tokens back, more than the {local} tokens of one "
                          f"TP rank's slice under sequence parallelism (data.seq_length {config.data.seq_length} / "
                          f"TP {p.tensor_model_parallel_size})")


def _validate_memory_placements(config: Config) -> None:
    m, p, t = config.model, config.parallel, config.training
    if not m.has_memory:
        return
    for i, (a, b) in enumerate(m.memory.parsed_placements("model.memory")):
        key = f"model.memory.placements[{i}]"
        if pipeline_chunk_of_layer(config, a) != pipeline_chunk_of_layer(config, b):
            chunks = p.pipeline_model_parallel_size * (p.virtual_pipeline_model_parallel_size or 1)
            per_chunk = m.num_layers // chunks
            boundary = (pipeline_chunk_of_layer(config, a) + 1) * per_chunk
            raise ConfigError(key, f"placement '{a}:{b}' crosses the pipeline-stage boundary after layer {boundary} "
                                   f"({chunks} chunks of {per_chunk} layers); both ends must sit on one stage")
        if t.recompute_granularity == "full":
            n = t.recompute_num_layers
            if (a - 1) // n != (b - 1) // n:
                raise ConfigError("training.recompute_num_layers",
                                  f"full recompute in chunks of {n} layers splits memory placement '{a}:{b}'")


def _validate_world(config: Config, world_size: int) -> None:
    p, t = config.parallel, config.training
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ConfigError("parallel", f"world size {world_size} is not divisible by TP x PP = {tp} x {pp} (start "
                                      f"a multiple of {tp * pp} processes: `--nproc-per-node N`, torchrun, or "
                                      f"`srun -n N`)")
    dp = data_parallel_size(config, world_size)
    ep = p.expert_model_parallel_size
    if p.memory_parallel_group == "tensor_data":
        if (tp * dp) % ep or (ep % tp and tp % ep):
            raise ConfigError("parallel.expert_model_parallel_size",
                              f"a memory-parallel group over TP x DP ranks needs P={ep} to divide TP x DP = {tp * dp} "
                              f"and to divide or be a multiple of TP={tp}")
    elif dp % ep:
        raise ConfigError("parallel.expert_model_parallel_size",
                          f"EP/memory-parallel size {ep} does not divide DP={dp} (groups of data-parallel ranks; "
                          "parallel.memory_parallel_group: tensor_data also spans TP ranks)")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError("training.global_batch_size",
                          f"{t.global_batch_size} is not divisible by micro_batch_size x DP = "
                          f"{t.micro_batch_size} x {dp}")
    # Megatron's interleaved schedule takes micro-batches in groups of N = microbatch_group_size_per_vp_stage (default
    # PP, as umtrain leaves it) and refuses N > M and a last group of 0 < M % N < PP: with N = PP, any M % PP != 0
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    if p.virtual_pipeline_model_parallel_size and microbatches % pp:
        raise ConfigError("training.global_batch_size",
                          f"the interleaved pipeline schedule (virtual_pipeline_model_parallel_size="
                          f"{p.virtual_pipeline_model_parallel_size}) needs the micro-batches per step, "
                          f"global_batch_size / (micro_batch_size x DP) = {t.global_batch_size} / "
                          f"({t.micro_batch_size} x {dp}) = {microbatches}, to be a multiple of PP={pp} (at least PP)")


def _validate_files(config: Config) -> None:
    from umtrain.data.datasets import check_every_split_has_documents, parse_blend

    if config.parallel.comm_calibration is not None:
        _check_calibration(config.parallel.comm_calibration)
    d = config.data
    if d.mock:
        return
    parse_blend(d.data_path, "data.data_path")
    if d.valid_data_path:
        parse_blend(d.valid_data_path, "data.valid_data_path")
    if d.tokenizer_model:
        _check_tokenizer_model(d.tokenizer_type, Path(d.tokenizer_model))
    check_every_split_has_documents(d)


def tokenizer_json(path: Path) -> Path:
    """The tokenizer.json a Hugging Face `data.tokenizer_model` names: the file itself, or the one in a folder."""
    return path / "tokenizer.json" if path.is_dir() else path


def _check_tokenizer_model(tokenizer_type: str, path: Path) -> None:
    """What `umtrain.data.tokenizer.load_tokenizer` opens: a file, or for Hugging Face a folder with tokenizer.json."""
    if tokenizer_type == "huggingface" and path.is_dir():
        if not tokenizer_json(path).is_file():
            raise ConfigError("data.tokenizer_model", f"{path} is a directory without tokenizer.json")
    elif path.is_dir():
        raise ConfigError("data.tokenizer_model", f"{path} is a directory, not a {tokenizer_type} model file")
    elif not path.is_file():
        raise ConfigError("data.tokenizer_model", f"{path} not found")


def _check_calibration(path: str) -> None:
    from umtrain.parallel.cost_model import Calibration

    try:
        Calibration.load(path)
    except ConfigError as err:
        raise ConfigError("parallel.comm_calibration", str(err)) from None
