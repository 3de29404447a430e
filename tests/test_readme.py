"""The README and docs/ stay true: their marked examples run, and the configuration table lists every field."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- readme-test -->"


def _marked_examples() -> list[tuple[str, str]]:
    """(where, code) of every block marked with MARKER in the README and the docs pages."""
    found = []
    for page in PAGES:
        for i, code in enumerate(re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", page.read_text(), flags=re.S)):
            found.append((f"{page.relative_to(ROOT)} example {i}", code))
    return found


def test_readme_has_marked_examples():
    assert _marked_examples(), "mark runnable README examples with " + MARKER


@pytest.mark.parametrize("where,code", _marked_examples(), ids=[w for w, _ in _marked_examples()])
def test_readme_example_runs(where, code, capsys):
    exec(compile(code, where, "exec"), {"__name__": "__readme__"})


def _config_table(module: str, name: str) -> str:
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "tools" / "config_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.config_table(getattr(importlib.import_module(module), name))


def test_config_table_is_current():
    # Regenerate with: python tools/config_table.py  (the table is written from the dataclass comments)
    assert _config_table("sparsemoe.config", "MoEConfig") in (ROOT / "docs" / "layer.md").read_text()
