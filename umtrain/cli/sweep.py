"""`umtrain sweep`: expand a grid of config values into runs, validate them all, write them under --out, launch them
(print, one after the other locally, or as a SLURM job array) and summarize their checkpoints. See docs/sweeps.md."""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from umtrain.checkpoint.manager import write_file_atomically
from umtrain.cli.main import positive_int
from umtrain.config import dump_config
from umtrain.config.sweep import (RUN_CHECKPOINTS, Axis, SweepRun, ZipGroup, parse_axis, parse_zip, resolve_sweep,
                                  sanitize)

REPO = Path(__file__).resolve().parents[2]
SBATCH_TEMPLATE = REPO / "launch" / "sweep.sbatch"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SWEEP_JSON = "sweep.json"
SUMMARY_JSON = "summary.json"


class SweepDirError(RuntimeError):
    """--out holds something this sweep must not overwrite."""


class LauncherMissingError(RuntimeError):
    """A file of the repository's launch/ directory that an installed (non-editable) umtrain does not have."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a grid of config variants (print, local, or a SLURM array) and summarize them",
        description="Each point of the grid becomes a run under OUT/<name>/ with its own config.yaml, checkpoints "
                    "and tensorboard directory. Every config is validated before anything is written. Re-running "
                    "the same sweep is safe (unfinished runs resume from their checkpoints); a different sweep into "
                    "the same --out is refused. See docs/sweeps.md.")
    p.add_argument("--config", help="base YAML config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]",
                   help="a swept key and its values (a YAML list); several --grid form their Cartesian product")
    p.add_argument("--zip", action="append", default=[], metavar="[GROUP:]KEY=[V1,V2,...]",
                   help="keys that vary together (equal-length lists): the --zip keys with the same GROUP label (or "
                        "none) form one group, one more factor of the product")
    p.add_argument("overrides", nargs="*", help="fixed key.path=value overrides for every run")
    p.add_argument("--out", help="sweep directory (OUT/<run>/, sweep.json, commands.txt)")
    p.add_argument("--launch", choices=("print", "local", "slurm"), default="print",
                   help="print the commands (default); run them here one after the other; or write OUT/sweep.sbatch")
    p.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="processes per run (umtrain train's option)")
    p.add_argument("--summarize", metavar="OUT", help="only summarize the runs of the sweep in OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return sweep(args)
    except (SweepDirError, LauncherMissingError) as err:
        print(f"umtrain sweep: {err}", file=sys.stderr)
        return 2


def sweep(args: argparse.Namespace) -> int:
    if args.summarize:
        return print_summary(Path(args.summarize))
    if not args.config or not args.out:
        print("umtrain sweep: --config and --out are required (or --summarize OUT)", file=sys.stderr)
        return 2
    if args.launch == "slurm":
        check_slurm_launcher()
    out = Path(args.out).resolve()
    grid, zip_groups = [parse_axis(t) for t in args.grid], parse_zip(args.zip)
    world_size = (args.nproc_per_node or 1) if args.launch == "local" else args.nproc_per_node   # checked up front
    runs = resolve_sweep(args.config, grid, zip_groups, args.overrides, out, world_size=world_size)
    files = sweep_files(runs, out, canonical_command(args, grid, zip_groups, out), args.nproc_per_node)
    if args.launch == "slurm":
        files["sweep.sbatch"] = sbatch_script(runs, out, args.nproc_per_node)
    write_sweep(out, files)
    print(f"sweep of {len(runs)} runs in {out}")
    if args.launch == "local":
        return launch_local(out, args.nproc_per_node)
    if args.launch == "slurm":
        print(f"submit it with:\n    sbatch {shlex.quote(str(out / 'sweep.sbatch'))}")
    else:
        print(files["commands.txt"], end="")
    return 0


# --------------------------------------------------------------------------------------------- files


def nproc_option(nproc_per_node: Optional[int]) -> list[str]:
    return ["--nproc-per-node", str(nproc_per_node)] if nproc_per_node else []


def axis_text(axis: Axis) -> str:
    return f"{axis.key}={json.dumps(list(axis.values), separators=(',', ':'))}"


def grid_options(grid: list[Axis]) -> list[str]:
    return [text for axis in grid for text in ("--grid", axis_text(axis))]


def zip_options(zip_groups: list[ZipGroup]) -> list[str]:
    """Group by group (so `--zip a:x --zip b:y --zip a:z`, the same sweep as `--zip a:x --zip a:z --zip b:y`, is
    written as the latter)."""
    return [text for group in zip_groups for axis in group.axes
            for text in ("--zip", f"{group.label}:{axis_text(axis)}" if group.label else axis_text(axis))]


def canonical_command(args: argparse.Namespace, grid: list[Axis], zip_groups: list[ZipGroup], out: Path) -> list[str]:
    """The sweep as a command (without --launch, which does not change the runs), values in a fixed notation."""
    return ["umtrain", "sweep", "--config", str(Path(args.config).resolve()), *grid_options(grid),
            *zip_options(zip_groups), "--out", str(out), *nproc_option(args.nproc_per_node), *args.overrides]


def train_command(config_path: Path, nproc_per_node: Optional[int]) -> list[str]:
    return ["umtrain", "train", "--config", str(config_path), *nproc_option(nproc_per_node)]


def config_path(out: Path, name: str) -> Path:
    return out / name / "config.yaml"


def sweep_files(runs: list[SweepRun], out: Path, command: list[str], nproc_per_node: Optional[int]) -> dict[str, str]:
    """Relative path -> text of everything the sweep writes (sweep.json first)."""
    record = {
        "command": shlex.join(command),
        "workdir": str(Path.cwd()),
        "runs": [{"name": r.name, "point": r.point, "config": str(config_path(out, r.name)),
                  "checkpoints": r.config.checkpoint.save, "train_iters": r.config.training.train_iters}
                 for r in runs],
    }
    files = {SWEEP_JSON: json.dumps(record, indent=1) + "\n"}
    files.update({f"{r.name}/config.yaml": dump_config(r.config) for r in runs})
    files["commands.txt"] = "".join(shlex.join(train_command(config_path(out, r.name), nproc_per_node)) + "\n"
                                    for r in runs)
    return files


def write_sweep(out: Path, files: dict[str, str]) -> None:
    """Write `files` under `out`. A file already there must be identical (the same sweep, re-run); otherwise
    nothing is written. A non-empty `out` without a sweep.json is not a sweep directory: refused."""
    if out.is_dir() and any(out.iterdir()) and not (out / SWEEP_JSON).is_file():
        raise SweepDirError(f"{out} exists and holds no {SWEEP_JSON} (not a sweep directory); choose another --out")
    differing = [name for name, text in files.items() if (out / name).is_file() and (out / name).read_text() != text]
    if differing:
        raise SweepDirError(f"{out} holds a different sweep ({', '.join(differing)} would change); re-run the same "
                            f"sweep to resume it, or choose another --out")
    for name, text in files.items():
        path = out / name
        if not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_file_atomically(path, text)   # an interrupted write leaves no truncated file to conflict with
            except OSError as err:
                raise SweepDirError(f"cannot write {path}: {err.strerror}") from None


def check_slurm_launcher() -> None:
    """The SLURM array script is made from launch/ files of a source checkout, which an installed package lacks."""
    for path in (SBATCH_TEMPLATE, TORCHRUN_SH):
        if not path.is_file():
            raise LauncherMissingError(
                f"--launch slurm needs {path}, which this umtrain installation lacks: the SLURM launcher runs from a "
                f"source checkout (clone the repository and `pip install -e .` in it); --launch print or local work "
                f"without it")


def sbatch_script(runs: list[SweepRun], out: Path, nproc_per_node: Optional[int]) -> str:
    """launch/sweep.sbatch with this sweep's array range, configs and working directory filled in."""
    from umtrain.checkpoint import REQUEUE_EXIT_CODE

    fields = {
        "@JOB_NAME@": sanitize(out.name),
        "@ARRAY@": f"0-{len(runs) - 1}",
        "@OUT@": str(out),
        "@REQUEUE_EXIT_CODE@": str(REQUEUE_EXIT_CODE),
        "@CONFIGS@": " ".join(shlex.quote(str(config_path(out, r.name))) for r in runs),
        "@NPROC@": str(nproc_per_node or ""),
        "@WORKDIR@": shlex.quote(str(Path.cwd())),
        "@TORCHRUN@": shlex.quote(str(TORCHRUN_SH)),
    }
    text = SBATCH_TEMPLATE.read_text()
    for field, value in fields.items():
        text = text.replace(field, value)
    return text


