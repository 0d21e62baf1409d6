"""The checkpoint directory: atomic publish, `latest`, verification, fallback, retention (no training needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.checkpoint.helpers import REPO
from tests.distributed import tiny_config
from umtrain.checkpoint import manager
from umtrain.cli.main import main
from umtrain.parallel.comm import free_port


def fake_save(root, iteration: int, payload: bytes = b"weights") -> None:
    """What a save leaves: files in the temporary directory, then publish."""
    tmp = manager.prepare_temporary(root, iteration)
    (tmp / "__0_0.distcp").write_bytes(payload * iteration)
    (tmp / "common.pt").write_bytes(b"common")
    manager.publish(tmp, iteration)


def test_publish_renames_atomically_and_points_latest(tmp_path):
    fake_save(tmp_path, 10)
    assert (tmp_path / "iter_0000010").is_dir() and not (tmp_path / "iter_0000010.tmp").exists()
    assert manager.read_latest(tmp_path) == tmp_path / "iter_0000010"
    assert manager.verification_error(tmp_path / "iter_0000010") is None
    assert manager.bytes_of(tmp_path / "iter_0000010") == 7 * 10 + 6


def test_unpublished_and_corrupt_checkpoints_are_skipped(tmp_path):
    for iteration in (10, 20, 30):
        fake_save(tmp_path, iteration)
    (tmp_path / "iter_0000030" / "__0_0.distcp").write_bytes(b"x" * 210)        # same size, other bytes
    truncated = tmp_path / "iter_0000020" / "__0_0.distcp"
    truncated.write_bytes(truncated.read_bytes()[:5])
    half_written = manager.prepare_temporary(tmp_path, 40)
    (half_written / "__0_0.distcp").write_bytes(b"partial")

    checkpoint, warnings = manager.resolve_resume(tmp_path)
    assert checkpoint.iteration == 10
    assert "CRC-32" in warnings[0] and "iter_0000030" in warnings[0]
    assert "5 bytes" in warnings[1]
    with pytest.raises(manager.CheckpointError, match="CRC-32"):
        manager.resolve_resume(tmp_path / "iter_0000030")


def test_latest_is_authoritative_and_missing_latest_falls_back_to_newest(tmp_path):
    for iteration in (10, 20):
        fake_save(tmp_path, iteration)
    manager.write_file_atomically(tmp_path / manager.LATEST, "iter_0000010\n")     # a user's rollback
    assert manager.resolve_resume(tmp_path)[0].iteration == 10
    (tmp_path / manager.LATEST).unlink()
    assert manager.resolve_resume(tmp_path)[0].iteration == 20
    assert manager.resolve_resume(tmp_path / "empty")[0] is None


def test_retention_keeps_last_k_every_mth_and_the_newest(tmp_path):
    assert manager.retained([100, 200, 300, 400, 500], keep_last=2, keep_every=200, newest=500) == {200, 400, 500}
    for iteration in (1, 2, 3, 4, 5, 6):
        fake_save(tmp_path, iteration)
    removed = manager.apply_retention(tmp_path, keep_last=2, keep_every=3, newest=6)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002", "iter_0000004"]
    assert [c.iteration for c in manager.list_checkpoints(tmp_path)] == [3, 5, 6]


def test_retention_neither_counts_nor_deletes_a_corrupt_checkpoint(tmp_path):
    """With keep_last 2 and iteration 3 truncated, 1 is removed, 2 stays as the second good one, 3 stays to be
    inspected (it used to count as kept, and the good 2 was deleted in its place)."""
    for iteration in (1, 2, 3, 4):
        fake_save(tmp_path, iteration)
    (tmp_path / "iter_0000003" / "__0_0.distcp").write_bytes(b"x")
    removed = manager.apply_retention(tmp_path, keep_last=2, keep_every=0, newest=4)
    assert [p.name for p in removed] == ["iter_0000001"]
    assert [c.iteration for c in manager.list_checkpoints(tmp_path)] == [2, 3, 4]


def test_existing_checkpoint_is_set_aside_not_overwritten(tmp_path):
    fake_save(tmp_path, 10, b"old")
    kept = manager.set_aside(tmp_path / "iter_0000010")
    fake_save(tmp_path, 10, b"new")
    assert (kept / "__0_0.distcp").read_bytes() == b"old" * 10
    assert manager.list_checkpoints(tmp_path) == [manager.Checkpoint(10, tmp_path / "iter_0000010")]


def test_staged_output_never_touches_a_directory_it_did_not_create(tmp_path):
    """A conversion used to clear `<out>.tmp` before writing there: the user's own directory of that name went."""
    users = tmp_path / "model.tmp"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    out = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with manager.staged_output(out) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("conversion failed")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model.tmp"]
    with manager.staged_output(out) as tmp:
        (tmp / "weights.bin").write_text("w")
    assert (out / "weights.bin").read_text() == "w" and (users / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):
        with manager.staged_output(out):
            pass


HOLD_LOCK = """
import sys, time
from pathlib import Path
from umtrain.checkpoint import manager
manager.claim(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def other_run(tmp_path):
    """`other_run(root)`: another live process that has claimed `root`; killed (SIGKILL) in teardown."""
    holders: list[subprocess.Popen] = []

    def start(root):
        holders.append(subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root)], stdout=subprocess.PIPE,
                                        text=True, cwd=REPO))
        assert holders[-1].stdout.readline().strip() == "held"
        return holders[-1]

    yield start
    for holder in holders:
        holder.kill()
        holder.wait()


def test_a_directory_another_live_run_saves_into_is_refused_until_it_dies(tmp_path, other_run):
    holder = other_run(tmp_path / "run")
    with pytest.raises(manager.DirectoryInUse, match=f"pid {holder.pid} on"):
        manager.claim(tmp_path / "run")
    holder.kill()                                 # a killed run leaves no stale lock behind
    holder.wait()
    manager.claim(tmp_path / "run")
    manager.claim(tmp_path / "run")               # this process holds it: claiming again is a no-op
    manager.release(tmp_path / "run")
    other_run(tmp_path / "run")                   # released: another process can claim it


def test_train_refuses_a_save_directory_in_use_and_touches_nothing(tmp_path, other_run, monkeypatch, capsys):
    """Two runs saving into one directory removed each other's saves in progress as stale."""
    save = tmp_path / "run"
    other_run(save)
    in_progress = manager.prepare_temporary(save, 5)
    (in_progress / "__0_0.distcp").write_bytes(b"being written")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(checkpoint={"save": str(save), "save_interval": 1},
                                               training={"train_iters": 1})))
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.save" in err and "is in use by another run (pid" in err
    assert (in_progress / "__0_0.distcp").read_bytes() == b"being written"
    assert sorted(p.name for p in save.iterdir()) == [".lock", "iter_0000005.tmp"]


def test_a_lock_file_this_user_cannot_write_is_still_locked(tmp_path, monkeypatch):
    """Another user's lock file left in a shared directory: opened read-only, which `flock` is content with."""
    manager.claim(tmp_path / "run")
    manager.release(tmp_path / "run")
    real_open = manager.os.open

    def no_write_access(path, flags, *args):
        if flags & manager.os.O_RDWR:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(manager.os, "open", no_write_access)
    manager.claim(tmp_path / "run")
    monkeypatch.undo()
    holder = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")], cwd=REPO, timeout=120,
                            capture_output=True, text=True)
    assert "DirectoryInUse" in holder.stderr
    manager.release(tmp_path / "run")
