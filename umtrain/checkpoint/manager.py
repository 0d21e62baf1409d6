"""The checkpoint directory on disk: names, the manifest that makes a checkpoint verifiable, the atomic publish,
the `latest` marker, retention. Pure filesystem code, run by one process (global rank 0).

    <save>/iter_0000100/          a complete, verified checkpoint (dist_checkpointing files + config.yaml + manifest)
    <save>/iter_0000200.tmp/      being written; never read; replaced when the same iteration is saved again
    <save>/latest                 "iter_0000200", replaced atomically after the rename
    <save>/.lock                  held (flock) by the one run that saves here; names its host and pid

A checkpoint becomes visible by one `rename` of its temporary directory, after its manifest (every file's size and
CRC-32) has been written; resuming re-checks the manifest, so a truncated or corrupted file is detected.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

logger = logging.getLogger("umtrain")

MANIFEST = "umtrain_manifest.json"
LATEST = "latest"
LOCK = ".lock"
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^iter_(\d{7,})$")
_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked (it fails verification)."""


@dataclass(frozen=True)
class Checkpoint:
    iteration: int
    path: Path


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def temporary_path(root: Path, iteration: int) -> Path:
    return root / (checkpoint_name(iteration) + ".tmp")


def iteration_of(path: Path) -> Optional[int]:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def list_checkpoints(root: Path) -> list[Checkpoint]:
    """Published checkpoint directories (by name), oldest first; whether they verify is not checked here."""
    if not root.is_dir():
        return []
    found = [Checkpoint(iteration_of(p), p) for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=lambda c: c.iteration)


# --------------------------------------------------------------------------------------------- ownership

_claimed: dict[Path, IO[str]] = {}


class DirectoryInUse(CheckpointError):
    """Another live process saves into this directory."""


def claim(root: Path) -> None:
    """Make this process the one that saves into `root` until it exits or calls `release`: two runs saving into one
    directory remove each other's saves in progress (as stale) and apply retention to each other's checkpoints.
    An exclusive `flock` on `root/.lock`, which the kernel drops when the process dies (a killed run leaves no stale
    lock). Claiming a directory this process holds is a no-op. Where no lock can be taken (a filesystem without
    `flock`, e.g. Lustre mounted without `-o flock`; a lock file that cannot even be read) the claim is skipped with
    a warning."""
    root = root.resolve()
    if root in _claimed:
        return
    root.mkdir(parents=True, exist_ok=True)
    try:
        handle = _open_lock_file(root / LOCK)
    except OSError as err:
        _warn_unlocked(root, err)
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno != errno.EWOULDBLOCK:
            _warn_unlocked(root, err)
            return
        holder = _holder_named_in(root / LOCK) or "a process that names none"
        raise DirectoryInUse(f"{root} is in use by another run ({holder}); wait for it to end, or save this run "
                             f"elsewhere") from None
    if handle.writable():
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
        handle.flush()
    _claimed[root] = handle


def _open_lock_file(path: Path) -> IO[str]:
    """For writing the holder's name; read-only where it cannot be written (another user's lock file left in a
    shared directory, a read-only mount): `flock` needs only a descriptor."""
    try:
        return os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    except PermissionError:
        return open(path)


def _warn_unlocked(root: Path, err: OSError) -> None:
    logger.warning("cannot lock %s (%s): a second run saving into it would not be detected", root / LOCK,
                   err.strerror)


def _holder_named_in(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def release(root: Path) -> None:
    """Give up a `claim` (the lock file stays: removing it would race with a run claiming it)."""
    handle = _claimed.pop(root.resolve(), None)
    if handle is not None:
        handle.close()


# --------------------------------------------------------------------------------------------- manifest


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".writing")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(directory: Path, iteration: int) -> None:
    """Record every file's size and CRC-32 (after fsyncing it): the manifest's presence means 'complete'."""
    files = {}
    for path in _data_files(directory):
        _fsync(path)
        files[str(path.relative_to(directory))] = {"bytes": path.stat().st_size, "crc32": _crc32(path)}
    write_file_atomically(directory / MANIFEST, json.dumps({"iteration": iteration, "files": files}, indent=1))


def verification_error(directory: Path, checksums: bool = True) -> Optional[str]:
    """None if `directory` holds exactly the files of its manifest with their sizes and (unless `checksums` is
    off, which reads no data) their checksums; else why not."""
    if not (directory / MANIFEST).is_file():
        return f"{directory} has no {MANIFEST} (not a checkpoint, or its write was interrupted)"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{directory / MANIFEST} is unreadable: {err}"
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if checksums and _crc32(path) != expected["crc32"]:
            return f"{path} fails its CRC-32 check (corrupted)"
    return None


