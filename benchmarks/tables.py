"""What every benchmark script does with its result: print the Markdown table and write it, with the
raw rows as JSON beside it (same name, `.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_table(lines: list[str], rows: list[dict[str, Any]], out: str | Path) -> None:
    """Print the table `lines` and write them to `out` (Markdown) and `rows` to `out` with `.json`."""
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
