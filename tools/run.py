"""``make run``: check the whole configuration, then one `flwr run` simulation.

Usage::

    python -m tools.run [--setting conf/<name>.toml] [--clients N]
        [--run-config "key=value ..."] [--data-dir DIR] [--results-dir DIR]
        [--federation-config simulation.toml]

Before Flower or Ray starts, the run configuration is assembled the way the
ServerApp will see it (``pyproject.toml`` defaults, then the ``--setting`` file,
then ``--data-dir`` / ``--results-dir``, then ``--run-config``, whose string is read
as ``flwr run --run-config`` reads it: space-separated ``key=value`` pairs with TOML
values) and checked as a whole: unknown keys, values that are not TOML (an
unquoted string), every value through :func:`common.config.load_run_config`, the
strategy name, ``min-clients`` against the number of clients, ``resume-from`` and
``hypernet-from`` paths, and the dataset's presence in ``data-dir``
(:func:`common.datasets.locate_train_split`, which downloads a missing dataset
when ``download`` is true, once, here). A problem prints one message and exits 2.

Relative paths (``data-dir``, ``results-dir``, ``hypernet-from``, the setting file)
are taken from the directory the command was typed in and handed to Flower as
absolute paths. The run itself goes to a private SuperLink
(:mod:`tools.superlink`: its own ``FLWR_HOME`` in a temporary folder, a free port),
so a SuperLink left over from an earlier ``flwr run`` can neither break nor
receive this run; it is stopped, with its Ray workers, when the run ends, fails or
is interrupted (Ctrl-C, SIGTERM).

``flwr run`` exits 0 even when the ServerApp fails, so the outcome is read from
the run's results folder (its ``summary.json`` must reach ``num-server-rounds``)
and explained from the log (:func:`tools.report.failure_reason`). The full log is
kept as ``flwr-run.log`` in the results folder.

Exit status: 0 when the run finished, 1 when it failed, 2 for an invalid
configuration or missing data, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .preset import absolute
from .report import ANSI, failure_reason
from .superlink import APP, SimulationSuperLink

#: The federation config ``make run`` uses when none is given.
DEFAULT_FEDERATION = APP / "simulation.toml"
#: Run-config keys holding paths, made absolute from the caller's directory.
#: (``resume-from`` is looked up in ``results-dir`` first: see :func:`_resume_from`.)
PATH_KEYS = ("data-dir", "results-dir", "hypernet-from", "client-state-dir")
#: What ``flwr run --run-config`` accepts: ``key=value`` with a quoted or bare value.
PAIR = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")
RESULTS_LINE = re.compile(r"Results directory: (.+?)\s*$")
EXIT_INVALID, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class LaunchError(ValueError):
    """The configuration (or the data it names) cannot run; one message says why."""


@dataclass
class Launch:
    """A checked run: what goes to ``flwr run`` and what to expect back."""

    overrides: dict[str, Any]  # run-config keys handed to flwr (absolute paths)
    num_supernodes: int
    resources: dict[str, Any]  # federation config besides num-supernodes
    rounds: int
    results_dir: Path
    summary: str  # one line: what runs where


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.run",
        description="Check the configuration, then run one `flwr run` simulation "
        "on a private SuperLink (stopped at the end).",
    )
    parser.add_argument(
        "--setting",
        default="",
        help="run-config file, e.g. conf/cifar10-pathological-cnn.toml",
    )
    parser.add_argument(
        "--clients",
        default="",
        help="simulated clients (num-supernodes; default: the federation config's)",
    )
    parser.add_argument(
        "--run-config",
        default="",
        help="overrides as `flwr run --run-config` takes them: "
        "\"num-server-rounds=5 strategy='local'\"",
    )
    parser.add_argument("--data-dir", default="", help="data folder (data-dir)")
    parser.add_argument(
        "--results-dir", default="", help="results folder (results-dir)"
    )
    parser.add_argument(
        "--federation-config",
        default="",
        help=f"federation config file (default: {DEFAULT_FEDERATION.name})",
    )
    return parser.parse_args(argv)


# --------------------------------------------------------------- configuration


def default_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's ``pyproject.toml``."""
    with (APP / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["tool"]["flwr"]["app"]["config"]


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as dotted keys, as flwr flattens them."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= _flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def parse_overrides(text: str, where: str = "RUN_CONFIG") -> dict[str, Any]:
    """``key=value`` pairs read like ``flwr run --run-config`` (TOML values).

    Unlike flwr, which drops text it cannot pair and reports a bad value without
    naming it, every word must be a ``key=value`` pair and a value that is not TOML
    names its key.
    """
    values: dict[str, Any] = {}
    position = 0
    for match in PAIR.finditer(text):
        stray = text[position : match.start()].strip()
        if stray:
            raise LaunchError(
                f"{where}: cannot read {stray!r}: give space-separated key=value "
                "pairs, e.g. num-server-rounds=5 strategy='local'"
            )
        position = match.end()
        key, raw = match.groups()
        try:
            parsed = tomllib.loads(f"{key} = {raw}")
        except tomllib.TOMLDecodeError:
            hint = (
                f"quote a string: {key}='{raw}'"
                if re.fullmatch(r"[\w.,:/~+-]+", raw)
                else "values are TOML: numbers, true/false or quoted strings"
            )
            raise LaunchError(
                f"{where}: run-config key '{key}' = {raw} is not allowed: not a "
                f"TOML value; {hint}"
            ) from None
        values |= _flatten(parsed)
    stray = text[position:].strip()
    if stray:
        raise LaunchError(
            f"{where}: cannot read {stray!r}: give space-separated key=value pairs, "
            "e.g. num-server-rounds=5 strategy='local'"
        )
    return values


def read_setting(path: str) -> dict[str, Any]:
    """A run-config file (``conf/*.toml``): flat run-config keys."""
    file = absolute(path)
    if not file.is_file():
        raise LaunchError(f"SETTING={path}: no such file ({file})")
    try:
        return _flatten(tomllib.loads(file.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise LaunchError(f"SETTING={path}: not valid TOML: {err}") from None


def _check_keys(values: dict[str, Any], allowed: dict[str, Any], where: str) -> None:
    for key, value in values.items():
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise LaunchError(
                f"{where}: unknown run-config key '{key}'; {hint}allowed keys: "
                + ", ".join(sorted(allowed))
            )
        if not isinstance(value, str | int | float | bool):
            raise LaunchError(
                f"{where}: run-config key '{key}' = {value!r} is not allowed: "
                "run-config values are strings, numbers or booleans"
            )


def federation(path: str, clients: str) -> tuple[int, dict[str, Any]]:
    """``(num-supernodes, other federation settings)`` from the file and CLIENTS."""
    file = absolute(path) if path else DEFAULT_FEDERATION
    if not file.is_file():
        raise LaunchError(f"FEDERATION_CONFIG={path}: no such file ({file})")
    try:
        settings = _flatten(tomllib.loads(file.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise LaunchError(f"{file}: not valid TOML: {err}") from None
    count: Any = settings.pop("num-supernodes", 2)
    where = f"num-supernodes in {file}"
    if clients.strip():
        where = f"CLIENTS={clients}"
        try:
            count = int(clients)
        except ValueError:
            count = clients
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise LaunchError(f"{where} is not allowed: must be an integer >= 1")
    gpus = settings.get("client-resources-num-gpus", 0.0)
    if isinstance(gpus, int | float) and gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise LaunchError(
                f"client-resources-num-gpus = {gpus} in {file} is not allowed here: "
                "torch sees no CUDA device, so no client could be placed; set it "
                "to 0.0"
            )
    return count, settings


def _resume_from(cfg: Any) -> str:
    """The absolute checkpoint path ``resume-from`` names (results-dir first),
    checked to be a readable checkpoint this run config can continue."""
    from server_app.checkpoint import check_compatible, checkpoint_path, read_checkpoint

    path = checkpoint_path(cfg.resume_from, cfg.results_dir)
    check_compatible(read_checkpoint(path, mmap=True), cfg, path)
    return str(path)


def _hypernet_from(given: str, value: str) -> None:
    """``hypernet-from`` (``given``, made absolute: ``value``) names a saved file."""
    from server_app.strategies.mh_pfedhn import HYPERNET_FILE

    path = Path(value)
    file = path / HYPERNET_FILE if path.is_dir() else path
    if not file.is_file():
        raise LaunchError(
            f"run-config key 'hypernet-from' = {given!r} is not allowed: no "
            f"{HYPERNET_FILE} at {path}; give a finished run's folder or the file "
            "itself"
        )


def _check_data(cfg: Any) -> Path:
    """Where the dataset is (downloaded here, once, when missing and allowed)."""
    from common.datasets import (
        DatasetNotFoundError,
        load_train_arrays,
        locate_train_split,
    )

    folder = absolute(cfg.data_dir)
    existed = folder.exists()
    try:
        source = locate_train_split(
            cfg.dataset, folder, cfg.download, emnist_split=cfg.emnist_split
        )
    except DatasetNotFoundError as err:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # made by the failed download attempt
        raise LaunchError(str(err)) from None
    # Decoded here, once, with progress lines, rather than silently in the first
    # ClientApp while the others wait; a corrupt file fails before Ray starts.
    start = time.perf_counter()
    try:
        images, _, _ = load_train_arrays(
            cfg.dataset, folder, cfg.download, emnist_split=cfg.emnist_split
        )
    except (DatasetNotFoundError, ValueError, OSError) as err:
        raise LaunchError(f"data-dir {folder}: {err}") from None
    seconds = time.perf_counter() - start
    state = "decoded and cached" if seconds > 1 else "from its cache"
    print(f"data: {len(images):,} {cfg.dataset} training images, {state} "
          f"({seconds:.1f} s)", flush=True)  # fmt: skip
    return source


def prepare(args: argparse.Namespace) -> Launch:
    """Assemble and check everything; raise :class:`LaunchError` on a problem."""
    from common.config import ConfigError, load_run_config

    defaults = default_config()
    setting = read_setting(args.setting) if args.setting else {}
    _check_keys(setting, defaults, f"SETTING={args.setting}")
    overrides = parse_overrides(args.run_config)
    _check_keys(overrides, defaults, "RUN_CONFIG")
    chosen: dict[str, Any] = {**setting}
    if args.data_dir:
        chosen["data-dir"] = args.data_dir
    if args.results_dir:
        chosen["results-dir"] = args.results_dir
    chosen |= overrides
    given = dict(chosen)
    for key in PATH_KEYS:
        if isinstance(chosen.get(key), str) and chosen[key]:
            chosen[key] = str(absolute(chosen[key]))
    num_supernodes, resources = federation(args.federation_config, args.clients)
    try:
        cfg = load_run_config({**defaults, **chosen})
        from server_app.strategies import build_strategy

        build_strategy(cfg)  # the registry's names and per-strategy checks
        cfg.torch_device()  # device = "cuda" without CUDA
        if cfg.resume_from:
            chosen["resume-from"] = _resume_from(cfg)
    except ConfigError as err:
        raise LaunchError(str(err)) from None
    if cfg.min_clients > num_supernodes:
        raise LaunchError(
            f"run-config key 'min-clients' = {cfg.min_clients} is not allowed with "
            f"{num_supernodes} clients: the server would wait forever; set "
            f"min-clients <= {num_supernodes} or run more clients (CLIENTS)"
        )
    if cfg.hypernet_from:
        _hypernet_from(given.get("hypernet-from", ""), cfg.hypernet_from)
    source = _check_data(cfg)
    results_dir = absolute(cfg.results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LaunchError(
            f"run-config key 'results-dir' = {cfg.results_dir!r} is not allowed: "
            f"cannot create it ({err.strerror})"
        ) from None
    summary = (
        f"{cfg.strategy}, {num_supernodes} clients, models {cfg.models}, "
        f"{_rounds(cfg.num_server_rounds)}, {cfg.dataset} from {source}, "
        f"results in {results_dir}"
    )
    return Launch(
        overrides=chosen,
        num_supernodes=num_supernodes,
        resources=resources,
        rounds=cfg.num_server_rounds,
        results_dir=results_dir,
        summary=summary,
    )


# ------------------------------------------------------------------------- run


def _rounds(count: int) -> str:
    return f"{count} round" + ("" if count == 1 else "s")


def results_folder(log: str) -> Path | None:
    """The run's results folder, from the ServerApp's ``Results directory:`` line."""
    found = None
    for line in log.splitlines():
        match = RESULTS_LINE.search(ANSI.sub("", line))
        if match:
            found = Path(match.group(1))
    return found


def outcome(code: int, log: str, rounds: int) -> tuple[bool, str, Path | None]:
    """``(finished, one line, results folder)`` of a ``flwr run``.

    Finished: ``flwr run`` exited 0 and the results folder's ``summary.json``
    reached ``rounds``; otherwise the line says why (the log's last exception).
    """
    folder = results_folder(log)
    summary = None
    if folder is not None:
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError):
            summary = None
    done = int(summary.get("rounds", -1)) if isinstance(summary, dict) else -1
    if code == 0 and summary is not None and done == rounds:
        best = summary.get("best_accuracy")
        final = summary.get("final_accuracy")
        scores = ""
        if isinstance(final, int | float) and math.isfinite(final):
            scores = f", final accuracy {final:.4f}"
            if isinstance(best, int | float):
                scores += f", best {best:.4f}"
                if summary.get("best_round") is not None:
                    scores += f" (round {summary['best_round']})"
        return True, f"finished: {_rounds(rounds)}{scores}; results in {folder}", folder
    if folder is None:
        where = "before round 1 (no results folder)"
    elif summary is None:
        where = "without a summary"
    else:
        where = f"after {max(done, 0)}/{rounds} rounds"
    reason = failure_reason(log)
    line = f"failed {where}: {reason}" if reason else f"failed {where}"
    if code != 0:
        line += f" (flwr run exit code {code})"
    return False, line, folder


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def execute(launch: Launch) -> int:
    """Run on a private SuperLink; stop it (and everything it started) at the end."""
    workdir = Path(tempfile.mkdtemp(prefix="mh-pfedhn-run-"))
    log_file = workdir / "flwr-run.log"
    lines: list[str] = []

    def show(line: str) -> None:
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()

    previous = signal.signal(signal.SIGTERM, _interrupt)
    # Also when started with SIGINT ignored (a background job of a script).
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    link = SimulationSuperLink(workdir)
    code: int | None = None
    try:
        print("starting a private SuperLink (its own FLWR_HOME and port)", flush=True)
        link.start()
        print(
            f"starting the simulation: Ray and {launch.num_supernodes} virtual "
            "SuperNodes, then the handshake and round 1 (Ray's start takes 10-30 s)",
            flush=True,
        )
        code, _ = link.run_logged(
            launch.overrides,
            launch.num_supernodes,
            log_file,
            resources=launch.resources,
            on_line=show,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the run and its SuperLink", file=sys.stderr)
    except RuntimeError as err:  # the SuperLink did not start
        print(f"error: {err}", file=sys.stderr)
        code = -1
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        link.stop()
        signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous)
    log = "".join(lines)
    exit_code = code if code is not None else -1
    finished, line, folder = outcome(exit_code, log, launch.rounds)
    kept = None
    if folder is not None and folder.is_dir() and log_file.is_file():
        kept = folder / log_file.name
        shutil.copyfile(log_file, kept)
    elif not finished and log_file.is_file():
        kept = launch.results_dir / f"flwr-run-{time.strftime('%Y%m%d-%H%M%S')}.log"
        shutil.copyfile(log_file, kept)
    shutil.rmtree(workdir, ignore_errors=True)
    if code is None:
        print(f"interrupted; log: {kept}" if kept else "interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if finished:
        print(line)
        return 0
    print(line + (f"; log: {kept}" if kept else ""), file=sys.stderr)
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        launch = prepare(args)
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    print(f"run: {launch.summary}", flush=True)
    return execute(launch)


if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(main())
