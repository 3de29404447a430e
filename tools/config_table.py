"""Print the configuration table of docs/layer.md, generated from the comments in a config dataclass.

    python tools/config_table.py                      # MoEConfig
    python tools/config_table.py sparsemoe.model.config ModelConfig
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys


def config_table(cls) -> str:
    lines = inspect.getsource(cls).splitlines()
    rows = ["| field | default | meaning and valid range |", "|---|---|---|"]
    for field in dataclasses.fields(cls):
        for i, line in enumerate(lines):
            match = re.match(r"\s+" + field.name + r": [^=#]+(?:= (.*?))?\s+# (.*)$", line)
            if not match:
                continue
            comment = match.group(2)
            for follow in lines[i + 1 :]:  # continuation comments are indented past the '#'
                if not re.match(r"\s+#\s{2,}", follow):
                    break
                comment += " " + follow.strip().lstrip("#").strip()
            default = match.group(1) or "required"
            rows.append(f"| `{field.name}` | `{default}` | {comment.replace('|', chr(92) + '|')} |")
            break
        else:
            raise SystemExit(f"{cls.__name__}.{field.name} has no comment")
    return "\n".join(rows)


if __name__ == "__main__":
    module, name = (sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else ("sparsemoe.config", "MoEConfig")
    print(config_table(getattr(importlib.import_module(module), name)))
