"""The README stays true: its marked examples run, and its configuration table lists every field."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MARKER = "<!-- readme-test -->"


def _marked_examples() -> list[str]:
    text = README.read_text()
    return re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, flags=re.S)


def test_readme_has_marked_examples():
    assert _marked_examples(), "mark runnable README examples with " + MARKER


@pytest.mark.parametrize("index", range(len(_marked_examples())))
def test_readme_example_runs(index, capsys):
    code = _marked_examples()[index]
    exec(compile(code, f"README example {index}", "exec"), {"__name__": "__readme__"})


def _config_table(module: str, name: str) -> str:
    spec = importlib.util.spec_from_file_location("config_table", README.parent / "tools" / "config_table.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.config_table(getattr(importlib.import_module(module), name))


def test_config_table_is_current():
    # Regenerate with: python tools/config_table.py  (the table is written from the dataclass comments)
    assert _config_table("sparsemoe.config", "MoEConfig") in README.read_text()
