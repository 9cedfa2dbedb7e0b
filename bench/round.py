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
10% of the round, and (10 CNN clients) seconds per round below the authors'
script's 6.7 s on the same machine.

References, from the same invocation, after the ``flwr run`` (side by side on
the same machine, so their ratio is what to compare on a shared host):

- ``sequential loop``: the same federation as a plain loop of our own in this
  process, without Flower (:func:`bench.sequential.sequential_loop`: same models,
  data, seeded initialisation, local SGD, evaluation and hypernetwork step, one
  client at a time on all cores, as the authors' script runs), ``--seq-rounds``
  rounds, the first dropped as warm-up; per model its training and evaluation
  seconds;
- ``FLOPs``: convolution and linear FLOPs of one round of the clients' compute
  (:func:`bench.sequential.round_flops`) against what this machine sustains on
  those convolutions (:func:`bench.sequential.conv_throughput`, one core's rate
  times the cores): ``floor_s = FLOPs / rate`` is the round's physical lower
  bound from the clients' compute alone (training FLOPs at the rate of the run's
  ``client-precision``, evaluation FLOPs at the float32 rate).

The last line printed is ``ratio R``, ``R`` = our ``flwr run`` round's seconds
over the sequential loop's (below 1: the simulation is faster than the plain
loop on the same cores).

    python -m bench.round [--rounds 10] [--clients 10] [--models cnn,...]
                          [--seq-rounds 3] [--data-dir DIR] [--workdir DIR]
                          [--out DIR] [key=value ...]

The paper's five models: ``--models cnn,vgg8,resnet10,resnet12,resnet18``;
50 clients: ``--clients 50`` (with ``--rounds 3``, one kept round; server step
included in its seconds). Extra ``key=value`` arguments override the run config
(e.g. ``hn-window=1``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .common import DEFAULT_OUT, print_table, write_json
from .sequential import app_config, conv_throughput, round_flops, sequential_loop
from .simulation import (
    CLIENT_RESOURCES,
    QUIET_LIMIT,
    MemorySampler,
    contention_note,
    cpu_between,
    cpu_rows,
    default_data_dir,
    idle_between,
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
    rows: list[dict[str, Any]], between, kept: list[int], cores: int, idle=None
) -> dict[str, Any]:
    """Per kept round, its CPU seconds by part (see the module docstring).

    ``between(start, end)`` gives ``{kind: CPU seconds}`` of the run's processes
    between two Unix times (:func:`bench.simulation.cpu_between`); a round's
    window runs from the previous record's ``finished_at`` to its own.
    ``idle(start, end)``, when given, the seconds the ClientApp actors slept
    waiting for a message (:func:`bench.simulation.idle_between`): a round's
    ``worker_idle_s`` (summed over the actors) and ``worker_idle_share`` (of the
    actors' seconds in the window).
    """
    rounds = []
    for previous, row in zip(rows, rows[1:], strict=False):
        if row["round"] not in kept or "finished_at" not in row:
            continue
        kinds = between(previous["finished_at"], row["finished_at"])
        total = sum(kinds.values())
        loops = float(row.get("client_cpu_seconds_sum", 0.0))
        actors, server = kinds.get(ACTORS, 0.0), kinds.get(SERVER, 0.0)
        asleep = idle(previous["finished_at"], row["finished_at"]) if idle else {}
        seen = asleep.get("seen_s", 0.0)
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
                **(
                    {
                        "worker_idle_s": asleep["idle_s"],
                        "worker_seen_s": seen,
                        "worker_idle_share": asleep["idle_s"] / seen if seen else 0,
                    }
                    if idle
                    else {}
                ),
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
        "worker_idle_share": (
            sum(r["worker_idle_s"] for r in rounds) / seen
            if (seen := sum(r.get("worker_seen_s", 0.0) for r in rounds))
            else None
        ),
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
    parser.add_argument("--models", help="run-config models (default: the app's, cnn)")
    parser.add_argument(
        "--seq-rounds",
        type=int,
        default=3,
        help="rounds of the sequential loop (first dropped; 0: no loop)",
    )
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
        **({"models": args.models} if args.models else {}),
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
        lambda a, b: idle_between(sampler.samples, sampler.times, a, b, ACTORS),
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
         "other_cpu_share", "cpu_bound_s", "worker_idle_s", "worker_idle_share"],
    )  # fmt: skip
    mean = result["mean"]
    cnn_default = config.get("models", "cnn") == "cnn" and args.clients == 10
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
        "worker_idle_share": cpu["worker_idle_share"],
        "authors_s": AUTHORS_SECONDS if cnn_default else None,
        "other<=10%": result["other_share"] <= OTHER_TARGET,
        "faster_than_authors": (
            mean["round_s"] < AUTHORS_SECONDS if cnn_default else None
        ),
    }
    print("\nMean over the kept rounds\n")
    print_table(
        [summary],
        ["rounds", "s_per_round", "server_s", "client_wall_s", "other_s",
         "other_share", "other_cpu_share", "clientapp_cpu_per_msg_s",
         "cpu_bound_s", "worker_idle_share", "authors_s", "other<=10%",
         "faster_than_authors"],
    )  # fmt: skip
    print("\nCPU seconds of the whole run by kind of process\n")
    print_table(cpu_rows(processes), ["kind", "cpu_s", "share"])
    print(f"\n{contention_note(processes)}")
    print(f"load average before {load_before}, after {load_after}")
    foreign = processes.get("cpu", {}).get("foreign_cpu_share")
    references = compare(config, args.clients, args.seq_rounds, mean["round_s"])
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
        **references,
    }
    write_json(args.out, "round", payload)
    if references.get("ratio") is not None:
        print(f"ratio {references['ratio']:.3f}")
    return payload


