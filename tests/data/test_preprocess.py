import gzip
import json
import re
import subprocess
import sys
import threading
import time

import psutil
import pyarrow
import pyarrow.parquet
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from umtrain.config.base import ConfigError
from umtrain.data.preprocess import WorkerDied, preprocess
from umtrain.data.readers import DataInputError
from umtrain.data.tokenizer import load_tokenizer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path):
    """JSON Lines split on newlines only (str.splitlines would also split on U+2028 inside the texts)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def documents_of(prefix):
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def reference_documents(paths, tokenizer):
    """Naive reference: parse every line with json, tokenise, append EOD."""
    documents = []
    for path in paths:
        for record in read_jsonl(path):
            ids = tokenizer.tokenize(record["text"])
            if ids:
                documents.append(ids + [tokenizer.eod])
    return documents


@pytest.fixture
def small_inputs(demo_corpus, tmp_path):
    """Two shards: 150 records of the demo corpus (one with a line separator inside its text), and a few odd ones."""
    records = read_jsonl(demo_corpus[1])[:150]
    records[3]["text"] += "\u2028 and \r inside"
    odd = [{"text": "", "id": "empty"}, {"text": "short", "meta": {"x": 1}}, {"text": "é" * 50}]
    shard_b = write_jsonl(tmp_path / "b.jsonl", odd)
    shard_b.write_text(shard_b.read_text(encoding="utf-8") + "\n   \n", encoding="utf-8")
    return [write_jsonl(tmp_path / "a.jsonl", records), shard_b]


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_equals_tokenised_documents(small_inputs, sp_tokenizer, sentencepiece_model, tmp_path, workers):
    prefix = tmp_path / f"out{workers}"
    stats = preprocess([str(p) for p in small_inputs], str(prefix), "sentencepiece", sentencepiece_model,
                       workers=workers, progress=False)
    expected = reference_documents(small_inputs, sp_tokenizer)
    assert documents_of(prefix) == expected
    assert stats["documents"] == len(expected) == 152
    assert stats["empty_documents"] == 1
    assert stats["tokens"] == sum(map(len, expected))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == [f"out{workers}.bin",
                                                                                        f"out{workers}.idx"]


def test_globs_parquet_and_no_eod(small_inputs, bpe_json, tmp_path):
    """A Parquet shard gives the same documents as the JSON Lines shard it was made from; globs expand sorted. Its
    other column is a map (as Spark writes metadata), which only the text column's reader can leave unread."""
    texts = [record["text"] for record in read_jsonl(small_inputs[0])]
    metadata = pyarrow.array([[("source", i)] for i in range(len(texts))], pyarrow.map_(pyarrow.string(),
                                                                                         pyarrow.int32()))
    pyarrow.parquet.write_table(pyarrow.table({"content": texts, "meta": metadata}), tmp_path / "a.parquet")
    from_parquet = preprocess([str(tmp_path / "*.parquet")], str(tmp_path / "pq"), "huggingface", bpe_json,
                              text_key="content", append_eod=False, progress=False)
    preprocess([str(small_inputs[0])], str(tmp_path / "js"), "huggingface", bpe_json, append_eod=False,
               progress=False)
    assert from_parquet["documents"] == len(texts)
    assert documents_of(tmp_path / "pq") == documents_of(tmp_path / "js")


def test_existing_output_is_kept_unless_overwrite(small_inputs, sentencepiece_model, tmp_path):
    prefix = str(tmp_path / "out")
    preprocess([str(small_inputs[1])], prefix, "sentencepiece", sentencepiece_model, progress=False)
    before = (tmp_path / "out.bin").read_bytes()
    with pytest.raises(ConfigError, match="output exists.*overwrite"):
        preprocess([str(small_inputs[0])], prefix, "sentencepiece", sentencepiece_model, progress=False)
    assert (tmp_path / "out.bin").read_bytes() == before
    preprocess([str(small_inputs[0])], prefix, "sentencepiece", sentencepiece_model, overwrite=True, progress=False)
    assert (tmp_path / "out.bin").read_bytes() != before