# --------------------------------------------------------------------------------------------- local launch


def this_umtrain_env() -> dict[str, str]:
    """The environment with this umtrain first on the path (a checkout need not be installed)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def launch_local(out: Path, nproc_per_node: Optional[int]) -> int:
    """Train the runs one after the other (each resumes from its own checkpoints; finished ones are skipped), go on
    after a failure, print the summary. Non-zero when a run failed."""
    runs = read_sweep(out)["runs"]
    exit_codes: dict[str, int] = {}
    for i, entry in enumerate(runs, 1):
        if run_result(out, entry)["status"] == "done":
            print(f"[{i}/{len(runs)}] {entry['name']}: already done")
            continue
        log = out / entry["name"] / "train.log"
        print(f"[{i}/{len(runs)}] {entry['name']}: training (log: {log})", flush=True)
        _, *train_args = train_command(Path(entry["config"]), nproc_per_node)
        command = [sys.executable, "-m", "umtrain.cli.main", *train_args]
        with open(log, "a") as f:
            exit_codes[entry["name"]], stopped = run_training(command, f)
        if stopped:
            print(f"[{i}/{len(runs)}] {entry['name']}: stopped by a signal (exit code {exit_codes[entry['name']]}); "
                  f"re-run the same command to resume the sweep")
            return exit_codes[entry["name"]] or 1
        if exit_codes[entry["name"]]:
            print(f"[{i}/{len(runs)}] {entry['name']}: failed with exit code {exit_codes[entry['name']]} (see {log})")
    print_summary(out, exit_codes)
    return int(any(exit_codes.values()))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def signal_for_the_run(signum: int) -> int:
    """What a stop signal to the sweep becomes for its run: SIGINT (Ctrl-C) is an abort to training, with no
    checkpoint, and SIGHUP (the terminal closed) would not reach a run in its own process group, so both go on as
    SIGTERM (checkpoint and exit); SIGTERM and SIGUSR1 go on as they are."""
    return signal.SIGTERM if signum in (signal.SIGINT, signal.SIGHUP) else signum


def exit_code_of(returncode: int) -> int:
    """A shell's exit code: Popen's -N for a process killed by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def run_training(command: list[str], log) -> tuple[int, bool]:
    """One run's training process, with the stop signals this process gets passed on to it (it checkpoints and
    exits; without this a killed sweep would leave it training, and a re-run would train the same run twice). It
    runs in its own process group, so that a terminal's Ctrl-C reaches it only through the sweep, as a SIGTERM.
    Returns its exit code and whether a stop signal came."""
    received: list[int] = []
    child: Optional[subprocess.Popen] = None

    def pass_on(signum, frame) -> None:
        received.append(signum)
        if child is not None:
            child.send_signal(signal_for_the_run(signum))

    previous = {sig: signal.signal(sig, pass_on) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}       # `nohup umtrain sweep` stays deaf to SIGHUP
    try:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=this_umtrain_env(),
                                 process_group=0)
        if received:   # it came while the child was being started
            child.send_signal(signal_for_the_run(received[-1]))
        return exit_code_of(child.wait()), bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------- summary


