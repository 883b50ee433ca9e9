"""The configuration table of README.md, built from the schema's field docstrings.

Python keeps no docstrings of dataclass fields at run time, so they are read from the source with `ast`.
`python tools/config_table.py` prints the table; a test keeps README.md's copy identical to it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from typing import Any

from liteppo_mcore.config import schema
from liteppo_mcore.config.validate import fmt


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its one-line docstring} for a schema dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def _default(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Any = f.default_factory  # MISSING or a callable; every field without a default has one
    return factory()


def config_rows(cls: type = schema.LitePPOConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, meaning) for every leaf key, root keys first, then each section."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    leaves, sections = [], []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            sections.append(config_rows(hints[f.name], prefix + f.name + "."))
        else:
            value = _default(f)
            shown = "`[]`" if value == [] else f"`{fmt(value)}`"
            leaves.append((prefix + f.name, shown, docs.get(f.name, "")))
    return leaves + [row for rows in sections for row in rows]


def config_table() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {default} | {doc} |" for key, default, doc in config_rows()]
    return "\n".join(lines)
