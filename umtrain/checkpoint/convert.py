"""Conversion between Megatron checkpoints and the portable form (safetensors + resolved YAML config).

Portable directory: `model.safetensors` (the `ReferenceGPT` state dict, full tensors), `config.yaml` (the resolved
umtrain config) and `umtrain_portable.json` (iteration, consumed samples). It loads on one process with no
process group and no Megatron (`load_portable`). Reading or writing a Megatron checkpoint uses a one-process gloo
group: `dist_checkpointing` needs one even to read.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

from umtrain.checkpoint import manager
from umtrain.config import Config, config_from_dict
from umtrain.config.validate import tokenizer_json
from umtrain.model.reference import ModelArgs, ReferenceGPT
from umtrain.model.state_dict_adapter import Tensors, megatron_to_portable, portable_to_megatron

logger = logging.getLogger("umtrain")

WEIGHTS = "model.safetensors"
PORTABLE_META = "umtrain_portable.json"
TOKENIZER_DIR = "tokenizer"


# --------------------------------------------------------------------------------------------- forms


def is_portable(path: Path) -> bool:
    return (path / WEIGHTS).is_file() and (path / PORTABLE_META).is_file()


def is_hf(path: Path) -> bool:
    return (path / "config.json").is_file() and not is_portable(path)


def form_of(path: Path) -> str:
    """'portable', 'hf' or 'megatron' (anything else; reading it says whether it holds a valid checkpoint)."""
    return "portable" if is_portable(path) else "hf" if is_hf(path) else "megatron"


def conversion_hint(path: Path) -> str:
    """For an error about a directory that holds no Megatron checkpoint: how to train or evaluate from it when it is
    a portable or Hugging Face one ("" otherwise)."""
    form = form_of(path)
    if form == "megatron":
        return ""
    name = "a portable" if form == "portable" else "a Hugging Face"
    return f" ({path} is {name} checkpoint: `umtrain convert {path} OUT --to megatron` makes one to load)"


def resolve_megatron(path: Path) -> Path:
    """A checkpoint directory as is; a checkpoint root -> the checkpoint `resume` would choose."""
    checkpoint, warnings = manager.resolve_resume(path)
    for warning in warnings:
        logger.warning(warning)
    if checkpoint is None:
        raise FileNotFoundError(f"{path} holds no valid umtrain checkpoint")
    return checkpoint.path


def config_of(data: dict[str, Any]) -> Config:
    """The saved resolved config, validated without the world size or data files of the saving run. Configs saved
    before `model.add_bias_linear` could be left unset hold true for MoE models, which never had linear biases."""
    model = data.get("model") or {}
    if model.get("family") == "moe" and model.get("add_bias_linear"):
        data = {**data, "model": {**model, "add_bias_linear": None}}
    return config_from_dict(data, check_files=False)


# --------------------------------------------------------------------------------------------- megatron


@contextmanager
def megatron_io() -> Iterator[None]:
    """What `dist_checkpointing` needs to read or write in one process: Megatron's CPU redirects where CUDA is
    absent, and a process group (`process_group_of_one`)."""
    from umtrain.parallel import cpu_compat
    from umtrain.parallel.state import process_group_of_one

    cpu_compat.apply()
    with process_group_of_one():
        yield


def read_megatron(path: Path) -> tuple[Tensors, dict[str, Any]]:
    """(full model tensors by canonical Megatron key, the common state) of a checkpoint directory."""
    from megatron.core import dist_checkpointing

    with megatron_io():
        metadata = dist_checkpointing.load_tensors_metadata(str(path))
        model_keys = {k: v for k, v in metadata.items() if not k.startswith("optimizer.")}
        loaded = dist_checkpointing.load(model_keys, str(path), validate_access_integrity=False)
    return {k: loaded[k] for k in model_keys}, read_megatron_common(path)


def read_megatron_common(path: Path) -> dict[str, Any]:
    """The common (non-tensor) state of a checkpoint directory: config, iteration, ... (no tensor is read)."""
    from megatron.core import dist_checkpointing

    with megatron_io():
        return dist_checkpointing.load_common_state_dict(str(path))


def write_megatron(out: Path, tensors: Tensors, config: dict[str, Any], meta: dict[str, Any],
                   tokenizer: Optional[Path] = None) -> Path:
    """A model-only checkpoint directory (no optimizer, no RNG) that `--resume` loads under any layout; `tokenizer`
    is copied into its tokenizer/ directory."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from umtrain.checkpoint.state import FORMAT_VERSION

    state: dict[str, Any] = {k: ShardedTensor.from_rank_offsets(k, v.contiguous(), replica_id=0) for k, v in tensors.items()}
    state.update(format_version=FORMAT_VERSION, iteration=meta["iteration"], consumed_samples=meta["consumed_samples"],
                 config=config, layout=None, contents=["model"], padded_vocab_size=meta["padded_vocab_size"],
                 history={})
    with megatron_io(), manager.staged_output(out) as tmp:
        dist_checkpointing.save(state, str(tmp))
        manager.write_file_atomically(tmp / manager.CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
        copy_tokenizer(tokenizer, tmp)
        manager.write_manifest(tmp, meta["iteration"])
    return out


# --------------------------------------------------------------------------------------------- portable


def write_portable(out: Path, tensors: Tensors, config: dict[str, Any], meta: dict[str, Any],
                   tokenizer: Optional[Path] = None) -> Path:
    """`tokenizer`: the one to ship (default: the config's data.tokenizer_model)."""
    from safetensors.torch import save_file

    with manager.staged_output(out) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        (tmp / manager.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        source = tokenizer or (config.get("data") or {}).get("tokenizer_model")
        shipped = copy_tokenizer(source, tmp)
        (tmp / PORTABLE_META).write_text(json.dumps({**meta, "tokenizer": shipped}, indent=1))
    return out


def tokenizer_files(source: Path) -> list[Path]:
    """The files of a tokenizer: a SentencePiece .model, or a tokenizer.json (a directory: its tokenizer.json) with
    its tokenizer_config.json when there is one (it names the end-of-document token)."""
    main = tokenizer_json(source)
    extra = main.parent / "tokenizer_config.json"
    return [main] + [extra] * (main.suffix == ".json" and extra.is_file())


def copy_tokenizer(source: Optional[str | Path], out: Path, directory: str = TOKENIZER_DIR) -> Optional[str]:
    """Copy a tokenizer into `out/<directory>/` (`directory` "": into `out` itself), so that the checkpoint does not
    depend on the directory it was converted from; its path relative to `out`, or None (with a warning when a
    tokenizer is named but missing) when there is none to copy."""
    if not source:
        return None
    files = tokenizer_files(Path(source))
    if not files[0].is_file():
        logger.warning("the config names tokenizer %s, which is not here (resolved from %s): the converted "
                       "checkpoint carries no tokenizer; pass one to `umtrain generate --tokenizer`",
                       source, Path.cwd())
        return None
    target = out / directory
    target.mkdir(exist_ok=True)
    for path in files:
        shutil.copy2(path, target / path.name)
    return str(Path(directory) / files[0].name)


def tokenizer_type_of(path: str | Path, default: str) -> str:
    """'huggingface' for a tokenizer.json or a directory, 'sentencepiece' for a .model, else `default` (the
    config's data.tokenizer_type)."""
    suffix = tokenizer_json(Path(path)).suffix
    if suffix == ".json":
        return "huggingface"
    return "sentencepiece" if suffix == ".model" else default


def portable_tokenizer(path: Path) -> Optional[Path]:
    """The tokenizer a portable checkpoint carries (`copy_tokenizer`); None when it names none or the file is
    missing (a portable copied without its tokenizer/ directory)."""
    name = json.loads((path / PORTABLE_META).read_text()).get("tokenizer")
    return path / name if name and (path / name).is_file() else None


def read_portable(path: Path) -> tuple[Tensors, dict[str, Any], dict[str, Any]]:
    from safetensors.torch import load_file

    if not is_portable(path):
        raise FileNotFoundError(f"{path} is not a portable checkpoint (needs {WEIGHTS} and {PORTABLE_META})")
    config = yaml.safe_load((path / manager.CONFIG_FILE).read_text())
    return load_file(str(path / WEIGHTS)), config, json.loads((path / PORTABLE_META).read_text())


def reference_model(tensors: Tensors, config: Config) -> ReferenceGPT:
    """A ReferenceGPT holding `tensors` (portable keys); vocabulary and final norm follow the tensors."""
    args = ModelArgs.from_config(config, vocab_size=tensors["tok_embeddings.weight"].shape[0],
                                 final_norm="norm.weight" in tensors)
    model = ReferenceGPT(args).to(tensors["tok_embeddings.weight"].dtype)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def device_agnostic(config: dict[str, Any]) -> dict[str, Any]:
    """The config with `model.memory.lookup_impl: auto`: the kernel is a speed choice of the training run, not part of
    the model, and a portable model runs on whatever device it is moved to."""
    model = config.get("model") or {}
    if not model.get("memory"):
        return config
    return {**config, "model": {**model, "memory": {**model["memory"], "lookup_impl": "auto"}}}


def load_portable(path: str | Path) -> tuple[ReferenceGPT, Config]:
    """One process, no Megatron: the model (eval mode, on CPU; move it anywhere) and its config."""
    tensors, config_dict, _ = read_portable(Path(path))
    config = config_of(device_agnostic(config_dict))
    return reference_model(tensors, config), config


# --------------------------------------------------------------------------------------------- conversions


def megatron_to_portable_dir(source: Path, out: Path) -> Path:
    checkpoint = resolve_megatron(source)
    family = config_of(read_megatron_common(checkpoint)["config"]).model.family
    if family == "moe":
        raise ValueError(f"{source} is a MoE model: MoE checkpoints convert to no other form (the portable and "
                         "Hugging Face forms hold dense, pkm and ultramem models); resume from it under any layout")
    tensors, common = read_megatron(checkpoint)
    config = config_of(common["config"])
    meta = {"iteration": common["iteration"], "consumed_samples": common["consumed_samples"],
            "padded_vocab_size": common["padded_vocab_size"], "source": str(source)}
    return write_portable(out, megatron_to_portable(tensors, config.model.num_attention_heads), common["config"],
                          meta)


def portable_to_megatron_dir(source: Path, out: Path) -> Path:
    """The Megatron checkpoint carries the portable's tokenizer in tokenizer/, and its config names it there."""
    tensors, config_dict, meta = read_portable(source)
    heads = config_of(config_dict).model.num_attention_heads
    meta = {"padded_vocab_size": tensors["tok_embeddings.weight"].shape[0], "iteration": 0, "consumed_samples": 0,
            **meta}
    tokenizer = portable_tokenizer(source)
    if tokenizer is not None:
        shipped = (out / TOKENIZER_DIR / tokenizer.name).resolve()
        config_dict = {**config_dict, "data": {**(config_dict.get("data") or {}), "tokenizer_model": str(shipped)}}
    return write_megatron(out, portable_to_megatron(tensors, heads), config_dict, meta, tokenizer)


def convert(source: str | Path, out: str | Path, to: str, config_path: Optional[str] = None) -> Path:
    """`umtrain convert`: any form -> `to` ('portable', 'megatron' or 'hf'); through the portable form."""
    from umtrain.checkpoint import hf

    source, out = Path(source), Path(out)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if out.exists():
        raise FileExistsError(f"{out} exists; conversion never overwrites")
    form = form_of(source)
    if form == "megatron":      # anything neither portable nor HF must be a Megatron checkpoint; resolved once, so
        source = resolve_megatron(source)      # a skipped (corrupt) newer checkpoint is reported once
    if form == to:
        layout_hint = (" (to change its parallel layout, resume from it: a Megatron checkpoint loads under any "
                       "layout)") if to == "megatron" else ""
        raise ValueError(f"{source} is already a {to} checkpoint{layout_hint}")
    if to == "portable":
        if is_hf(source):
            return hf.hf_to_portable_dir(source, out, config_path)
        return megatron_to_portable_dir(source, out)
    if to == "hf":
        if is_portable(source):
            return hf.portable_to_hf_dir(source, out)
        with staged_portable(out) as staged:
            megatron_to_portable_dir(source, staged)
            return hf.portable_to_hf_dir(staged, out)
    if to == "megatron":
        if is_portable(source):
            return portable_to_megatron_dir(source, out)
        with staged_portable(out) as staged:
            hf.hf_to_portable_dir(source, staged, config_path)
            return portable_to_megatron_dir(staged, out)
    raise ValueError(f"unknown target form {to!r} (portable, hf or megatron)")


@contextmanager
def staged_portable(out: Path) -> Iterator[Path]:
    """Where a two-step conversion keeps its intermediate portable form: a fresh directory beside `out`, removed
    afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.portable-", dir=out.parent) as staging:
        yield Path(staging) / "portable"
