"""Run a preset of strategies x seeds through `flwr run` and compare them.

Usage::

    python -m tools.compare conf/compare/quick-cifar10-5models.toml \\
        [--out DIR] [--data-dir DIR] [--only a,b] [--seeds 42,43] \\
        [--timeout SECONDS] [--table-only] [--dry-run]

Every run goes through the same engine as ``make run``: a real ``flwr run``
simulation, here on a private SuperLink (:mod:`tools.superlink`) started once for
the whole comparison and stopped (by PID) at the end. Runs whose
``summary.json`` already has the preset's number of rounds (and whose
``config.json`` agrees with the preset) are skipped, so re-running the same
command resumes a long comparison. An unfinished run with a checkpoint this
preset can continue resumes from it (``resume-from``; its clients restore their
state from ``<run>/client-state/``, see run-config ``client-state-dir``); one
without is started again, its old folder moved to ``<out>/attic/``. A failed
run is reported in the table and does not stop the others. The table and plot
(:mod:`tools.report`) are rebuilt after every run.

``--only`` runs just some of the preset's strategies (the table still shows them
all); ``--seeds`` replaces the preset's seeds (for both). Exit status: 0 when
every selected run finished, 1 when one did not, 2 for an invalid preset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

from common.config import load_run_config

from .machine import record_machine
from .preset import (
    CLIENT_STATE,
    Preset,
    PresetError,
    RunSpec,
    absolute,
    load_preset,
)
from .report import (
    FINISHED,
    RUNNING,
    inspect_run,
    log_path,
    run_dir,
    status_path,
    write_outputs,
)
from .superlink import APP, SimulationSuperLink

ROUND_LINE = re.compile(r"round \d+/\d+ \|")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: must be comma-separated integers, e.g. 42,43"
        ) from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: must list distinct integers >= 0"
        )
    return seeds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.compare",
        description="Run strategies x seeds of one setting through `flwr run` and "
        "write comparison.md, comparison.json and comparison.png.",
    )
    parser.add_argument(
        "preset", type=Path, help="preset TOML, e.g. conf/compare/*.toml"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="comparison folder (default: results/compare-<preset name>)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="data folder for every run (overrides the preset's data-dir; "
        "made absolute)",
    )
    parser.add_argument(
        "--only",
        type=_names,
        help="comma list: run only these of the preset's strategies",
    )
    parser.add_argument(
        "--seeds", type=_seeds, help="comma list replacing the preset's seeds"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds per run (overrides the preset's [compare] timeout)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="run nothing; rebuild table and plot from the existing runs",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and list what would run or be skipped; run nothing",
    )
    return parser.parse_args(argv)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _check_cuda(preset: Preset) -> None:
    if preset.client_gpus <= 0:
        return
    import torch

    if not torch.cuda.is_available():
        raise PresetError(
            f"{preset.path}: [compare] key 'client-resources-num-gpus' = "
            f"{preset.client_gpus} is not allowed here: torch sees no CUDA device, "
            "so the simulation could never place a client; set it to 0.0"
        )


def set_aside(out: Path, name: str, keep_run: bool = False) -> None:
    """Move an unfinished run's folder (unless ``keep_run``: it resumes) and log to
    ``<out>/attic/`` (kept, unused)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    attic = out / "attic" / f"{name}-{stamp}"
    sources = [log_path(out, name), status_path(out, name)]
    if not keep_run:
        sources.append(run_dir(out, name))
    for source in sources:
        if source.exists():
            attic.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), attic / source.name)


def resumable(out: Path, spec: RunSpec) -> tuple[RunSpec, int] | None:
    """``spec`` continued from its run's checkpoint, and the checkpoint's round;
    ``None`` when there is none this run config can continue (said why)."""
    from server_app.checkpoint import (
        CHECKPOINT_FILE,
        CheckpointError,
        check_compatible,
        read_checkpoint,
    )

    path = run_dir(out, spec.name) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    config = spec.run_config | {"resume-from": str(path)}
    try:
        checkpoint = read_checkpoint(path, mmap=True)
        check_compatible(checkpoint, load_run_config(config), path)
    except CheckpointError as err:
        print(f"     {spec.name}: starts afresh: {err}")
        return None
    kept = Path(checkpoint["config"].get("client-state-dir") or "/")
    if (kept.parent.name, kept.name) != (spec.name, CLIENT_STATE):
        print(f"     {spec.name}: starts afresh: its clients did not keep their "
              "state in its folder, so a resumed run would lose it")  # fmt: skip
        return None
    return RunSpec(spec.strategy, spec.seed, config), int(checkpoint["round"])