def test_overwrite_removes_the_sample_indices_megatron_cached_for_the_old_data(small_inputs, sentencepiece_model,
                                                                              tmp_path, caplog):
    """Megatron caches the indices in PREFIX/cache/ (a folder named after the prefix), keyed on the path alone."""
    prefix = tmp_path / "out"
    preprocess([str(small_inputs[1])], str(prefix), "sentencepiece", sentencepiece_model, progress=False)
    index = prefix / "cache" / "GPTDataset_indices" / "abc-GPTDataset-train-document_index.npy"
    index.parent.mkdir(parents=True)
    index.write_bytes(b"old")
    with pytest.raises(ConfigError, match="output exists"):
        preprocess([str(small_inputs[0])], str(prefix), "sentencepiece", sentencepiece_model, progress=False)
    assert index.is_file()
    with caplog.at_level("INFO", logger="umtrain"):
        preprocess([str(small_inputs[0])], str(prefix), "sentencepiece", sentencepiece_model, overwrite=True,
                   progress=False)
    assert not prefix.exists()
    assert [r.getMessage() for r in caplog.records] == [f"removing {prefix / 'cache'}: Megatron's sample indices of "
                                                        f"the data being overwritten"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("lines, message", [
    (['{"text": "fine"}', '{"text": "fine"}', '{"text": oops}'], r"bad\.jsonl, line 3: not valid JSON"),
    (['{"text": "fine"}', '{"body": "no text"}'], r"bad\.jsonl, line 2: the record has no 'text' field"),
    (['{"text": "fine"}', '', '{"text": 7}'], r"bad\.jsonl, line 3: 'text' is int, not a string"),
    (['["a", "list"]'], r"bad\.jsonl, line 1: expected a JSON object"),
])
def test_bad_records_name_file_and_line(small_inputs, sentencepiece_model, tmp_path, workers, lines, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataInputError, match=message):
        preprocess([str(small_inputs[0]), str(bad)], str(tmp_path / "out"), "sentencepiece", sentencepiece_model,
                   workers=workers, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_bad_files_are_named_and_leave_no_output(small_inputs, sentencepiece_model, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n \n")
    write_jsonl(tmp_path / "no_text.jsonl", [{"text": ""}])
    (tmp_path / "notes.txt").write_text("text")
    pyarrow.parquet.write_table(pyarrow.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"meta": [{"text": "x"}]}), tmp_path / "nested.parquet")
    undecodable = pyarrow.array([b"good"] * 2500 + [b"a\xed\xa0\x80b"], pyarrow.binary()).view(pyarrow.string())
    pyarrow.parquet.write_table(pyarrow.table({"text": undecodable}), tmp_path / "bytes.parquet")
    cases = {
        str(tmp_path / "empty.jsonl"): (ConfigError, r"empty\.jsonl: the file is empty"),
        str(tmp_path / "blank.jsonl"): (DataInputError, r"blank\.jsonl, whole file: holds no records"),
        str(tmp_path / "notes.txt"): (ConfigError, r"notes\.txt: unsupported input file type"),
        str(tmp_path / "nocol.parquet"): (ConfigError, r"nocol\.parquet: has no column 'text'"),
        str(tmp_path / "nested.parquet"): (ConfigError, r"nested\.parquet: has no column 'text' \(columns: \['meta'\]\)"),
        str(tmp_path / "bytes.parquet"): (DataInputError, r"bytes\.parquet, row 2501: 'text' is not valid UTF-8 at byte 2"),
        str(tmp_path / "missing.jsonl"): (ConfigError, r"missing\.jsonl: input file not found"),
        str(tmp_path / "*.nothing"): (ConfigError, r"matches no files"),
    }
    for path, (error, message) in cases.items():
        with pytest.raises(error, match=message):
            preprocess([str(small_inputs[0]), path], str(tmp_path / "out"), "sentencepiece", sentencepiece_model,
                       progress=False)
    with pytest.raises(ConfigError, match=r"inputs: no record of .*no_text\.jsonl.* has text"):
        preprocess([str(tmp_path / "no_text.jsonl")], str(tmp_path / "out"), "sentencepiece", sentencepiece_model,
                   progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_sigterm_leaves_no_partial_output(small_inputs, sentencepiece_model, tmp_path, monkeypatch):
    """scancel or a job timeout sends SIGTERM: the run stops as with Ctrl-C, and its temporary files go."""
    import os
    import signal

    from umtrain.data import preprocess as module

    real_write = module._write_documents

    def terminated_midway(builder, *args):
        builder.add_document([1, 2, 3], [3])
        os.kill(os.getpid(), signal.SIGTERM)
        return real_write(builder, *args)

    def not_handled(signum, frame):          # stands in for the default action, which would end pytest itself
        raise AssertionError("preprocess left SIGTERM to the caller's handler")

    monkeypatch.setattr(module, "_write_documents", terminated_midway)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = signal.signal(signal.SIGTERM, not_handled)
    try:
        with pytest.raises(SystemExit):
            preprocess([str(small_inputs[0])], str(out_dir / "data"), "sentencepiece", sentencepiece_model,
                       progress=False)
        assert signal.getsignal(signal.SIGTERM) is not_handled
    finally:
        signal.signal(signal.SIGTERM, before)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_lone_surrogate_is_named_with_its_position(bpe_json, tmp_path, workers):
    """JSON can escape half of a surrogate pair (a truncated emoji in a tweet dump), which no tokenizer can encode;
    a whole escaped pair is one character and reads fine."""
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "emoji \\ud83d\\ude00"}\n')
    preprocess([str(good)], str(tmp_path / "good"), "huggingface", bpe_json, workers=workers, progress=False)
    [document] = documents_of(tmp_path / "good")
    assert load_tokenizer("huggingface", bpe_json).detokenize(document[:-1]) == "emoji \U0001F600"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n{"text": "\u00e9\\ude00b"}\n', encoding="utf-8")
    with pytest.raises(DataInputError, match=r"bad\.jsonl, line 2: 'text' holds a lone surrogate \\ude00 at "
                                             r"character 2$"):
        preprocess([str(bad)], str(tmp_path / "out"), "huggingface", bpe_json, workers=workers, progress=False)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_invalid_utf8_names_its_line_and_byte(sentencepiece_model, tmp_path, suffix):
    """The streaming reader fails on a whole chunk; the error still names the one bad line, past the first batch."""
    lines = [b'{"text": "fine"}'] * 2499 + [b'{"text": "\xff bad"}'] + [b'{"text": "fine"}'] * 10
    data = b"\n".join(lines) + b"\n"
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    with pytest.raises(DataInputError, match=rf"bad{re.escape(suffix)}, line 2500: not valid UTF-8 at byte 11"):
        preprocess([str(bad)], str(tmp_path / "out"), "sentencepiece", sentencepiece_model, progress=False)


def test_compressed_names_with_brackets_and_damaged_or_empty_shards(small_inputs, sentencepiece_model, tmp_path):
    """.zst and a name with glob characters read like the plain file; a truncated .gz and a Parquet shard without
    rows are named, before or without a traceback."""
    import zstandard

    plain = small_inputs[0].read_bytes()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    (tmp_path / "a.json.zst").write_bytes(zstandard.ZstdCompressor().compress(plain))
    (tmp_path / "shard[1].jsonl").write_bytes(plain)
    expected = preprocess([str(small_inputs[0])], str(tmp_path / "plain"), "sentencepiece", sentencepiece_model,
                          progress=False)["tokens"]
    for name in ("a.jsonl.zst", "a.json.zst", "shard[1].jsonl"):
        stats = preprocess([str(tmp_path / name)], str(tmp_path / f"out-{name}"), "sentencepiece",
                           sentencepiece_model, progress=False)
        assert stats["tokens"] == expected, name
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(plain * 20)[:2000])
    with pytest.raises(DataInputError, match=r"cut\.jsonl\.gz, after line \d+: cannot be read: EOFError"):
        preprocess([str(tmp_path / "cut.jsonl.gz")], str(tmp_path / "cut"), "sentencepiece", sentencepiece_model,
                   progress=False)
    pyarrow.parquet.write_table(pyarrow.table({"text": pyarrow.array([], pyarrow.string())}), tmp_path / "none.parquet")
    with pytest.raises(DataInputError, match=r"none\.parquet, whole file: holds no records"):
        preprocess([str(tmp_path / "none.parquet")], str(tmp_path / "none"), "sentencepiece", sentencepiece_model,
                   progress=False)


