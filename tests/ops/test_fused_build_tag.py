"""The fused extension's build name: one build per CPU, source path and source contents."""

from __future__ import annotations

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