class Runner:
    """Submits runs to one private SuperLink, restarted when it dies or hangs."""

    def __init__(self, out: Path, preset: Preset, timeout: float) -> None:
        self.out, self.preset, self.timeout = out, preset, timeout
        self.link: SimulationSuperLink | None = None

    def ensure_link(self) -> SimulationSuperLink:
        if self.link is None or not self.link.alive:
            self.stop()
            workdir = self.out / "superlink"
            workdir.mkdir(parents=True, exist_ok=True)
            self.link = SimulationSuperLink(workdir).start()
        return self.link

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()
            self.link = None

    def run(self, spec: RunSpec) -> None:
        """One ``flwr run``; its log and end state go to ``<out>/logs/``."""
        link = self.ensure_link()
        status = status_path(self.out, spec.name)
        status.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        state = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid()}
        status.write_text(json.dumps(state) + "\n")

        def show(line: str) -> None:
            line = ANSI.sub("", line).strip()
            if ROUND_LINE.search(line) or line.startswith("ERROR"):
                print(f"    {spec.name}: {line.split(':', 1)[-1].strip()}", flush=True)

        code, timed_out = None, False
        try:
            code, timed_out = link.run_logged(
                spec.run_config,
                self.preset.num_supernodes,
                log_path(self.out, spec.name),
                timeout=self.timeout,
                resources=self.preset.resources,
                on_line=show,
            )
        finally:
            state |= {
                "exit_code": code,
                "timed_out": timed_out,
                "interrupted": code is None,
                "seconds": time.time() - started,
            }
            status.write_text(json.dumps(state) + "\n")
        if timed_out:
            # The run goes on inside the SuperLink: stop it with its processes.
            self.stop()
        if run_dir(self.out, spec.name).is_dir():
            record_machine(run_dir(self.out, spec.name))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preset = load_preset(args.preset)
        default = Path("results") / f"compare-{preset.name}"
        out = absolute(args.out or default)
        data_dir = absolute(args.data_dir) if args.data_dir else None
        if args.only is not None:
            unknown = [s for s in args.only if s not in preset.strategies]
            if unknown or not args.only:
                raise PresetError(
                    f"--only {','.join(args.only)!r}: not in the preset's strategies"
                    f" ({', '.join(unknown)}); allowed: {', '.join(preset.strategies)}"
                )
        specs = preset.runs(
            seeds=args.seeds, results_dir=out / "runs", data_dir=data_dir
        )
        if not args.table_only and not args.dry_run:
            _check_cuda(preset)
    except PresetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    timeout = args.timeout if args.timeout else preset.timeout
    selected = [s for s in specs if args.only is None or s.strategy in args.only]
    # results/ is git-ignored and docs/ is in pyproject's fab-exclude: flwr packs
    # neither into the app bundle it ships with every run.
    packed = not any(out.is_relative_to(APP / d) for d in ("results", "docs"))
    if out.is_relative_to(APP) and packed:
        print(
            f"warning: {out} is inside the app folder: unless git ignores it, "
            "`flwr run` packs its comparison.md into every run's app bundle",
            file=sys.stderr,
        )

    if args.table_only:
        write_outputs(out, preset, specs)
        print((out / "comparison.md").read_text())
        return 0

    todo = []
    for spec in selected:
        report = inspect_run(out, preset, spec)
        if report.status == FINISHED:
            print(f"skip {spec.name}: finished ({report.rounds} rounds)")
        elif report.status == RUNNING:
            print(f"skip {spec.name}: running in another process")
        else:
            todo.append(spec)
            print(f"run  {spec.name}: {report.describe()}")
    if args.dry_run:
        return 0

    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Also when started with SIGINT ignored (a background job of a script).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    runner = Runner(out, preset, timeout)
    failed = []
    try:
        for i, spec in enumerate(todo, 1):
            resumed = resumable(out, spec)
            set_aside(out, spec.name, keep_run=resumed is not None)
            after = f" (resumes after round {resumed[1]})" if resumed else ""
            print(f"[{i}/{len(todo)}] {spec.name} -> {run_dir(out, spec.name)}{after}")
            start = time.time()
            runner.run(resumed[0] if resumed else spec)
            report = inspect_run(out, preset, spec)
            print(
                f"[{i}/{len(todo)}] {spec.name}: {report.describe()} "
                f"after {time.time() - start:.0f} s",
                flush=True,
            )
            if report.status != FINISHED:
                failed.append(spec.name)
            write_outputs(out, preset, specs)
    except KeyboardInterrupt:
        print("interrupted: stopping the SuperLink", file=sys.stderr)
        failed.append("interrupted")
    except RuntimeError as err:  # the SuperLink did not start
        print(f"error: {err}", file=sys.stderr)
        failed.append("superlink")
    finally:
        runner.stop()
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    write_outputs(out, preset, specs)
    print((out / "comparison.md").read_text())
    print(f"written: {out / 'comparison.md'}, comparison.json, comparison.png")
    unfinished = [
        s.name for s in selected if inspect_run(out, preset, s).status != FINISHED
    ]
    return 1 if failed or unfinished else 0


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines in order under tee
    sys.exit(main())
