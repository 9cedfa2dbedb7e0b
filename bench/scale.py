"""How seconds per round and memory grow with the number of registered clients.

Setting: MH-pFedHN with CNN clients on the CIFAR-10 copy (pathological 2
classes: with 1000 clients each holds about 50 images, 37 to train, 13 to
test), ``fraction-train = 0.1``, ``--rounds`` rounds (default 3) and evaluation
of every client only after the last round (``eval-every`` larger than the
rounds), for 100 and 1000 simulated clients (``--clients``), each through a real
``flwr run`` on a private simulation SuperLink (1 CPU per ClientApp).

Per client count:

- ``setup_s``: from ``flwr run`` to the hypernetwork being built (SuperLink,
  simulation engine and Ray start, the handshake with every client), by the
  arrival of the server's log lines;
- ``s_per_round``: mean seconds of the train phase of rounds ``2 .. N`` (round 1
  is warm-up); rounds without evaluation are read from the server's
  ``round r/N | train loss | S s`` log lines, the last from ``train_seconds``;
- ``eval_all_s``: the final evaluation of every client (last row's
  ``round_seconds - train_seconds``), and ``last_server_s`` the server's compute
  in that last round (its training and the ``theta`` of every evaluation);
- memory of every process (:class:`bench.simulation.MemorySampler`, a reading
  every 2 s; with PSS one costs about 60 ms of CPU): per kind of process the
  peak of its summed RSS and PSS and the largest single-process peak
  (``VmHWM``), in total, and the machine's lowest
  ``MemAvailable``; the server's own ``server_peak_rss_mb`` (ServerApp process,
  from ``metrics.jsonl``) and ``server_rss_training``, the ServerApp process's
  peak RSS before the last round (handshake and training rounds, without the
  final evaluation of every client); CPU seconds per kind, and the share of the
  machine's CPU that other jobs used meanwhile (``other_jobs_cpu``: above 5% the
  seconds are inflated);
- the hypernetwork: parameters (from the server log) and what the clients'
  embeddings take (``sum(chunks) x embed-dim`` float32, from ``clients.json``;
  with Adam's two moments at most three times that).

The comparison row shows, from the smallest to the largest client count, the
growth of the server's peak RSS (whole run, and before the last round) next to
the growth of the embeddings (with Adam state) and of the server state alone
(``strategy_only``: :func:`strategy_memory`, the strategy built and stepped in a
fresh process without Flower): the claim to check is that server memory grows
with the number of clients only by their embeddings.

    python -m bench.scale [--clients 100 1000] [--rounds 3] [--data-dir DIR]
                          [--workdir DIR] [--out DIR] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUT, print_table, write_json
from .round import parse_overrides
from .simulation import (
    CLIENT_RESOURCES,
    MemorySampler,
    contention_note,
    default_data_dir,
    peak_rss_mb,
    round_logged_at,
    run_simulation,
    train_only_rounds,
)

SERVER = "flwr-simulation (ServerApp)"

_HN_LINE = re.compile(r"Hypernetwork: (\d+) clients, .* ([\d.]+) M parameters")


def round_seconds(
    lines: list[tuple[float, str]], rows: list[dict[str, Any]]
) -> dict[int, float]:
    """Train-phase seconds of every round: log lines for the rounds without
    evaluation, ``train_seconds`` of the ``metrics.jsonl`` rows for the others."""
    seconds = train_only_rounds(lines)
    for row in rows:
        if row.get("phase", "train") == "train" and "train_seconds" in row:
            seconds[int(row["round"])] = float(row["train_seconds"])
    return dict(sorted(seconds.items()))


def hypernetwork_facts(
    lines: list[tuple[float, str]], clients: list[dict[str, Any]], embed_dim: int
) -> dict[str, Any]:
    """Parameters (server log), embedding floats and MB (``clients.json``), and
    the second the hypernetwork was built (end of the setup)."""
    facts: dict[str, Any] = {"hn_params_m": None, "setup_s": None}
    for at, line in lines:
        match = _HN_LINE.search(line)
        if match:
            facts |= {"hn_params_m": float(match.group(2)), "setup_s": at}
            break
    floats = sum(int(c.get("chunks", 0)) for c in clients) * embed_dim
    return facts | {
        "embedding_floats": floats,
        "embedding_mb": floats * 4 / 2**20,
        "embedding_adam_mb": floats * 3 * 4 / 2**20,
    }


def strategy_memory(num_clients: int, rounds: int, fraction: float) -> dict:
    """RSS growth of the MH-pFedHN server state alone, in a fresh process.

    :class:`server_app.strategies.mh_pfedhn.MHPFedHN` with ``num_clients`` CNN
    clients registered (no Flower, no data), then ``rounds`` rounds of one
    hypernetwork step per sampled client (``fraction``), as a sequential round
    applies them. What it adds to the process is the hypernetwork, its
    embeddings and Adam's state, separated from Flower's simulation engine that
    shares the ``flwr-simulation`` process.
    """
    code = f"from bench.scale import _strategy_child; _strategy_child({num_clients}, "
    code += f"{rounds}, {fraction})"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _strategy_child(num_clients: int, rounds: int, fraction: float) -> None:
    import torch

    from common.config import load_run_config
    from server_app.engine.loop import Engine
    from server_app.engine.registry import ClientInfo, ClientRegistry
    from server_app.strategies.mh_pfedhn import MHPFedHN

    def rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    torch.set_num_threads(1)
    cfg = load_run_config({"data-dir": "/nonexistent", "fraction-train": fraction})
    strategy = MHPFedHN.from_config(cfg)
    before = rss_mb()
    clients = ClientRegistry(
        ClientInfo(name=f"client-{i}", node_id=i + 1, num_params=234006,
                   num_train=37, num_test=13, num_classes=10, in_channels=3)
        for i in range(num_clients)
    )  # fmt: skip
    engine = Engine(strategy, cfg)
    engine.clients = clients
    strategy.start(clients)
    for _ in range(rounds):
        for name in engine.sample_train_clients():
            delta = torch.from_numpy(strategy.theta(name) * 1e-3)
            strategy.hn_step([(name, delta, 1.0)])
    adam = sum(
        t.numel() * t.element_size()
        for state in strategy.optimizer.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    print(json.dumps({
        "clients": num_clients,
        "rss_growth_mb": rss_mb() - before,
        "params_m": sum(p.numel() for p in strategy.hn.parameters()) / 1e6,
        "adam_state_mb": adam / 2**20,
    }))  # fmt: skip


def measure(
    num_clients: int, args: argparse.Namespace, overrides: dict[str, Any]
) -> dict[str, Any]:
    """One run with ``num_clients`` clients: seconds, memory, hypernetwork."""
    config = {
        "data-dir": str(args.data_dir.resolve()),
        "models": "cnn",
        "fraction-train": args.fraction,
        "num-server-rounds": args.rounds,
        "eval-every": args.rounds + 1,
        "checkpoint-every": 0,
        **overrides,
    }
    print(f"\nflwr run: {num_clients} clients, {config}", flush=True)
    with MemorySampler(args.interval) as sampler:
        run = run_simulation(
            args.workdir / f"clients-{num_clients}",
            config,
            num_clients,
            args.timeout,
            CLIENT_RESOURCES,
        )
    run.check()
    rows = run.rows
    last = rows[-1]
    per_round = round_seconds(run.lines, rows)
    steady = [s for r, s in per_round.items() if r > 1] or list(per_round.values())
    embed_dim = int(last.get("embed_dim", overrides.get("embed-dim", 64)))
    memory = sampler.summary()
    before_last = round_logged_at(run.lines, args.rounds - 1)
    until = None if before_last is None else run.started_at + before_last
    result = {
        "clients": num_clients,
        "train_clients_per_round": last.get("train_clients"),
        "round_seconds": per_round,
        "s_per_round": sum(steady) / len(steady),
        "eval_all_s": float(last["round_seconds"]) - float(last["train_seconds"]),
        "last_server_s": float(last["server_seconds"]),
        "wall_s": run.wall_seconds,
        "server_rss_mb": last.get("server_rss_mb"),
        "server_peak_rss_mb": last.get("server_peak_rss_mb"),
        # the ServerApp process before the last round (and its evaluation)
        "server_rss_training_mb": peak_rss_mb(
            sampler.samples, sampler.times, SERVER, until
        )
        if until is not None
        else None,
        "memory": memory,
        **hypernetwork_facts(run.lines, run.clients, embed_dim),
        "train_examples": [c["num_train"] for c in run.clients],
        "run_dir": str(run.run_dir),
    }
    print(
        f"{num_clients} clients: {result['s_per_round']:.2f} s/round, "
        f"total peak RSS {memory['total_peak_rss_mb']:.0f} MB, "
        f"PSS {memory['total_peak_pss_mb']:.0f} MB",
        flush=True,
    )
    return result


def growth(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Smallest -> largest client count: server memory growth against embeddings."""
    if len(results) < 2:
        return None
    small, large = results[0], results[-1]
    training = [r.get("server_rss_training_mb") for r in (small, large)]
    alone = [r.get("strategy_only", {}).get("rss_growth_mb") for r in (small, large)]
    return {
        "clients": f"{small['clients']} -> {large['clients']}",
        "server_peak_rss_mb": large["server_peak_rss_mb"] - small["server_peak_rss_mb"],
        "server_rss_training_mb": training[1] - training[0]
        if None not in training
        else None,
        "strategy_only_mb": alone[1] - alone[0] if None not in alone else None,
        "embedding_mb": large["embedding_mb"] - small["embedding_mb"],
        "embedding_adam_mb": large["embedding_adam_mb"] - small["embedding_adam_mb"],
        "s_per_round_ratio": large["s_per_round"] / small["s_per_round"],
        "total_peak_pss_mb": large["memory"]["total_peak_pss_mb"]
        - small["memory"]["total_peak_pss_mb"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--interval", type=float, default=2.0,
                        help="seconds between memory readings")  # fmt: skip
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument(
        "--workdir", type=Path, help="SuperLink homes, results (default: a temp dir)"
    )
    parser.add_argument("--timeout", type=float, default=7200.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    overrides = parse_overrides(args.overrides)
    load_before = os.getloadavg()
    results = [measure(n, args, overrides) for n in sorted(args.clients)]
    for r in results:
        r["strategy_only"] = strategy_memory(r["clients"], args.rounds, args.fraction)
    load_after = os.getloadavg()

    print("\nSeconds and memory by client count (MB; rounds 2..N, round 1 warm-up)\n")
    table = [
        {
            "clients": r["clients"],
            "train/round": r["train_clients_per_round"],
            "setup_s": r["setup_s"],
            "s_per_round": r["s_per_round"],
            "eval_all_s": r["eval_all_s"],
            "last_server_s": r["last_server_s"],
            "server_rss_training": r["server_rss_training_mb"],
            "server_peak_rss": r["server_peak_rss_mb"],
            "total_peak_rss": r["memory"]["total_peak_rss_mb"],
            "total_peak_pss": r["memory"]["total_peak_pss_mb"],
            "min_available": r["memory"]["min_mem_available_mb"],
            "hn_params_M": r["hn_params_m"],
            "embeddings": r["embedding_mb"],
            "other_jobs_cpu": r["memory"].get("cpu", {}).get("foreign_cpu_share"),
        }
        for r in results
    ]
    print_table(table, list(table[0]))
    for r in results:
        print(f"\nPeak memory per kind of process, {r['clients']} clients (MB)\n")
        kinds = [{"kind": k} | v for k, v in r["memory"]["kinds"].items()]
        print_table(
            kinds,
            ["kind", "processes", "pids_seen", "peak_rss_mb", "peak_pss_mb",
             "peak_hwm_mb", "sum_hwm_mb", "cpu_s"],
        )  # fmt: skip
        print(f"\n{contention_note(r['memory'])}")
    change = growth(results)
    if change:
        print("\nGrowth, smallest to largest client count (MB)\n")
        print_table([change], list(change))
    print(f"\nload average before {load_before}, after {load_after}")
    payload = {
        "setting": {
            "fraction_train": args.fraction,
            "rounds": args.rounds,
            "overrides": overrides,
        },
        "table": table,
        "results": results,
        "growth": change,
        "load_average": {"before": load_before, "after": load_after},
    }
    write_json(args.out, "scale", payload)
    return payload


if __name__ == "__main__":
    main()
