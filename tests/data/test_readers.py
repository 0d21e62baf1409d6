"""Input files of `preprocess` / `train-tokenizer`: what is refused up front, and that reading local files sends
nothing over the network."""

from __future__ import annotations

import json

import pytest

from umtrain.config import ConfigError
from umtrain.data.readers import resolve_inputs, stream_rows


def test_a_directory_and_a_fsspec_chained_name_are_named_up_front(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(ConfigError, match=r"shards: is a directory; give the files in it, e\.g\. '.*shards/\*\.jsonl'"):
        resolve_inputs([str(tmp_path / "shards")], "text")
    chained = tmp_path / "x::y.jsonl"
    chained.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"x::y\.jsonl: '::' in a file name"):
        resolve_inputs([str(chained)], "text")


def test_reading_a_local_file_asks_the_hub_for_nothing(tmp_path, monkeypatch):
    """`datasets.load_dataset` counted each load with a request to the Hub's S3 (3 s per file behind a firewall)."""
    import datasets
    import datasets.load

    requests: list[str] = []

    class Session:
        def head(self, url, **kwargs):
            requests.append(url)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(datasets.load, "get_session", Session)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    rows = [row for batch in stream_rows(path, "text") for row in batch]
    assert [number for number, _ in rows] == [1, 2, 3] and requests == []
