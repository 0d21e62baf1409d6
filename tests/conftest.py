"""Fixtures shared across test packages."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_VOCAB = 1024


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """`umtrain demo-data` output (corpus, SentencePiece tokenizer, indexed sources, blend) in a temp dir."""
    from umtrain.cli.main import main

    out = tmp_path_factory.mktemp("demo_data")
    assert main(["demo-data", "--out", str(out), "--vocab-size", str(DEMO_VOCAB), "--workers", "1"]) == 0
    return out


def demo_config(demo_dataset: Path, **sections) -> dict:
    """configs/demo.yaml pointed at `demo_dataset`, with per-section overrides."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    data_path = config["data"]["data_path"]
    config["data"]["data_path"] = [str(demo_dataset / Path(p).name) if i % 2 else p for i, p in enumerate(data_path)]
    config["data"]["tokenizer_model"] = str(demo_dataset / "tokenizer.model")
    config["data"]["cache_path"] = None
    config["checkpoint"] = {"save": None}
    config["logging"] = {"log_interval": 1000, "progress_bar": False, "memory_stats": False}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config
