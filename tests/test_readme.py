"""The README stays true: its marked examples run, and its configuration table lists every field."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from sparsemoe import MoEConfig

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


def test_config_table_lists_every_field_with_its_default():
    text = README.read_text()
    for field in dataclasses.fields(MoEConfig):
        default = "required" if field.default is dataclasses.MISSING else None
        row = re.search(r"^\| `" + field.name + r"` \| `([^`]*)` \|", text, flags=re.M)
        assert row, f"README configuration table misses MoEConfig.{field.name}"
        if default:
            assert row.group(1) == default
        else:
            assert eval(row.group(1)) == field.default, field.name
