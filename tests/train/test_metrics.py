"""Console line, tensorboard and wandb (offline) writers."""

from __future__ import annotations

from pathlib import Path

from umtrain.config import load_config
from umtrain.train.metrics import MetricsWriter, format_line, format_memory_health, training_flops_per_token


def test_format_line_shows_every_known_value():
    line = format_line(10, 100, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": 0.42})
    assert line.startswith("step     10/100")
    for part in ("loss 2.5000", "lr 1.000e-03", "grad-norm 0.500", "1,234 tok/s", "MFU 42.0%"):
        assert part in line


def test_memory_health_line_groups_by_layer():
    text = format_memory_health({"memory/layer2/value_hit_fraction": 0.5, "memory/layer2/top1_score": 1.25,
                                 "memory/layer2/output_std": 0.1, "loss": 3.0})
    assert text == "memory L2: hit 50% top1 1.250 std 0.100"


def test_training_flops_are_three_forwards():
    c = load_config(None, ["data.mock=true", "model.num_layers=2", "model.hidden_size=8", "data.seq_length=4"])
    assert training_flops_per_token(c, 100.0, vocab_size=10) == 3 * (100 + 2 * 8 * 10 + 2 * 2 * 4 * 8)


def test_tensorboard_and_offline_wandb(tmp_path):
    c = load_config(None, ["data.mock=true", f"logging.tensorboard_dir={tmp_path}/tb", "logging.wandb_project=umtrain-test",
                           "logging.wandb_mode=offline", f"logging.wandb_dir={tmp_path}/wandb"])
    writer = MetricsWriter(c, enabled=True)
    writer.scalars({"loss": 1.0}, step=1)
    writer.close()
    assert list(Path(tmp_path, "tb").glob("events.out.tfevents.*"))
    assert list(Path(tmp_path, "wandb").rglob("offline-run-*"))
