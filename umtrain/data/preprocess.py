"""JSON Lines / Parquet shards -> Megatron's indexed dataset (`prefix.bin` + `prefix.idx`), one document per record.

The main process streams raw rows; worker processes parse and tokenise batches of them; the main process writes the
results in input order, so the output does not depend on the number of workers. The files are written under a
temporary name and renamed once complete.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import shutil
import signal
import threading
import traceback
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from umtrain.config.base import ConfigError
from umtrain.data.readers import DataInputError, Format, input_format, parse_row, resolve_inputs, stream_rows
from umtrain.data.tokenizer import Tokenizer, TokenizerType, load_tokenizer

logger = logging.getLogger("umtrain")

IN_FLIGHT_PER_WORKER = 4
"""Batches queued per worker: enough to keep workers busy, bounded so a huge file never sits in memory."""
WORKER_CHECK_S = 1.0
"""How often a wait for a worker's batch checks that the worker still lives, and an idle worker its parent."""


class WorkerDied(RuntimeError):
    """A worker process ended without returning its batch (killed for memory, or crashed in native code)."""


@dataclass
class _RowBatch:
    path: str
    fmt: Format
    rows: list[tuple[int, object]]


@dataclass
class _EncodedBatch:
    documents: list[np.ndarray]
    records: int
    """Non-blank rows; documents + empty texts."""


@dataclass
class _EncoderState:
    tokenizer: Tokenizer
    text_key: str
    append_eod: bool
    dtype: type


_STATE: _EncoderState | None = None
"""Per worker process (set by the pool initializer) or in-process when workers == 1."""


def _init_encoder(tokenizer_type: str, tokenizer_model: str, text_key: str, append_eod: bool, dtype: type) -> None:
    global _STATE
    _STATE = _EncoderState(load_tokenizer(tokenizer_type, tokenizer_model), text_key, append_eod, dtype)


def _encode_batch(batch: _RowBatch) -> _EncodedBatch:
    state = _STATE
    documents, records = [], 0
    for number, raw in batch.rows:
        text = parse_row(batch.path, batch.fmt, number, raw, state.text_key)
        if text is None:
            continue
        records += 1
        ids = state.tokenizer.tokenize(text)
        if ids:
            if state.append_eod:
                ids.append(state.tokenizer.eod)
            documents.append(np.asarray(ids, dtype=state.dtype))
    return _EncodedBatch(documents, records)


