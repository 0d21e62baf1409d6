"""The fused extension's build: one per CPU, source path and source contents; a lock a killed build left."""

from __future__ import annotations

import subprocess
import sys

import umtrain.ops.fused_lookup_reduce as fused


def test_each_checkout_and_version_of_the_source_gets_its_own_build(tmp_path, monkeypatch):
    source = fused.SOURCE.read_text()
    tags = []
    for checkout, text in (("a", source), ("b", source), ("a", source + "\n// changed\n")):
        copy = tmp_path / checkout / "lookup_reduce.cpp"
        copy.parent.mkdir(exist_ok=True)
        copy.write_text(text)
        monkeypatch.setattr(fused, "SOURCE", copy)
        tags.append(fused._build_tag())
    assert len(set(tags)) == 3
    monkeypatch.setattr(fused, "SOURCE", tmp_path / "a" / "lookup_reduce.cpp")
    assert fused._build_tag() == tags[2]


def test_a_lock_left_by_a_killed_build_is_removed_under_the_os_lock(tmp_path):
    (tmp_path / "lock").touch()                       # torch's lock file, its builder gone
    with fused.exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_second_builder_waits_for_the_first(tmp_path):
    """The holder keeps the lock until this test is about to ask for it, and marks its release just before it lets
    go: a waiter that got in while the holder still held the lock would find no mark."""
    script = ("import sys, time; from pathlib import Path; import umtrain.ops.fused_lookup_reduce as f\n"
              "build = Path(sys.argv[1])\n"
              "with f.exclusive_build(build):\n"
              "    print('inside', flush=True)\n"
              "    while not (build / 'waiter_asks').exists(): time.sleep(0.01)\n"
              "    time.sleep(0.5)\n"
              "    (build / 'holder_releases').touch()\n")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "inside"
        (tmp_path / "lock").touch()                       # the holder's build in progress
        (tmp_path / "waiter_asks").touch()
        with fused.exclusive_build(tmp_path):
            assert (tmp_path / "holder_releases").exists()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.wait()