def compare(
    config: dict[str, Any], clients: int, seq_rounds: int, round_s: float
) -> dict[str, Any]:
    """The sequential loop and the FLOP floor next to the ``flwr run``'s mean
    round ``round_s`` (see the module docstring); prints their tables."""
    from common.config import load_run_config

    found: dict[str, Any] = {"ratio": None}
    rows = [{"what": "flwr run (ours)", "s_per_round": round_s}]
    if seq_rounds >= 2:
        print(f"\nSequential loop: {clients} clients, {seq_rounds} rounds\n")
        loop = sequential_loop(config, clients, seq_rounds)
        kept = loop["rounds"][1:]
        seq_s = sum(r["round_s"] for r in kept) / len(kept)
        found["sequential"] = loop
        found["ratio"] = round_s / seq_s
        rows.append(
            {
                "what": f"sequential loop ({loop['threads']} threads)",
                "s_per_round": seq_s,
                "server_s": sum(r["server_s"] for r in kept) / len(kept),
                "train_s": sum(r["train_s"] for r in kept) / len(kept),
                "eval_s": sum(r["eval_s"] for r in kept) / len(kept),
                "foreign_cpu": sum(r["foreign_cpu_share"] for r in kept) / len(kept),
            }
        )
        models = [
            {
                "model": name,
                "train_s": sum(m["train_s"][1:]) / len(kept),
                "eval_s": sum(m["eval_s"][1:]) / len(kept),
            }
            for name, m in loop["per_model"].items()
        ]
        print("\nSequential loop, seconds per round by model (all its clients)\n")
        print_table(models, ["model", "train_s", "eval_s"])
    flops = round_flops(config, clients)
    names = list(flops["per_model"])
    cores = os.cpu_count() or 1
    # Training runs in the run's client-precision, evaluation always in float32.
    precision = load_run_config(app_config() | config).client_precision
    one, every, rate = {}, {}, {}
    for p in dict.fromkeys(["fp32", precision]):
        one[p] = conv_throughput(names, threads=1, precision=p)
        every[p] = conv_throughput(names, threads=cores, precision=p)
        rate[p] = max(one[p]["gflops"] * cores, every[p]["gflops"]) * 1e9
    train = sum(v["train"] for v in flops["per_model"].values())
    floor = train / rate[precision] + (flops["total"] - train) / rate["fp32"]
    found["flops"] = flops | {
        "conv_gflops_one_core": one["fp32"]["gflops"],
        "conv_gflops_all_cores_one_process": every["fp32"]["gflops"],
        "rate_gflops": rate["fp32"] / 1e9,
        "train_precision": precision,
        "train_rate_gflops": rate[precision] / 1e9,
        "floor_s": floor,
    }
    rows.append({"what": "clients' compute at the conv rate (floor)",
                 "s_per_round": floor})  # fmt: skip
    by_model = ", ".join(
        f"{name} {(v['train'] + v['eval']) / 1e12:.3f}"
        for name, v in flops["per_model"].items()
    )
    rates = "; ".join(
        f"{p}: {one[p]['gflops']:.1f} GFLOP/s on one core (x {cores} = "
        f"{one[p]['gflops'] * cores:.1f}), {every[p]['gflops']:.1f} GFLOP/s on "
        f"{cores} threads in one process"
        for p in one
    )
    print(
        f"\nFLOPs of one round of the clients' compute: {flops['total'] / 1e12:.3f} "
        f"TFLOP ({by_model}); conv forward+backward sustained, {rates}; "
        f"floor {floor:.1f} s (training in {precision}, evaluation in fp32)"
    )
    for row in rows:
        row["x_floor"] = row["s_per_round"] / floor
    print(f"\nSeconds per round, {clients} clients ({config.get('models', 'cnn')})\n")
    print_table(
        rows,
        ["what", "s_per_round", "x_floor", "server_s", "train_s", "eval_s",
         "foreign_cpu"],
    )  # fmt: skip
    return found


if __name__ == "__main__":
    main()
