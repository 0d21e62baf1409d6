"""A small real-text corpus that any Python installation carries, for offline demos and tests.

Three sources, so a blend has something to blend:
- `pydoc_topics`: the language reference topics of `pydoc_data` (what `help("if")` prints), one per document;
- `module_docs`: the docstring of every public standard-library module, one per module;
- `api_docs`: signature and docstring of every public top-level function and class (with its methods), one per
  definition.
Docstrings are read with `ast` from the standard library's sources, never imported, so building has no side effects.
The output is deterministic for a given Python version.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Iterator

from pydoc_data.topics import topics

SOURCES = ("pydoc_topics", "module_docs", "api_docs")
SKIPPED_PACKAGES = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "ensurepip",
                    "encodings", "pydoc_data", "distutils"}
"""Tests, tools, installed packages, codec tables, the topics (their own source) and distutils (gone in 3.12)."""


def build_demo_corpus(out_dir: str) -> list[Path]:
    """Write `<source>.jsonl` for each of `SOURCES` into `out_dir` (one {"id", "text"} record a line)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = list(_parsed_stdlib_modules())
    documents = {
        "pydoc_topics": _pydoc_topics(),
        "module_docs": _module_docs(modules),
        "api_docs": _api_docs(modules),
    }
    paths = []
    for source in SOURCES:
        path = out / f"{source}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for doc_id, text in documents[source]:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        paths.append(path)
    return paths


def _pydoc_topics() -> Iterator[tuple[str, str]]:
    for name in sorted(topics):
        yield f"topic:{name}", topics[name].strip()


def _parsed_stdlib_modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, syntax tree) of each public pure-Python standard-library module, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if any(p in SKIPPED_PACKAGES or p.startswith("_") and p != "__init__" for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        yield ".".join(p for p in parts if p != "__init__"), tree


def _module_docs(modules: list[tuple[str, ast.Module]]) -> Iterator[tuple[str, str]]:
    for name, tree in modules:
        doc = ast.get_docstring(tree)
        if doc:
            yield f"module:{name}", f"Module {name}\n\n{doc}"


def _api_docs(modules: list[tuple[str, ast.Module]]) -> Iterator[tuple[str, str]]:
    for module, tree in modules:
        for node in tree.body:
            if not _is_public_definition(node):
                continue
            qualname = f"{module}.{node.name}"
            entries = [_describe(node, qualname)]
            if isinstance(node, ast.ClassDef):
                entries += [_describe(child, f"{qualname}.{child.name}") for child in node.body
                            if _is_public_definition(child)]
            entries = [entry for entry in entries if entry is not None]
            if entries:
                yield f"api:{qualname}", "\n\n".join(entries)


def _is_public_definition(node: ast.AST) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_")


def _describe(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, qualname: str) -> str | None:
    """'def name(args)' / 'class name(bases)' and the docstring, or None without a docstring."""
    doc = ast.get_docstring(node)
    if not doc:
        return None
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(base) for base in node.bases)
        header = f"class {qualname}({bases})" if bases else f"class {qualname}"
    else:
        header = f"def {qualname}({ast.unparse(node.args)})"
    return f"{header}\n\n{doc}"
