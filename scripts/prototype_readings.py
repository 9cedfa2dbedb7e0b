"""What does classifying by the nearest global prototype cost a prototype run?

Usage: python scripts/prototype_readings.py RUN_DIR [--data-dir DIR]

RUN_DIR is a finished `fedproto` or `fedtgp` run with its client state (its
`config.json`, `metrics.jsonl`, `checkpoint.pt` and `client-state/`, as
`make compare` writes them). Both methods score a client by the nearest global
prototype, `argmax_c -||f(x) - p_c||^2` over every class that has one, not only
the client's own classes. This script rebuilds every client's personal model from
its saved state, receives the global prototypes of the run's last checkpoint
through the client's own evaluation path, and prints per model (correct / samples
over the clients running it):

- `prototype`: the method's reading (the same figure as the run's last
  evaluation, which checks the rebuild);
- `own head`: the same features through the model's own classifier;
- `outside own classes`: the share of the prototype reading's predictions that
  name a class absent from the client's train split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

import torch
from flwr.app import Context, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The script's folder is on sys.path when Python runs it.
from bn_recalibration import last_evaluation  # noqa: E402

from client_app.local import LocalClient  # noqa: E402
from client_app.persist import load_state  # noqa: E402
from client_app.trainers import build_trainer  # noqa: E402
from client_app.training import evaluate_local  # noqa: E402
from common.config import load_run_config  # noqa: E402
from server_app.checkpoint import read_checkpoint, unpack  # noqa: E402
from server_app.strategies.prototypes import prototypes_payload  # noqa: E402

STRATEGIES = ("fedproto", "fedtgp")


def fail(message: str) -> NoReturn:
    raise SystemExit(f"prototype_readings: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir", help="default: the run's data-dir")
    args = parser.parse_args()
    run: Path = args.run
    cfg = load_run_config(json.loads((run / "config.json").read_text()))
    if cfg.strategy not in STRATEGIES:
        fail(f"{run}: strategy {cfg.strategy!r}; one of {', '.join(STRATEGIES)}")
    states = run / "client-state"
    if not states.is_dir():
        fail(f"{run} has no client-state/ (run-config client-state-dir keeps it)")
    checkpoint = read_checkpoint(run / "checkpoint.pt")
    last = last_evaluation(run)["round"]
    if checkpoint["round"] != last:
        fail(
            f"{run}: checkpoint of round {checkpoint['round']}, last evaluation "
            f"round {last}: only a finished run pairs the two"
        )
    saved = checkpoint["state"]
    content = prototypes_payload(
        unpack(saved["global_protos"], None), unpack(saved["present"], None)
    )
    clients = json.loads((run / "clients.json").read_text())
    num = len(clients)
    data_dir = args.data_dir or cfg.data_dir
    totals: dict[str, list[int]] = {}
    for pid in range(num):
        name = f"client-{pid}"
        header, records = load_state(states / f"{name}.npz")
        if header["round"] != last:
            fail(f"{states / name}.npz holds round {header['round']}, not {last}")
        context = Context(
            run_id=0,
            node_id=0,
            node_config={
                "partition-id": pid,
                "num-partitions": num,
                "data-dir": str(data_dir),
            },
            state=RecordDict(records),
            run_config={},
        )
        client = LocalClient.from_context(context, cfg)
        trainer = build_trainer(cfg.strategy, client, context.state)
        logits_fn = trainer.logits_fn(content)
        x, y = client.test_tensors()
        _, by_head, n = evaluate_local(client.model, x, y)  # also: eval mode
        with torch.no_grad():
            predicted = logits_fn(client.model, x).argmax(dim=1)
        by_proto = int((predicted == y).sum())
        own = torch.unique(client.data.train_y).to(predicted.device)
        outside = int((~torch.isin(predicted, own)).sum())
        row = totals.setdefault(client.model_name, [0, 0, 0, 0])
        for i, value in enumerate((by_proto, by_head, outside, n)):
            row[i] += value
    print(f"{run.name}: round {last}, {num} clients")
    print("| model | prototype | own head | outside own classes |\n|---|---|---|---|")
    for model_name, (proto, head, outside, n) in totals.items():
        print(
            f"| {model_name} | {100 * proto / n:.2f} | {100 * head / n:.2f} "
            f"| {100 * outside / n:.1f} |"
        )
    proto, head, outside, n = (sum(r[i] for r in totals.values()) for i in range(4))
    print(
        f"| all | {100 * proto / n:.2f} | {100 * head / n:.2f} "
        f"| {100 * outside / n:.1f} |"
    )


if __name__ == "__main__":
    main()
