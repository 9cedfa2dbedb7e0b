"""Where a round's seconds go: client compute, server compute and everything else.

Setting: the default MH-pFedHN run (10 CNN clients on the CIFAR-10 copy,
pathological 2 classes, seed 42, ``hn-window = 2``, evaluation every round),
through a real ``flwr run`` on a private simulation SuperLink with
``simulation.toml``'s resources (1 CPU per client: ``P = cpus // 1`` ClientApps
run at once, 2 on our 2-core machines). ``--rounds`` rounds (default 10).

Per round, from the run's ``metrics.jsonl``:

- ``round``: ``round_seconds``, the server's wall-clock from the round's start
  until its record is complete (its train phase, the previous round's
  evaluation that rides on it, and after the last round the final evaluation);
- ``server``: ``server_seconds``, the server's own compute (generating the
  ``theta`` of every message, building messages, hypernetwork updates);
- ``client sum``: ``client_train_seconds_sum + client_eval_seconds_sum``, the
  seconds the clients report for their local training and evaluation loops,
  summed over every reply processed in the round's window;
- ``client wall = client sum / P``: the wall-clock that compute needs with the
  ``P`` workers always busy;
- ``other = round - server - client wall``: everything else, i.e. serialisation,
  Flower's message routing and polling, Ray scheduling and actor calls, and the
  ClientApp's own per-message work outside its loops (config parsing, client
  and model construction, loading ``theta``, computing the delta), plus any
  time a worker sits idle (waiting for the server's next message). Server
  compute that overlaps client compute in time (the server updates the
  hypernetwork with one reply while the other client of the window trains) is
  subtracted twice, which makes ``other`` smaller; with more busy processes
  than cores the clients' own seconds also include waiting for a core.
  ``other_per_message_s`` spreads ``other`` over the replies, in
  worker-seconds.

The split is a wall-clock one and only means something on an otherwise idle
machine: the benchmark also reads the machine's CPU time and reports what other
jobs used during the run (``quiet_machine`` in the JSON, a warning when above
5%). So it also splits each round's *CPU time*, which other jobs do not
inflate: every process of the run is read from ``/proc`` twice a second
(:class:`bench.simulation.MemorySampler`, without PSS: about 1% of a core),
and between the ``finished_at`` times
of consecutive records

- ``total``: CPU seconds of all the run's processes;
- ``loops``: ``client_cpu_seconds_sum``, the CPU time the clients report for
  their training and evaluation loops;
- ``clientapp``: the ClientApp actors' CPU beyond their loops (per-message
  setup, (de)serialisation, Ray's worker side);
- ``server process``: ``flwr-simulation``'s CPU: the server's compute, and the
  simulation engine that runs in the same process;
- ``flower/ray``: SuperLink, SuperExec, Ray's ``raylet``, ``gcs_server`` and
  agents, the ``flwr run`` CLI;
- ``other_cpu_share = (total - loops - server process) / total``: like
  ``other`` above but in CPU time. Counting the engine with the server makes
  it a lower bound of the overhead's share (``server_seconds`` is shown next
  to the server process's CPU for that reason);
- ``cpu_bound_s = total / cores``: the round's wall-clock if all its CPU work
  were spread evenly over the machine's cores, a lower bound of its seconds
  on this machine when idle.

Round 1 is discarded as warm-up (first ``torch`` steps in each worker, no
evaluation in its window) and so is the last round (it also holds the final
evaluation exchange, which a long run does once); the table shows every round
and the summary the mean over rounds ``2 .. N-1``. Targets: ``other`` at most
10% of the round, and seconds per round below the authors' script's 6.7 s on
the same machine.

    python -m bench.round [--rounds 10] [--clients 10] [--data-dir DIR]
                          [--workdir DIR] [--out DIR] [key=value ...]

Extra ``key=value`` arguments override the run config (e.g. ``hn-window=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUT, print_table, write_json
from .simulation import (
    CLIENT_RESOURCES,
    QUIET_LIMIT,
    MemorySampler,
    contention_note,
    cpu_between,
    cpu_rows,
    default_data_dir,
    parallel_workers,
    run_simulation,
)

#: The authors' script on the same setting, seconds per round (README).
AUTHORS_SECONDS = 6.7
#: Largest share of a round that is neither client nor server compute.
OTHER_TARGET = 0.10


def split_round(row: dict[str, Any], workers: int) -> dict[str, Any]:
    """One ``metrics.jsonl`` row -> seconds of server, client and other (above)."""
    if "client_train_seconds_sum" not in row:
        raise ValueError(
            f"round {row.get('round')} has no client_train_seconds_sum: the run "
            "was made by a server that does not record client compute"
        )
    round_s, server_s = float(row["round_seconds"]), float(row["server_seconds"])
    client_sum = float(row["client_train_seconds_sum"]) + float(
        row.get("client_eval_seconds_sum", 0.0)
    )
    client_wall = client_sum / workers
    other = round_s - server_s - client_wall
    return {
        "round": row["round"],
        "round_s": round_s,
        "server_s": server_s,
        "client_train_sum_s": float(row["client_train_seconds_sum"]),
        "client_eval_sum_s": float(row.get("client_eval_seconds_sum", 0.0)),
        "client_sum_s": client_sum,
        "client_wall_s": client_wall,
        "other_s": other,
        "other_share": other / round_s if round_s > 0 else float("nan"),
        "messages": int(row.get("client_messages", 0)),
    }


def summarise(
    rows: list[dict[str, Any]], workers: int, warmup: int = 1, drop_last: bool = True
) -> dict[str, Any]:
    """Split every row; mean seconds over the kept rounds (after ``warmup``
    rounds, without the last one when ``drop_last``) and ``other`` as a share of
    their summed round seconds."""
    split = [split_round(r, workers) for r in rows]
    last = max((s["round"] for s in split), default=0)
    kept = [
        s
        for s in split
        if s["round"] > warmup and not (drop_last and s["round"] == last)
    ]
    if not kept:
        raise ValueError(
            f"no round left after {warmup} warm-up round(s)"
            + (" and the last one" if drop_last else "")
            + f" of {len(split)}"
        )
    keys = ("round_s", "server_s", "client_sum_s", "client_wall_s", "other_s")
    mean = {k: sum(s[k] for s in kept) / len(kept) for k in keys}
    messages = sum(s["messages"] for s in kept)
    total_round = sum(s["round_s"] for s in kept)
    return {
        "rounds": split,
        "kept_rounds": [s["round"] for s in kept],
        "mean": mean,
        "other_share": sum(s["other_s"] for s in kept) / total_round,
        "server_share": sum(s["server_s"] for s in kept) / total_round,
        "client_share": sum(s["client_wall_s"] for s in kept) / total_round,
        #: ``other`` per client message, in worker-seconds (each of the P
        #: workers spends this much on a message outside the client's loops).
        "other_per_message_s": (
            sum(s["other_s"] for s in kept) * workers / messages if messages else None
        ),
        "workers": workers,
    }


#: Kinds of process (:func:`bench.simulation.process_kind`) of the CPU split.
ACTORS, SERVER = "ray ClientAppActor", "flwr-simulation (ServerApp)"


def cpu_split(
    rows: list[dict[str, Any]], between, kept: list[int], cores: int
) -> dict[str, Any]:
    """Per kept round, its CPU seconds by part (see the module docstring).

    ``between(start, end)`` gives ``{kind: CPU seconds}`` of the run's processes
    between two Unix times (:func:`bench.simulation.cpu_between`); a round's
    window runs from the previous record's ``finished_at`` to its own.
    """
    rounds = []
    for previous, row in zip(rows, rows[1:], strict=False):
        if row["round"] not in kept or "finished_at" not in row:
            continue
        kinds = between(previous["finished_at"], row["finished_at"])
        total = sum(kinds.values())
        loops = float(row.get("client_cpu_seconds_sum", 0.0))
        actors, server = kinds.get(ACTORS, 0.0), kinds.get(SERVER, 0.0)
        rounds.append(
            {
                "round": row["round"],
                "total_cpu_s": total,
                "loops_cpu_s": loops,
                "clientapp_cpu_s": actors - loops,
                "server_process_cpu_s": server,
                "server_s": float(row["server_seconds"]),
                "flower_ray_cpu_s": total - actors - server,
                "other_cpu_share": (total - loops - server) / total if total else 0,
                "cpu_bound_s": total / cores,
                "messages": int(row.get("client_messages", 0)),
            }
        )
    total = sum(r["total_cpu_s"] for r in rounds)
    other = sum(r["total_cpu_s"] - r["loops_cpu_s"] - r["server_process_cpu_s"]
                for r in rounds)  # fmt: skip
    clientapp = sum(r["clientapp_cpu_s"] for r in rounds)
    messages = sum(r["messages"] for r in rounds)
    return {
        "rounds": rounds,
        "other_cpu_share": other / total if total else None,
        "cpu_bound_s": total / cores / len(rounds) if rounds else None,
        "clientapp_cpu_per_message_s": clientapp / messages if messages else None,
    }


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` -> ``{key: value}``, values as JSON where they parse."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected key=value, got {item!r}")
        try:
            found[key] = json.loads(value)
        except json.JSONDecodeError:
            found[key] = value
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--client-cpus", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument(
        "--workdir", type=Path, help="SuperLink home, results (default: a temp dir)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("overrides", nargs="*", help="run-config key=value")
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (round 1 and the last are dropped)")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-round-"))
    config = {
        "data-dir": str(args.data_dir.resolve()),
        "num-server-rounds": args.rounds,
        "checkpoint-every": 0,
        **parse_overrides(args.overrides),
    }
    workers = parallel_workers(args.client_cpus)
    load_before = os.getloadavg()
    print(f"flwr run: {args.clients} clients, {config} (workdir {workdir})")
    with MemorySampler(interval=0.5, pss=False) as sampler:
        run = run_simulation(
            workdir,
            config,
            args.clients,
            args.timeout,
            CLIENT_RESOURCES | {"client-resources-num-cpus": args.client_cpus},
        )
    run.check()
    processes = sampler.summary()
    result = summarise(run.rows, workers)
    load_after = os.getloadavg()

    cpu = cpu_split(
        run.rows,
        lambda a, b: cpu_between(sampler.samples, sampler.times, a, b),
        result["kept_rounds"],
        os.cpu_count() or 1,
    )

    print(f"\nPer round (P = {workers} parallel ClientApps; seconds)\n")
    print_table(
        result["rounds"],
        ["round", "round_s", "server_s", "client_sum_s", "client_wall_s",
         "other_s", "other_share", "messages"],
    )  # fmt: skip
    print("\nCPU seconds per kept round (all cores; not inflated by other jobs)\n")
    print_table(
        cpu["rounds"],
        ["round", "total_cpu_s", "loops_cpu_s", "clientapp_cpu_s",
         "server_process_cpu_s", "server_s", "flower_ray_cpu_s",
         "other_cpu_share", "cpu_bound_s"],
    )  # fmt: skip
    mean = result["mean"]
    summary = {
        "rounds": f"{result['kept_rounds'][0]}-{result['kept_rounds'][-1]}",
        "s_per_round": mean["round_s"],
        "server_s": mean["server_s"],
        "client_wall_s": mean["client_wall_s"],
        "other_s": mean["other_s"],
        "other_share": result["other_share"],
        "other_cpu_share": cpu["other_cpu_share"],
        "clientapp_cpu_per_msg_s": cpu["clientapp_cpu_per_message_s"],
        "cpu_bound_s": cpu["cpu_bound_s"],
        "authors_s": AUTHORS_SECONDS,
        "other<=10%": result["other_share"] <= OTHER_TARGET,
        "faster_than_authors": mean["round_s"] < AUTHORS_SECONDS,
    }
    print("\nMean over the kept rounds\n")
    print_table(
        [summary],
        ["rounds", "s_per_round", "server_s", "client_wall_s", "other_s",
         "other_share", "other_cpu_share", "clientapp_cpu_per_msg_s",
         "cpu_bound_s", "authors_s", "other<=10%", "faster_than_authors"],
    )  # fmt: skip
    print("\nCPU seconds of the whole run by kind of process\n")
    print_table(cpu_rows(processes), ["kind", "cpu_s", "share"])
    print(f"\n{contention_note(processes)}")
    print(f"load average before {load_before}, after {load_after}")
    foreign = processes.get("cpu", {}).get("foreign_cpu_share")
    payload = {
        "setting": {"clients": args.clients, "run_config": config, "workers": workers},
        "summary": summary,
        "quiet_machine": foreign is not None and foreign <= QUIET_LIMIT,
        **result,
        "cpu_split": cpu,
        "processes": processes,
        "final_accuracy": run.rows[-1].get("accuracy"),
        "wall_seconds": run.wall_seconds,
        "load_average": {"before": load_before, "after": load_after},
        "run_dir": str(run.run_dir),
    }
    write_json(args.out, "round", payload)
    return payload


if __name__ == "__main__":
    main()
