"""What the benchmark scripts share: lookup-reduce inputs, the machine description and the JSON they write.

Scripts import it as a sibling (`from common import ...`): running `python benchmarks/X.py` puts benchmarks/ first
on sys.path, with or without PYTHONPATH=. Import it after any environment variable torch reads at import time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch


def lookup_reduce_benchmark_inputs(*, tokens: int, k: int, cores: int, d_v: int, blocks: int, rows: int,
                                   dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Seeded lookup-reduce inputs: rows, blocks [T, K]; scores [h, T, K] and table [N, d_v] as leaves; the
    output gradient [T, E, d_v].

    Floats are drawn in `dtype` directly: a float32 draw cast afterwards would leave a float32 table's worth of
    peak RSS behind, which the CPU benchmark's peak-memory baseline would then absorb.
    """
    gen = torch.Generator(device=device).manual_seed(0)
    index_rows = torch.randint(0, rows, (tokens, k), generator=gen, device=device)
    index_blocks = torch.randint(0, blocks, (tokens, k), generator=gen, device=device)
    scores = torch.randn(cores, tokens, k, generator=gen, dtype=dtype, device=device).requires_grad_()
    table = torch.randn(rows, d_v, generator=gen, dtype=dtype, device=device).requires_grad_()
    grad = torch.randn(tokens, blocks, d_v, generator=gen, dtype=dtype, device=device)
    return index_rows, index_blocks, scores, table, grad


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU), so that a timer reads the work, not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to `count` (unchanged when None or 0) inside, restored after."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def cpu_model_name() -> str:
    """The processor as `lscpu` names it, else what `platform` knows."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return fields.get("Model name", platform.processor()).strip()


def machine() -> dict:
    """The hardware and software a result was measured on."""
    return {"cpu": cpu_model_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """`python benchmarks/<script> <argv>`; argv defaults to this process's arguments."""
    arguments = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *arguments])


def with_provenance(result: dict, script: str, argv: Optional[Sequence[str]] = None) -> dict:
    """`result` after command, date_utc and machine: `result`'s own machine (machine() with the run's additions)
    where it has one, else machine()."""
    rest = {key: value for key, value in result.items() if key != "machine"}
    date_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"command": command_line(script, argv), "date_utc": date_utc,
            "machine": result["machine"] if "machine" in result else machine(), **rest}


def write_result(out: Path, result: dict, script: str, argv: Optional[Sequence[str]] = None,
                 compact: bool = False) -> dict:
    """Writes `result` with its provenance (see with_provenance) to `out` as JSON, and returns what it wrote."""
    record = with_provenance(result, script, argv)
    text = json.dumps(record, separators=(",", ":")) if compact else json.dumps(record, indent=2) + "\n"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return record