def read_sweep(out: Path) -> dict[str, Any]:
    path = out / SWEEP_JSON
    if not path.is_file():
        raise SweepDirError(f"{path} not found (not a sweep directory)")
    return json.loads(path.read_text())


def validation_losses(valid_loss: dict) -> list[tuple[int, float]]:
    """The history's {iteration: validation loss} as (iteration, loss) pairs in iteration order."""
    return sorted((int(iteration), float(loss)) for iteration, loss in valid_loss.items())


def best_validation(losses: list[tuple[int, float]]) -> tuple[Optional[int], Optional[float]]:
    """The lowest validation loss and its iteration (the earliest on a tie; a NaN only when every loss is NaN)."""
    if not losses:
        return None, None
    return min(losses, key=lambda pair: (math.isnan(pair[1]), pair[1], pair[0]))


def run_result(out: Path, entry: dict[str, Any], exit_code: Optional[int] = None) -> dict[str, Any]:
    """One run's state from its latest checkpoint's common state (no tensor is read). The checkpoints are found
    under `out`, not at the recorded absolute path, so a sweep directory copied elsewhere still summarizes."""
    from umtrain.checkpoint.convert import read_megatron_common
    from umtrain.checkpoint.manager import read_latest

    result = {"name": entry["name"], "point": entry["point"], "train_iters": entry["train_iters"],
              "iteration": None, "train_loss": None, "valid_loss": None, "valid_iteration": None,
              "best_valid_loss": None, "best_valid_iteration": None}
    latest = read_latest(out / entry["name"] / RUN_CHECKPOINTS)
    if latest is not None and latest.is_dir():
        common = read_megatron_common(latest)
        history = common.get("history") or {}
        result["iteration"] = int(common["iteration"])
        result["train_loss"] = float(history["loss"][-1]) if history.get("loss") else None
        losses = validation_losses(history.get("valid_loss") or {})
        result["valid_iteration"], result["valid_loss"] = losses[-1] if losses else (None, None)
        result["best_valid_iteration"], result["best_valid_loss"] = best_validation(losses)
    result["status"] = run_status(result["iteration"], entry["train_iters"], exit_code)
    return result


