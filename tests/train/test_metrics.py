"""Console line, tensorboard and wandb (offline) writers."""

from __future__ import annotations

import math
from pathlib import Path

from umtrain.config import load_config
from umtrain.train.metrics import (MetricsWriter, format_line, format_memory_health, perplexity_of,
                                   training_flops_per_token, wandb_resume)


def test_perplexity_is_inf_past_the_largest_float_not_a_clamped_number():
    assert abs(perplexity_of(math.log(20.0)) - 20.0) < 1e-9
    assert perplexity_of(60.0) == math.exp(60.0)
    assert perplexity_of(1000.0) == math.inf


def test_format_line_shows_every_known_value():
    line = format_line(10, 100, {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1234.0, "mfu": 0.42})
    assert line.startswith("step     10/100")
    for part in ("loss 2.5000", "lr 1.000e-03", "grad-norm 0.500", "1,234 tok/s", "MFU 42.0%"):
        assert part in line


def test_memory_health_line_groups_by_layer():
    text = format_memory_health({"memory/layer2/value_hit_fraction": 0.5, "memory/layer2/top1_score": 1.25,
                                 "memory/layer2/output_std": 0.1, "loss": 3.0})
    assert text == "memory L2: hit 50% top1 1.250 std 0.100"


def test_memory_health_layers_in_numeric_order():
    values = {f"memory/layer{n}/value_hit_fraction": 0.5 for n in (2, 10, 4, 12)}
    assert [part.split(":")[0].split()[-1] for part in format_memory_health(values).split("|")] == \
        ["L2", "L4", "L10", "L12"]


def test_mfu_peaks_of_pcie_and_nvl_cards_are_their_own(monkeypatch):
    import torch

    from umtrain.train.metrics import peak_flops_per_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
                       ("NVIDIA H800 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda name=name: name)
        assert peak_flops_per_device() == peak, name


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


def scalar_steps(log_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


def test_a_resumed_run_continues_its_tensorboard_and_wandb_records(tmp_path, monkeypatch):
    """The first attempt logged steps 1-6 but its last checkpoint is at step 4 (a crash, or a rollback): the
    resumed run's steps 5 and 6 replace the old ones, each step once; wandb resumes the same run."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    c = load_config(None, ["data.mock=true", f"logging.tensorboard_dir={tmp_path}/tb", f"checkpoint.save={tmp_path}/ck",
                           "logging.wandb_project=umtrain-test", f"logging.wandb_dir={tmp_path}/wandb"])
    first = MetricsWriter(c, enabled=True)
    for step in range(1, 7):
        first.scalars({"loss": float(step)}, step=step)
    first.close()
    resumed = MetricsWriter(c, enabled=True, start_step=4)
    for step in (5, 6):
        resumed.scalars({"loss": 10.0 + step}, step=step)
    resumed.close()
    assert scalar_steps(tmp_path / "tb", "loss") == [1, 2, 3, 4, 5, 6]
    runs = sorted(p.name for p in Path(tmp_path, "wandb").rglob("offline-run-*"))
    run_id = wandb_resume(c)["id"]
    assert len(runs) == 2 and all(run_id in run for run in runs)           # two attempts of one run


def test_a_run_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    """A crash before the first checkpoint: the restart starts at step 0 and logs steps 1.. again."""
    c = load_config(None, ["data.mock=true", f"logging.tensorboard_dir={tmp_path}/tb"])
    for attempt in range(2):
        writer = MetricsWriter(c, enabled=True, start_step=0)
        for step in range(1, 4 + 2 * attempt):
            writer.scalars({"loss": float(step)}, step=step)
        writer.close()
    assert scalar_steps(tmp_path / "tb", "loss") == [1, 2, 3, 4, 5]


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    c = load_config(None, ["data.mock=true", "logging.wandb_project=umtrain-test", f"logging.wandb_dir={tmp_path}/w"])
    writer = MetricsWriter(c, enabled=True)
    assert writer.wandb is None
    writer.close()