def _kill_a_worker_once_one_runs(stop: threading.Event) -> None:
    """SIGKILL one of this process's forkserver's children (a preprocessing worker), as the OOM killer would."""
    while not stop.is_set():
        servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
        workers = [w for server in servers for w in server.children()]
        if workers:
            workers[0].kill()
            return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.timeout(120, func_only=True)    # a pool that waits for the dead worker's batch never returns
def test_a_worker_killed_mid_run_fails_the_run_and_leaves_nothing(sentencepiece_model, tmp_path):
    corpus = write_jsonl(tmp_path / "big.jsonl", [{"text": f"document {i} " + "words of text " * 60}
                                                  for i in range(20000)])
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_once_one_runs, args=(stop,))
    killer.start()
    try:
        with pytest.raises(WorkerDied, match=r"preprocessing worker \d+ died \(exit code -9\)"):
            preprocess([str(corpus)], str(tmp_path / "out" / "big"), "sentencepiece", sentencepiece_model,
                       workers=2, progress=False)
    finally:
        stop.set()
        killer.join()
    assert list((tmp_path / "out").iterdir()) == []


ORPHANING = """
import os, signal, sys
import numpy as np
from umtrain.data import preprocess as P
if __name__ == "__main__":
    pool = P._EncoderProcesses(2, ("sentencepiece", sys.argv[1], "text", True, np.uint16))
    batches = [P._RowBatch("f.jsonl", "jsonl", [(1, '{"text": "a"}')])] * 4
    assert [r.records for r in pool.map(iter(batches))] == [1] * 4
    print(*[p.pid for p in pool.processes], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)            # as the OOM killer would kill the main process
"""


@pytest.mark.slow
def test_idle_workers_exit_when_the_main_process_is_killed(sentencepiece_model, tmp_path):
    script, pids = tmp_path / "orphaning.py", tmp_path / "pids"
    script.write_text(ORPHANING)
    with pids.open("w") as out:     # a file, not a pipe, which workers that outlive the process would hold open
        subprocess.run([sys.executable, str(script), sentencepiece_model], stdout=out, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL, timeout=120)
    workers = [psutil.Process(int(pid)) for pid in pids.read_text().split() if psutil.pid_exists(int(pid))]
    assert pids.read_text().split()
    _, alive = psutil.wait_procs(workers, timeout=30)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"workers {[p.pid for p in alive]} outlived their parent"