def run_status(iteration: Optional[int], train_iters: int, exit_code: Optional[int]) -> str:
    if iteration is not None and iteration >= train_iters:
        return "done"
    if exit_code:
        return f"failed (exit {exit_code})"
    return "not started" if iteration is None else "partial"


def summarize(out: Path, exit_codes: Optional[dict[str, int]] = None) -> list[dict[str, Any]]:
    """Every run's result, lowest best validation loss first (then last validation loss, then train loss; a missing
    or NaN loss ranks last); also written to OUT/summary.json."""
    exit_codes = exit_codes or {}
    results = [run_result(out, entry, exit_codes.get(entry["name"])) for entry in read_sweep(out)["runs"]]
    results.sort(key=lambda r: (*loss_rank(r["best_valid_loss"]), *loss_rank(r["valid_loss"]),
                                *loss_rank(r["train_loss"])))
    (out / SUMMARY_JSON).write_text(json.dumps({"runs": results}, indent=1) + "\n")
    return results


def loss_rank(loss: Optional[float]) -> tuple[int, float]:
    """A sort key: a loss, then NaN, then no loss (NaN compares false with everything and would scramble a sort)."""
    if loss is None:
        return 2, 0.0
    return (1, 0.0) if math.isnan(loss) else (0, loss)


def format_table(results: list[dict[str, Any]]) -> str:
    def number(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    def at(value: Optional[float], iteration: Optional[int]) -> str:
        return number(value) if value is None else f"{number(value)}@{iteration}"

    header = ("run", "status", "iteration", "train loss", "valid loss", "best valid")
    rows = [(r["name"], r["status"], f"{r['iteration'] if r['iteration'] is not None else '-'}/{r['train_iters']}",
             number(r["train_loss"]), number(r["valid_loss"]), at(r["best_valid_loss"], r["best_valid_iteration"]))
            for r in results]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows])


def print_summary(out: Path, exit_codes: Optional[dict[str, int]] = None) -> int:
    print(format_table(summarize(out, exit_codes)))
    print(f"(written to {out / SUMMARY_JSON})")
    return 0
