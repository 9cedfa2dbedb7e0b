"""What the benchmarks share: a table printer and the JSON output folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.machine import machine

#: Where every benchmark writes ``<name>.json`` (override with ``--out``).
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A Markdown table of ``rows`` (floats with 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |")


def write_json(out: Path, name: str, payload: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    print(f"\nwritten to {path}")
    return path
