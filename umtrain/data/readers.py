"""Reading documents from JSON Lines and Parquet shards, streamed.

JSON Lines files are streamed as raw lines through the `datasets` library (its `text` builder keeps one row per
physical line, and decompresses), and parsed by `parse_row`, so every error can name its file and line. Parquet files
are streamed by pyarrow, the text column alone (other columns may hold types `datasets` cannot map, such as Spark's
maps); errors name the row.
"""

from __future__ import annotations

import glob
import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import pyarrow.parquet
import zstandard

from umtrain.config.base import ConfigError
from umtrain.data.formats import FORMATS, Format

STREAM_BATCH_ROWS = 1024


class DataInputError(ValueError):
    """A bad record in an input file: `path`, `location` ('line 7' or 'row 7') and what is wrong."""

    def __init__(self, path: str, location: str, message: str):
        self.path, self.location, self.message = path, location, message
        super().__init__(f"{path}, {location}: {message}")

    def __reduce__(self):
        return type(self), (self.path, self.location, self.message)


def input_format(path: Path) -> Format:
    name = path.name.lower()
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise ConfigError(str(path), f"unsupported input file type; expected one of {sorted(FORMATS)}")


def resolve_inputs(patterns: list[str], text_key: str = "text") -> list[Path]:
    """Expand files and globs (each sorted) and check every file before any work starts: it exists, has a known
    type, is not empty and (Parquet) has the `text_key` column."""
    if not patterns:
        raise ConfigError("inputs", "no input files given")
    files: list[Path] = []
    for pattern in patterns:
        is_pattern = bool(set("*?[") & set(pattern)) and not Path(pattern).is_file()   # `shard[1].jsonl` is a name
        matches = sorted(glob.glob(pattern, recursive=True)) if is_pattern else [pattern]
        if not matches:
            raise ConfigError(pattern, "the pattern matches no files")
        files.extend(Path(m) for m in matches)
    for path in files:
        _check_input_file(path, text_key)
    return files


def _check_input_file(path: Path, text_key: str) -> None:
    if path.is_dir():
        raise ConfigError(str(path), f"is a directory; give the files in it, e.g. '{path}/*.jsonl'")
    if not path.is_file():
        raise ConfigError(str(path), "input file not found")
    if "::" in str(path):
        raise ConfigError(str(path), "'::' in a file name reads as fsspec's URL chaining; rename the file")
    fmt = input_format(path)
    if path.stat().st_size == 0:
        raise ConfigError(str(path), "the file is empty")
    if fmt == "parquet":
        metadata = pyarrow.parquet.read_metadata(path)
        columns = metadata.schema.to_arrow_schema().names   # top-level columns (schema.names lists nested leaves)
        if text_key not in columns:
            raise ConfigError(str(path), f"has no column {text_key!r} (columns: {columns})")
        if metadata.num_rows == 0:
            raise DataInputError(str(path), "whole file", "holds no records")


def stream_rows(path: Path, text_key: str) -> Iterator[list[tuple[int, Any]]]:
    """Batches of (1-based line or row number, raw row): the line's text for JSON Lines, the value for Parquet."""
    fmt = input_format(path)
    if fmt == "jsonl":
        import datasets   # preprocessing only: training and its config checks run without it

        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False   # else a request to the Hub per file (3 s behind a firewall)
        literal = glob.escape(str(path))   # `datasets` expands data_files as patterns
        dataset = datasets.load_dataset("text", data_files=literal, split="train", streaming=True)
        batches = (batch["text"] for batch in dataset.iter(batch_size=STREAM_BATCH_ROWS))
    else:
        parquet = pyarrow.parquet.ParquetFile(path)
        batches = (batch.column(0).to_pylist()
                   for batch in parquet.iter_batches(batch_size=STREAM_BATCH_ROWS, columns=[text_key]))
    number = 0
    try:
        for values in batches:
            yield list(enumerate(values, start=number + 1))
            number += len(values)
    except UnicodeDecodeError as err:
        if fmt == "parquet":
            raise _first_undecodable_row(path, text_key, after=number) from err
        raise _first_undecodable_line(path, after=number) from err
    except (EOFError, OSError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException) as err:   # damaged data
        raise DataInputError(str(path), f"after {'line' if fmt == 'jsonl' else 'row'} {number}",
                             f"cannot be read: {type(err).__name__}: {err}") from err


def _first_undecodable_line(path: Path, after: int) -> DataInputError:
    """The streaming reader decodes whole chunks; find the line (and byte) that is not UTF-8 by reading the lines
    after the last good batch one at a time (compressed files too)."""
    import fsspec

    with fsspec.open(str(path), "rb", compression="infer") as f:
        return _first_undecodable(path, f, "line", after, "")


def _first_undecodable_row(path: Path, text_key: str, after: int) -> DataInputError:
    """The same for a Parquet column: its values as bytes, row by row."""
    batches = pyarrow.parquet.ParquetFile(path).iter_batches(columns=[text_key])
    values = (value for batch in batches for value in batch.column(0).cast(pyarrow.binary()).to_pylist())
    return _first_undecodable(path, values, "row", after, f"{text_key!r} is ")


def _first_undecodable(path: Path, records: Iterable[Optional[bytes]], unit: str, after: int,
                       subject: str) -> DataInputError:
    """The first of `records` (lines or values, numbered from 1) past the first `after` that is not UTF-8."""
    for number, record in enumerate(records, start=1):
        if number <= after or record is None:
            continue
        try:
            record.decode("utf-8")
        except UnicodeDecodeError as err:
            return DataInputError(str(path), f"{unit} {number}", f"{subject}not valid UTF-8 at byte {err.start + 1} "
                                                                 f"({err.reason})")
    return DataInputError(str(path), f"after {unit} {after}", f"{subject}not valid UTF-8")


def parse_row(path: str, fmt: Format, number: int, raw: Any, text_key: str) -> str | None:
    """The document text of one row, or None for a blank JSON Lines line. Raises `DataInputError`."""
    if fmt == "parquet":
        if not isinstance(raw, str):
            raise DataInputError(path, f"row {number}", f"{text_key!r} is {type(raw).__name__}, not a string")
        return raw
    if not raw.strip():
        return None
    location = f"line {number}"
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DataInputError(path, location, f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataInputError(path, location, f"expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        raise DataInputError(path, location, f"the record has no {text_key!r} field (fields: {sorted(record)})")
    text = record[text_key]
    if not isinstance(text, str):
        raise DataInputError(path, location, f"{text_key!r} is {type(text).__name__}, not a string")
    return _encodable(text, path, location, text_key)


def _encodable(text: str, path: str, location: str, text_key: str) -> str:
    """`text`, if it is valid Unicode. JSON can escape half of a surrogate pair (`"\\ud800"`, a truncated emoji
    in crawl and tweet dumps), which no tokenizer can encode. (A Parquet string cannot hold one: Arrow strings are
    UTF-8.)"""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataInputError(path, location, f"{text_key!r} holds a lone surrogate \\u{ord(text[err.start]):04x} "
                                             f"at character {err.start + 1}") from None
    return text


def iter_texts(path: Path, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """(line or row number, text) of every document of one file, in order."""
    fmt = input_format(path)
    found = False
    for batch in stream_rows(path, text_key):
        for number, raw in batch:
            text = parse_row(str(path), fmt, number, raw, text_key)
            if text is not None:
                found = True
                yield number, text
    if not found:
        raise DataInputError(str(path), "whole file", "holds no records")