def bytes_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in _data_files(directory))


# --------------------------------------------------------------------------------------------- publish


def prepare_temporary(root: Path, iteration: int) -> Path:
    """An empty temporary directory for `iteration` (a stale one from a killed run is not a checkpoint: removed)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(root, iteration)
    if tmp.exists():
        logger.warning("removing the incomplete checkpoint %s left by an interrupted save", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def set_aside(path: Path) -> Path:
    """Move a checkpoint this run did not write out of the way instead of overwriting it."""
    target = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
    os.rename(path, target)
    logger.warning("%s existed from an earlier run; kept as %s (not overwritten)", path, target)
    return target


def publish(tmp: Path, iteration: int) -> Path:
    """Manifest, then one atomic rename to the final name, then `latest`. Returns the final path."""
    root = tmp.parent
    write_manifest(tmp, iteration)
    final = root / checkpoint_name(iteration)
    os.rename(tmp, final)
    _fsync(root)
    write_file_atomically(root / LATEST, checkpoint_name(iteration) + "\n")
    _fsync(root)
    return final


def read_latest(root: Path) -> Optional[Path]:
    try:
        name = (root / LATEST).read_text().strip()
    except OSError:
        return None
    return root / name if _NAME.match(name) else None


# --------------------------------------------------------------------------------------------- resume


def resolve_resume(path: Path) -> tuple[Optional[Checkpoint], list[str]]:
    """The checkpoint to resume from `path` and the warnings of candidates skipped on the way.

    `path` is a checkpoint directory (used as is; an error if it does not verify) or a checkpoint root: its
    `latest` if that verifies, else the newest older checkpoint that does.
    """
    if iteration_of(path) is not None or is_checkpoint_dir(path):
        error = verification_error(path)
        if error is not None:
            raise CheckpointError(f"cannot load {path}: {error}")
        return Checkpoint(_manifest_iteration(path), path), []
    latest = read_latest(path)
    candidates = list_checkpoints(path)
    if latest is not None:
        limit = iteration_of(latest)
        candidates = [c for c in candidates if c.iteration <= limit]
        if not latest.is_dir():
            candidates.append(Checkpoint(limit, latest))
    warnings = []
    for candidate in sorted(candidates, key=lambda c: c.iteration, reverse=True):
        error = verification_error(candidate.path)
        if error is None:
            return candidate, warnings
        warnings.append(f"skipping checkpoint {candidate.path}: {error}")
    return None, warnings


def _manifest_iteration(path: Path) -> int:
    return int(json.loads((path / MANIFEST).read_text())["iteration"])


# --------------------------------------------------------------------------------------------- retention


def retained(iterations: Iterable[int], keep_last: int, keep_every: int, newest: int) -> set[int]:
    """The last `keep_last` iterations, every multiple of `keep_every` (0: none), and `newest`."""
    ordered = sorted(iterations)
    keep = set(ordered[-keep_last:]) | {newest}
    if keep_every:
        keep |= {i for i in ordered if i % keep_every == 0}
    return keep


def apply_retention(root: Path, keep_last: int, keep_every: int, newest: int) -> list[Path]:
    """Delete the checkpoints retention does not keep (renamed first, so a half-deleted one never looks valid).
    One that fails verification (files missing or of the wrong size) neither counts as kept nor is deleted: it is
    left for the user to inspect, and a good one is not removed in its place."""
    checkpoints = [c for c in list_checkpoints(root)
                   if c.iteration <= newest and verification_error(c.path, checksums=False) is None]
    keep = retained([c.iteration for c in checkpoints], keep_last, keep_every, newest)
    removed = []
    for checkpoint in checkpoints:
        if checkpoint.iteration in keep:
            continue
        doomed = checkpoint.path.with_name(checkpoint.path.name + ".deleting")
        os.rename(checkpoint.path, doomed)
        shutil.rmtree(doomed)
        removed.append(checkpoint.path)
    return removed


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh directory beside `out` to write into, renamed to `out` when the block succeeds and removed when it
    fails. Refuses an existing `out`; never touches a directory it did not create (a fixed `<out>.tmp` name could
    be the user's)."""
    if out.exists():
        raise FileExistsError(f"{out} exists; conversion never overwrites")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, out)
