"""`umtrain evaluate` on a tiny trained run: the training run's own validation loss, an independent ReferenceGPT
loss on the same samples, another layout, an untouched checkpoint directory, and bad input refused up front."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.checkpoint.helpers import REPO, run_config, train, tree_digest
from tests.data.indexed_files import one_token_documents
from umtrain.cli.main import main
from umtrain.parallel.comm import free_port

TRAIN_ITERS = 3
EVAL_ITERS = 2
MODEL = {"family": "dense", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "hidden_dropout": 0.3, "attention_dropout": 0.3}   # dropout on: a forward in train mode changes the loss


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run's checkpoint root after TRAIN_ITERS steps, validated (EVAL_ITERS batches) after the last one."""
    root = tmp_path_factory.mktemp("evaluate") / "checkpoints"
    config = run_config(TRAIN_ITERS, save=str(root), model=MODEL)
    config["training"]["eval_iters"] = EVAL_ITERS
    train(config, 1)
    return root


@pytest.fixture
def one_process(monkeypatch):
    """The environment torchrun gives a 1-process job (restored afterwards, so later launches are unaffected)."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the training worker: reductions sum in the same order
    yield
    torch.set_num_threads(threads)


def training_valid_loss(root: Path) -> float:
    common = torch.load(root / "iter_0000003" / "common.pt", weights_only=False)
    return common["history"]["valid_loss"][TRAIN_ITERS]


def reference_loss(root: Path, tmp_path: Path, split: str) -> float:
    """The ReferenceGPT of the converted checkpoint on the split's first EVAL_ITERS global batches (samples in order,
    token-mean cross entropy over the padded vocabulary per micro-batch, averaged)."""
    from umtrain.checkpoint.convert import load_portable, megatron_to_portable_dir
    from umtrain.data.datasets import build_gpt_datasets
    from umtrain.data.tokenizer import MockTokenizer
    from umtrain.parallel.state import process_group_of_one

    model, config = load_portable(megatron_to_portable_dir(root, tmp_path / "portable"))
    with process_group_of_one():
        datasets = build_gpt_datasets(config, MockTokenizer(config.data.mock_vocab_size), 1, 1, 1)
    dataset = datasets[1 if split == "valid" else 2]
    t = config.training
    losses = []
    with torch.no_grad():
        for start in range(0, EVAL_ITERS * t.global_batch_size, t.micro_batch_size):
            samples = [dataset[i] for i in range(start, start + t.micro_batch_size)]
            tokens, labels, mask = (torch.stack([torch.as_tensor(s[k]) for s in samples])
                                    for k in ("tokens", "labels", "loss_mask"))
            ce = F.cross_entropy(model(tokens).flatten(0, 1).float(), labels.flatten(), reduction="none")
            losses.append(float((ce * mask.flatten()).sum() / mask.sum()))
    return sum(losses) / len(losses)


def evaluate_in_process(root: Path, out: Path, *extra: str) -> dict:
    assert main(["evaluate", "--checkpoint", str(root), "--json", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_evaluate_repeats_the_runs_validation_and_matches_a_reference(trained, tmp_path, one_process, capsys):
    before = tree_digest(trained)
    result = evaluate_in_process(trained, tmp_path / "valid.json")
    assert result["loss"] == pytest.approx(training_valid_loss(trained), rel=1e-6)
    assert result["loss"] == pytest.approx(reference_loss(trained, tmp_path, "valid"), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    assert Path(result["checkpoint"]).name == "iter_0000003" and result["iteration"] == TRAIN_ITERS
    assert (result["split"], result["iters"], result["tokens"]) == ("valid", EVAL_ITERS, EVAL_ITERS * 8 * 32)
    assert result["layout"]["tp"] == 1 and result["layout"]["world_size"] == 1
    assert f"loss {result['loss']:.6f}" in capsys.readouterr().out
    assert tree_digest(trained) == before


def test_evaluate_allocates_no_optimizer_or_gradient_buffers(trained, tmp_path, one_process, monkeypatch):
    """Evaluation needs the weights alone: a model's optimizer (fp32 main params, Adam moments) and gradient
    buffers would take several times its memory. The classes themselves refuse, however they would be reached."""
    from megatron.core.distributed import DistributedDataParallel

    def refuse(*_, **__):
        raise AssertionError("evaluation built a training-only part")

    monkeypatch.setattr(DistributedDataParallel, "__init__", refuse)
    monkeypatch.setattr(torch.optim.AdamW, "__init__", refuse)
    monkeypatch.setattr(torch.optim.Adam, "__init__", refuse)
    result = evaluate_in_process(trained, tmp_path / "valid.json")
    assert result["loss"] == pytest.approx(training_valid_loss(trained), rel=1e-6)


def test_evaluate_reuses_the_training_runs_cached_data_index(demo_dataset, tmp_path, one_process):
    """The training split is built for the size the run built it for, whose index is in the cache: evaluating
    writes nothing there (another size would build and write another index)."""
    from tests.conftest import demo_config

    cache = tmp_path / "cache"
    config = demo_config(demo_dataset, model=MODEL, parallel={"tensor_model_parallel_size": 1},
                         training={"train_iters": 2, "global_batch_size": 8, "micro_batch_size": 4, "eval_iters": 1},
                         schedule={"lr_warmup_iters": 1}, checkpoint={"save": str(tmp_path / "ckpt")})
    config["data"]["cache_path"] = str(cache)
    train(config, 1)
    before = sorted(p.name for p in cache.rglob("*"))
    evaluate_in_process(tmp_path / "ckpt", tmp_path / "valid.json")
    assert sorted(p.name for p in cache.rglob("*")) == before


def test_evaluate_test_split_and_fewer_iters(trained, tmp_path, one_process):
    result = evaluate_in_process(trained / "iter_0000003", tmp_path / "test.json", "--split", "test")
    assert result["split"] == "test"
    assert result["loss"] == pytest.approx(reference_loss(trained, tmp_path, "test"), rel=1e-5)
    first = evaluate_in_process(trained, tmp_path / "one.json", "--iters", "1")
    assert first["iters"] == 1 and first["loss"] != pytest.approx(result["loss"])


@pytest.mark.slow
def test_evaluate_under_tensor_parallel_matches(trained, tmp_path):
    """The TP=1 checkpoint, evaluated by 2 torchrun processes at TP=2 (resharded on load)."""
    before = tree_digest(trained)
    out = tmp_path / "tp2.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "umtrain.cli.main", "evaluate", "--checkpoint", str(trained), "--nproc-per-node",
               "2", "--json", str(out), "parallel.tensor_model_parallel_size=2"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["layout"]["tp"] == 2 and result["layout"]["world_size"] == 2
    assert result["loss"] == pytest.approx(training_valid_loss(trained), abs=1e-5)
    assert tree_digest(trained) == before


def fake_real_data(tmp_path: Path) -> list[str]:
    """Overrides that point the run at non-mock data files (an index of 1000 one-token documents, an empty
    tokenizer file), so that only the split is wrong."""
    one_token_documents(tmp_path / "corpus")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    return ["data.mock=false", f"data.data_path=[{tmp_path / 'corpus'}]",
            f"data.tokenizer_model={tmp_path / 'tokenizer.model'}"]


@pytest.mark.parametrize("case, error", [
    ("missing", "--checkpoint: "),
    ("empty_dir", "--checkpoint: "),
    ("iters", "--iters: must be >= 1, got 0"),
    ("no_iters", "--iters: is unset"),
    ("no_valid_part", "data.split: "),
    ("no_test_split", "data.valid_data_path: "),
    ("no_config", "--config: "),
    ("json_dir", "--json: "),
])
def test_bad_input_is_refused_before_launch(trained, tmp_path, monkeypatch, capsys, case, error):
    import umtrain.checkpoint.launch as launch

    monkeypatch.setattr(launch, "run_torchrun", lambda argv: pytest.fail("launched despite bad input"))
    checkpoint = str(trained)
    extra: list[str] = []
    if case == "missing":
        checkpoint = str(tmp_path / "nowhere")
    elif case == "empty_dir":
        checkpoint = str(tmp_path)
    elif case == "iters":
        extra = ["--iters", "0"]
    elif case == "no_iters":
        extra = ["training.eval_iters=0"]
    elif case == "no_valid_part":
        extra = [*fake_real_data(tmp_path), "data.split=100,0,0"]
    elif case == "no_test_split":
        extra = [*fake_real_data(tmp_path), f"data.valid_data_path=[{tmp_path / 'corpus'}]", "--split", "test"]
    elif case == "no_config":
        bare = tmp_path / "iter_0000003"
        bare.mkdir()
        (bare / "umtrain_manifest.json").write_text(json.dumps({"iteration": 3, "files": {}}))
        checkpoint = str(bare)
    elif case == "json_dir":
        extra = ["--json", str(tmp_path)]
    assert main(["evaluate", "--checkpoint", checkpoint, "--nproc-per-node", "2", *extra]) == 2
    assert f"configuration error: {error}" in capsys.readouterr().err


def test_explicit_config_is_used_and_nothing_is_saved_or_logged(trained, tmp_path):
    from umtrain.train.evaluation import checkpoint_to_evaluate, evaluation_config

    config = yaml.safe_load((trained / "iter_0000003" / "config.yaml").read_text())
    config["training"]["eval_iters"] = 5
    config["checkpoint"].update(save=str(trained), save_interval=1, async_save=True)
    config["logging"].update(tensorboard_dir=str(tmp_path / "tb"), wandb_project="p")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    checkpoint = checkpoint_to_evaluate(str(trained))
    resolved = evaluation_config(checkpoint, str(path), ["training.seed=7"], 1, None)
    assert (resolved.training.eval_iters, resolved.training.seed) == (5, 7)
    c = resolved.checkpoint
    assert (c.load, c.no_load_optim, c.save, c.save_interval, c.async_save) == (str(checkpoint), True, None, 0, False)
    assert resolved.logging.tensorboard_dir is None and resolved.logging.wandb_project is None


def test_a_corrupted_checkpoint_is_named_before_any_of_it_is_read(trained, tmp_path, one_process, capsys):
    """The evaluator read the checkpoint's common state (its sample budget) before verifying it: a flipped byte in
    common.pt came out of torch's unpickler as a traceback."""
    corrupted = tmp_path / "iter_0000003"
    shutil.copytree(trained / "iter_0000003", corrupted)
    common = bytearray((corrupted / "common.pt").read_bytes())
    common[100] ^= 0xFF
    (corrupted / "common.pt").write_bytes(bytes(common))
    assert main(["evaluate", "--checkpoint", str(corrupted)]) == 2
    err = capsys.readouterr().err
    assert "configuration error: --checkpoint: " in err and "common.pt fails its CRC-32 check" in err


def test_a_portable_checkpoint_is_named_with_the_conversion_to_run(trained, tmp_path, capsys):
    from umtrain.checkpoint.convert import megatron_to_portable_dir

    portable = megatron_to_portable_dir(trained, tmp_path / "portable")
    assert main(["evaluate", "--checkpoint", str(portable)]) == 2
    assert f"is a portable checkpoint: `umtrain convert {portable} OUT --to megatron`" in capsys.readouterr().err
