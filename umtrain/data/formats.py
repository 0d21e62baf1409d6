"""The input file types preprocessing reads, by name suffix (a module of its own: the CLI's help lists them without
importing the readers' pyarrow)."""

from typing import Literal

Format = Literal["jsonl", "parquet"]

FORMATS: dict[str, Format] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".jsonl.gz": "jsonl", ".json.gz": "jsonl", ".jsonl.zst": "jsonl",
    ".json.zst": "jsonl", ".parquet": "parquet",
}
