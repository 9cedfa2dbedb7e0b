"""How much of a hypernetwork run's accuracy do stale BatchNorm statistics cost?

Usage: python scripts/bn_recalibration.py RUN_DIR [--data-dir DIR]

RUN_DIR is a finished `mh-pfedhn` or `mh-pfedhngd` run (its `config.json`,
`metrics.jsonl` and `hypernet.pt`). The run's last evaluation tested every client's
generated `theta` with the BatchNorm statistics the client kept from its own last
training (PAPER.md: they are not generated). This script regenerates the same
`theta` from the saved hypernetwork, recalibrates the statistics on the client's
train split (`client_app.training.recalibrate_batchnorm`, what run-config
`bn-eval = "recalibrate"` does at every evaluation) and prints, per client and in
total (correct / samples over all clients), both accuracies. Models without
BatchNorm (`cnn`) score the same both ways, which checks the regeneration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from client_app.local import assign_model  # noqa: E402
from client_app.training import evaluate_local, recalibrate_batchnorm  # noqa: E402
from common.config import MH_STRATEGIES, load_run_config  # noqa: E402
from common.data import client_data_for  # noqa: E402
from common.flat import load_flat_  # noqa: E402
from common.models import build_model  # noqa: E402
from server_app.hypernet import HyperNetwork  # noqa: E402
from server_app.strategies.mh_pfedhn import HYPERNET_FILE  # noqa: E402


def last_evaluation(run: Path) -> dict:
    """The last `metrics.jsonl` line that carries per-client accuracies."""
    rows = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    rows = [r for r in rows if r.get("client_accuracy")]
    if not rows:
        raise SystemExit(f"{run}/metrics.jsonl has no evaluated round")
    return rows[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir", help="default: the run's data-dir")
    args = parser.parse_args()
    raw = json.loads((args.run / "config.json").read_text())
    cfg = load_run_config(raw)
    if cfg.strategy not in MH_STRATEGIES:
        raise SystemExit(f"{args.run}: strategy {cfg.strategy!r} has no hypernetwork")
    saved = torch.load(args.run / HYPERNET_FILE, map_location="cpu", weights_only=True)
    hn = HyperNetwork.from_config(cfg)
    for name, num_params in saved["num_params"].items():
        hn.add_client(name, num_params)
    hn.load_state_dict(saved["state"])
    clients = json.loads((args.run / "clients.json").read_text())
    evaluation = last_evaluation(args.run)
    num = len(clients)
    print(f"{args.run.name}: round {evaluation['round']}, {num} clients")
    print("| client | model | stored BN | recalibrated BN |\n|---|---|---|---|")
    totals = {"stored": 0.0, "recalibrated": 0, "n": 0}
    for pid in range(num):
        name = f"client-{pid}"
        data = client_data_for(cfg, pid, num, args.data_dir)
        model_name = assign_model(pid, num, cfg.model_list)
        model = build_model(model_name, data.num_classes, data.in_channels)
        load_flat_(model, hn.generate(name))
        recalibrate_batchnorm(model, data.train_x)
        _, correct, n = evaluate_local(model, data.test_x, data.test_y)
        stored = evaluation["client_accuracy"][name]
        totals["stored"] += stored * n
        totals["recalibrated"] += correct
        totals["n"] += n
        print(
            f"| {name} | {model_name} | {100 * stored:.1f} | {100 * correct / n:.1f} |"
        )
    n = totals["n"]
    print(
        f"| all | | {100 * totals['stored'] / n:.2f} "
        f"| {100 * totals['recalibrated'] / n:.2f} |"
    )


if __name__ == "__main__":
    main()
