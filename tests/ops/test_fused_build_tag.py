"""The fused extension's build: one per CPU, source path and source contents; a lock a killed build left."""

from __future__ import annotations

import os
import time

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


def test_a_lock_left_by_a_killed_build_is_removed_and_a_live_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert not fused.remove_stale_build_lock(lock)
    lock.touch()
    assert not fused.remove_stale_build_lock(lock) and lock.exists()          # a build in progress
    old = time.time() - fused.STALE_BUILD_LOCK_S - 1
    os.utime(lock, (old, old))
    assert fused.remove_stale_build_lock(lock) and not lock.exists()
