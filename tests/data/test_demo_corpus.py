import inspect
import json

from pydoc_data.topics import topics

from umtrain.data.demo_corpus import SOURCES


def _records(path):
    """JSON Lines split on newlines only (str.splitlines would also split on U+2028 inside the texts)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


def test_one_jsonl_file_per_source(demo_corpus):
    assert [p.name for p in demo_corpus] == [f"{s}.jsonl" for s in SOURCES]
    assert len(SOURCES) >= 3
    for path in demo_corpus:
        records = _records(path)
        assert len(records) > 50
        assert all(isinstance(r["text"], str) and r["text"] for r in records)
        assert len({r["id"] for r in records}) == len(records)
    total_bytes = sum(p.stat().st_size for p in demo_corpus)
    assert 1_000_000 < total_bytes < 10_000_000


def test_pydoc_topics_are_the_reference_topics(demo_corpus):
    records = _records(demo_corpus[SOURCES.index("pydoc_topics")])
    assert [r["text"] for r in records] == [topics[name].strip() for name in sorted(topics)]


def test_docstrings_match_the_imported_objects(demo_corpus):
    """The sources are read with `ast`; importing the module must give the same docstrings."""
    modules = {r["id"]: r["text"] for r in _records(demo_corpus[SOURCES.index("module_docs")])}
    assert modules["module:json"] == f"Module json\n\n{inspect.getdoc(json)}"
    api = {r["id"]: r["text"] for r in _records(demo_corpus[SOURCES.index("api_docs")])}
    assert api["api:json.dumps"].startswith("def json.dumps(obj, *, skipkeys=False,")
    assert api["api:json.dumps"].endswith("\n\n" + inspect.getdoc(json.dumps))
    assert f"def json.encoder.JSONEncoder.encode(self, o)\n\n{inspect.getdoc(json.JSONEncoder.encode)}" \
        in api["api:json.encoder.JSONEncoder"]
    assert not any(key.startswith("api:_") or "._" in key for key in api)