def preprocess(
    inputs: list[str],
    output_prefix: str,
    tokenizer_type: TokenizerType,
    tokenizer_model: str,
    workers: int = 1,
    text_key: str = "text",
    append_eod: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Tokenise every record's `text_key` of `inputs` (files or globs) into `output_prefix.bin/.idx`.

    Records whose text tokenises to nothing are skipped (counted as `empty_documents`). Returns the statistics
    `{"documents", "tokens", "empty_documents", "files", "output_prefix"}`.
    """
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1, got {workers}")
    files = resolve_inputs(inputs, text_key)
    bin_path, idx_path = _check_output(output_prefix, overwrite)
    if overwrite:
        _remove_index_cache(output_prefix)
    tokenizer = load_tokenizer(tokenizer_type, tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    tmp_bin, tmp_idx = (path.with_name(f"{path.name}.tmp-{os.getpid()}") for path in (bin_path, idx_path))
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    try:
        with _terminate_as_exit(), _encoder(workers, tokenizer_type, tokenizer_model, text_key, append_eod,
                                            dtype) as encode_all:
            stats = _write_documents(builder, files, text_key, encode_all, f"preprocess {Path(output_prefix).name}",
                                     progress)
        if stats["documents"] == 0:
            raise ConfigError("inputs", f"no record of {[str(p) for p in files]} has text that tokenises to anything")
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()
        for path in (tmp_bin, tmp_idx):
            path.unlink(missing_ok=True)
    return {**stats, "files": len(files), "output_prefix": output_prefix}


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM (scancel, a job timeout) unwinds like Ctrl-C, so that the partial output is removed; in the main
    thread only, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_documents(builder: IndexedDatasetBuilder, files: list[Path], text_key: str,
                     encode_all: Callable[[Iterator[_RowBatch]], Iterator[_EncodedBatch]], description: str,
                     progress: bool) -> dict:
    stats = {"documents": 0, "tokens": 0, "empty_documents": 0}
    with tqdm(unit="doc", desc=description, disable=not progress) as bar:
        for path in files:
            records = 0
            for encoded in encode_all(_batches(path, text_key)):
                for document in encoded.documents:
                    builder.add_document(document, [len(document)])
                    stats["tokens"] += len(document)
                records += encoded.records
                stats["documents"] += len(encoded.documents)
                stats["empty_documents"] += encoded.records - len(encoded.documents)
                bar.update(encoded.records)
                bar.set_postfix(tokens=stats["tokens"], refresh=False)
            if records == 0:
                raise DataInputError(str(path), "whole file", "holds no records")
    return stats


def _check_output(output_prefix: str, overwrite: bool) -> tuple[Path, Path]:
    bin_path, idx_path = Path(output_prefix + ".bin"), Path(output_prefix + ".idx")
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(output_prefix, f"output exists ({', '.join(existing)}); pass overwrite=True (--overwrite)")
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    return bin_path, idx_path


def _remove_index_cache(output_prefix: str) -> None:
    """Megatron caches a prefix's sample indices in `PREFIX/cache/` (without `data.cache_path`) and keys them on the
    path, not on the data: indices of the old data would be loaded for the new."""
    cache = Path(output_prefix) / "cache"
    if cache.is_dir():
        logger.info("removing %s: Megatron's sample indices of the data being overwritten", cache)
        shutil.rmtree(cache)
        with suppress(OSError):
            cache.parent.rmdir()


def _batches(path: Path, text_key: str) -> Iterator[_RowBatch]:
    fmt = input_format(path)
    for rows in stream_rows(path, text_key):
        yield _RowBatch(str(path), fmt, rows)


@contextmanager
def _encoder(workers: int, tokenizer_type: str, tokenizer_model: str, text_key: str, append_eod: bool,
             dtype: type) -> Iterator[Callable[[Iterator[_RowBatch]], Iterator[_EncodedBatch]]]:
    """A function mapping row batches to encoded batches in order: in-process, or over `workers` processes."""
    init_args = (tokenizer_type, tokenizer_model, text_key, append_eod, dtype)
    if workers == 1:
        _init_encoder(*init_args)
        yield lambda batches: map(_encode_batch, batches)
        return
    pool = _EncoderProcesses(workers, init_args)
    try:
        yield pool.map
    finally:
        pool.close()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Workers forked from a fork server that imported this module once: they start without re-importing
    megatron.core (seconds per process), and unlike a plain fork they never copy a lock held by another thread of
    the caller (a trainer's or a test runner's process-group and tokenizer threads)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


class _EncoderProcesses:
    """Encoding processes, each with its own task queue and result pipe: batches go round-robin and come back in
    input order, at most IN_FLIGHT_PER_WORKER per worker queued. A worker that dies (killed for memory, a crash in
    native code) fails the run at once, even in the middle of sending a result. `multiprocessing.Pool` waits forever
    for a dead worker's batch, and both it and `ProcessPoolExecutor` can hang in shutdown after such a death (their
    workers share queues and locks)."""

    def __init__(self, workers: int, init_args: tuple):
        context = _worker_context()
        self.tasks = [context.Queue() for _ in range(workers)]
        for tasks in self.tasks:
            tasks.cancel_join_thread()       # exiting never waits to feed a dead worker
        pipes = [context.Pipe(duplex=False) for _ in range(workers)]
        self.results = [reader for reader, _ in pipes]
        self.processes = [context.Process(target=_encode_loop, args=(init_args, tasks, writer), daemon=True)
                          for tasks, (_, writer) in zip(self.tasks, pipes)]
        for process, (_, writer) in zip(self.processes, pipes):
            process.start()
            writer.close()                   # the worker's is then the only write end: its death reads as EOF

    def map(self, batches: Iterator[_RowBatch]) -> Iterator[_EncodedBatch]:
        max_in_flight = IN_FLIGHT_PER_WORKER * len(self.processes)
        sent = received = 0
        for batch in batches:
            self.tasks[sent % len(self.tasks)].put(batch)
            sent += 1
            if sent - received >= max_in_flight:
                yield self._result(received)
                received += 1
        for index in range(received, sent):
            yield self._result(index)

    def _result(self, index: int) -> _EncodedBatch:
        worker = index % len(self.processes)
        process, results = self.processes[worker], self.results[worker]
        try:
            while not results.poll(WORKER_CHECK_S):
                if not process.is_alive():
                    raise EOFError
            outcome = results.recv()
        except EOFError:
            process.join(WORKER_CHECK_S)
            raise WorkerDied(f"preprocessing worker {process.pid} died (exit code {process.exitcode}); nothing was "
                             f"written. If the system killed it for memory, use fewer workers") from None
        if isinstance(outcome, _WorkerFailure):
            raise outcome.error
        return outcome

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.join()


@dataclass
class _WorkerFailure:
    error: Exception


def _encode_loop(init_args: tuple, tasks: multiprocessing.Queue, results: Connection) -> None:
    """A worker: encode batches until killed, or until its parent is gone (killed itself: nothing else would end
    an idle worker); a failure goes back as the batch's result (a bad record's DataInputError as it is, anything
    else as its traceback, which always pickles)."""
    _init_encoder(*init_args)
    parent = multiprocessing.parent_process()
    while True:
        try:
            batch = tasks.get(timeout=WORKER_CHECK_S)
        except queue.Empty:
            if not parent.is_alive():
                return
            continue
        try:
            outcome = _encode_batch(batch)
        except DataInputError as err:
            outcome = _WorkerFailure(err)
        except Exception:
            outcome = _WorkerFailure(RuntimeError(f"a preprocessing worker failed:\n{traceback.format_exc()}"))
        results.send(outcome)
