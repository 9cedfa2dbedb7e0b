"""Run one setting through `flwr run` on a private SuperLink and print its curve.

Usage: python scripts/parity.py OUT_DIR NUM_CLIENTS key=value ...
(used for the parity measurements in the closing notes; tests use the same harness,
`tools.superlink`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.superlink import SimulationSuperLink  # noqa: E402


def main() -> None:
    out, num = Path(sys.argv[1]).absolute(), int(sys.argv[2])
    overrides = {}
    for item in sys.argv[3:]:
        key, value = item.split("=", 1)
        try:  # numbers, booleans, lists; anything else is a string
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    out.mkdir(parents=True, exist_ok=True)
    link = SimulationSuperLink(out).start()
    try:
        start = time.time()
        proc = link.run(
            {"results-dir": str(out / "results"), **overrides},
            num,
            timeout=float(os.environ.get("PARITY_TIMEOUT", 7200)),
        )
        print(f"flwr run exit {proc.returncode} after {time.time() - start:.0f} s")
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    finally:
        link.stop()
    for metrics in (out / "results").glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            print(
                f"round {r['round']:3d} acc {r['accuracy']:.4f} "
                f"round_s {r['round_seconds']:.2f} server_s {r['server_seconds']:.2f}"
            )
        print((metrics.parent / "summary.json").read_text())


if __name__ == "__main__":
    main()
