"""The config reference stays complete: every field of the schema has a docstring and a place in README's table."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path
from typing import get_args, get_type_hints

from umtrain.config import schema

README = Path(__file__).resolve().parents[2] / "README.md"


def schema_keys(cls=schema.Config, prefix: str = "") -> dict[str, set[str]]:
    """Section ('' for the top level, 'model.memory', ...) -> its leaf field names, walking nested sections."""
    sections = {prefix: set()}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        nested = [t for t in (get_args(hints[f.name]) or (hints[f.name],)) if dataclasses.is_dataclass(t)]
        if nested:
            sections.update(schema_keys(nested[0], f"{prefix}.{f.name}" if prefix else f.name))
        else:
            sections[prefix].add(f.name)
    return sections


def readme_reference() -> dict[str, set[str]]:
    """Section -> the backticked key names of its row in README's '## Configuration' table (row 'top level': '')."""
    text = README.read_text()
    section = text[text.index("## Configuration"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 2 or cells[0] in ("section", "---"):
            continue
        name = "" if cells[0] == "top level" else cells[0].strip("`")
        rows[name] = set(re.findall(r"`([a-z_0-9]+)`", cells[1]))
    return rows


def test_every_schema_field_has_a_docstring():
    missing = []
    for cls in (c for _, c in inspect.getmembers(schema, inspect.isclass) if dataclasses.is_dataclass(c)):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                              and isinstance(following.value.value, str))
                if not documented:
                    missing.append(f"{cls.__name__}.{node.target.id}")
    assert not missing, f"fields without a docstring: {missing}"


def test_every_schema_key_is_in_the_readme_reference():
    reference = readme_reference()
    missing = [f"{section}.{name}" if section else name
               for section, names in schema_keys().items() for name in sorted(names - reference.get(section, set()))]
    assert not missing, f"keys missing from README's config reference: {missing}"

