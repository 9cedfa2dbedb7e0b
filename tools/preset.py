"""Comparison presets: which strategies and seeds run on one shared setting.

A preset is a TOML file (``conf/compare/*.toml``)::

    [compare]
    title = "CIFAR-10, 5 models"          # optional, heads the table and plot
    setting = "../cifar10-pathological-5models.toml"  # optional run-config file
    strategies = ["local", "mh-pfedhn"]   # server_app.strategies names
    seeds = [42, 43]                      # each run gets run-config `seed`
    num-supernodes = 10                   # simulated clients
    client-resources-num-cpus = 1         # optional, per simulated client
    client-resources-num-gpus = 0.0       # optional, per simulated client
    timeout = 86400                       # optional, seconds per run

    [run-config]                          # shared by every run, over `setting`
    models = "cnn,vgg8"
    num-server-rounds = 40

    [strategy-config.fedavg]              # optional, per-strategy overrides
    client-lr = 0.01

``setting`` names a run-config file (``conf/*.toml``, the one a user passes to
``flwr run --run-config``), relative to the preset: the comparison runs exactly that
setting, with ``[run-config]`` on top of it.

Every run is ``strategy x seed`` with run-name ``<strategy>-seed<seed>``. The
preset is checked as a whole (sections, keys, types, strategy names against the
registry as it is at run time, and each resulting run configuration through
:func:`common.config.load_run_config`) before anything starts.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, load_run_config

SECTIONS = ("compare", "run-config", "strategy-config")
#: ``[compare]`` keys: (required, default).
COMPARE_KEYS: dict[str, tuple[bool, Any]] = {
    "title": (False, ""),
    "setting": (False, ""),
    "strategies": (True, None),
    "seeds": (True, None),
    "num-supernodes": (True, None),
    "client-resources-num-cpus": (False, 1),
    "client-resources-num-gpus": (False, 0.0),
    "timeout": (False, 86400.0),
}
#: Run-config keys the comparison sets itself, one value per run.
RESERVED = {
    "strategy": "set per run from [compare] strategies",
    "seed": "set per run from [compare] seeds",
    "run-name": "set per run as <strategy>-seed<seed>",
    "results-dir": "set by the comparison to <out>/runs",
}
#: Keys that may differ between a finished run and the preset (paths).
PATH_KEYS = ("data-dir", "results-dir", "run-name", "client-state-dir")
#: The clients' state files inside a comparison run's folder.
CLIENT_STATE = "client-state"


class PresetError(ValueError):
    """The preset (or a command-line override of it) is not valid."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a comparison: a strategy, a seed and its run-config overrides."""

    strategy: str
    seed: int
    run_config: dict[str, Any]

    @property
    def name(self) -> str:
        return run_name(self.strategy, self.seed)

    @property
    def rounds(self) -> int:
        """Training rounds a finished run has (``num-server-rounds``)."""
        return int(self.run_config["num-server-rounds"])


def run_name(strategy: str, seed: int) -> str:
    return f"{strategy}-seed{seed}"


@dataclass
class Preset:
    """A parsed, validated preset (see the module docstring for the format)."""

    path: Path
    strategies: list[str]
    seeds: list[int]
    num_supernodes: int
    run_config: dict[str, Any]
    strategy_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    title: str = ""
    client_cpus: float = 1
    client_gpus: float = 0.0
    timeout: float = 86400.0

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def resources(self) -> dict[str, float]:
        """Federation config of each simulated client, for ``flwr run``."""
        return {
            "client-resources-num-cpus": self.client_cpus,
            "client-resources-num-gpus": self.client_gpus,
        }

    def runs(
        self,
        seeds: list[int] | None = None,
        strategies: list[str] | None = None,
        results_dir: Path | None = None,
        data_dir: Path | None = None,
    ) -> list[RunSpec]:
        """Every ``strategy x seed`` run, seed-major (all strategies of seed 1 first).

        Each run's configuration is validated with :func:`load_run_config`.
        """
        specs = []
        for seed in seeds if seeds is not None else self.seeds:
            for strategy in strategies if strategies is not None else self.strategies:
                config: dict[str, Any] = {
                    **self.run_config,
                    **self.strategy_config.get(strategy, {}),
                    "strategy": strategy,
                    "seed": seed,
                    "run-name": run_name(strategy, seed),
                }
                if results_dir is not None:
                    config["results-dir"] = str(absolute(results_dir))
                    # In the run's folder: a resumed run restores its clients.
                    config["client-state-dir"] = str(
                        absolute(results_dir) / config["run-name"] / CLIENT_STATE
                    )
                if data_dir is not None:
                    config["data-dir"] = str(absolute(data_dir))
                elif "data-dir" in config:
                    config["data-dir"] = str(absolute(config["data-dir"]))
                try:
                    cfg = load_run_config(config)
                except ConfigError as err:
                    where = "[run-config]" + (
                        f" + [strategy-config.{strategy}]"
                        if strategy in self.strategy_config
                        else ""
                    )
                    raise PresetError(
                        f"{self.path}: run {run_name(strategy, seed)} ({where}): {err}"
                    ) from None
                # Explicit, so that the app's default cannot differ from what the
                # comparison expects a finished run to have.
                config["num-server-rounds"] = cfg.num_server_rounds
                specs.append(RunSpec(strategy, seed, config))
        return specs

    def expected_config(self, spec: RunSpec) -> dict[str, Any]:
        """The resolved values of the keys this run sets (paths left out)."""
        flat = load_run_config(spec.run_config).flat()
        return {k: flat[k] for k in spec.run_config if k not in PATH_KEYS}


def absolute(path: str | Path) -> Path:
    """``~`` expanded and made absolute from the current directory.

    Run-config paths are resolved by the SuperLink's processes, which run in
    another folder, so every path handed to ``flwr run`` must be absolute.
    """
    return Path(path).expanduser().absolute()


def _allowed_strategies() -> list[str]:
    from server_app.strategies import available_strategies

    return available_strategies()


def _check_strategies(names: list[Any], key: str, allowed: list[str]) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise PresetError(
            f"{key}: unknown strateg{'ies' if len(unknown) > 1 else 'y'} "
            f"{', '.join(map(repr, unknown))}; allowed (registered now): "
            + ", ".join(allowed)
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_compare(path: Path, section: dict[str, Any]) -> dict[str, Any]:
    where = f"{path}: [compare]"
    unknown = sorted(set(section) - set(COMPARE_KEYS))
    if unknown:
        raise PresetError(
            f"{where} unknown key {', '.join(map(repr, unknown))}; allowed keys: "
            + ", ".join(COMPARE_KEYS)
        )
    values = {}
    for key, (required, default) in COMPARE_KEYS.items():
        if key not in section:
            if required:
                raise PresetError(f"{where} key '{key}' is missing")
            values[key] = default
            continue
        values[key] = section[key]
    strategies, seeds = values["strategies"], values["seeds"]
    if (
        not isinstance(strategies, list)
        or not strategies
        or not all(isinstance(s, str) for s in strategies)
    ):
        raise PresetError(
            f"{where} key 'strategies' = {strategies!r} is not allowed: must be a "
            "non-empty list of strategy names"
        )
    if len(set(strategies)) != len(strategies):
        raise PresetError(f"{where} key 'strategies' lists a strategy twice")
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(_is_int(s) for s in seeds)
        or any(s < 0 for s in seeds)
    ):
        raise PresetError(
            f"{where} key 'seeds' = {seeds!r} is not allowed: must be a non-empty "
            "list of integers >= 0"
        )
    if len(set(seeds)) != len(seeds):
        raise PresetError(f"{where} key 'seeds' lists a seed twice")
    supernodes = values["num-supernodes"]
    if not _is_int(supernodes) or supernodes < 1:
        raise PresetError(
            f"{where} key 'num-supernodes' = {supernodes!r} is not allowed: must be "
            "an integer >= 1"
        )
    for key, zero_ok in (
        ("client-resources-num-cpus", False),
        ("client-resources-num-gpus", True),
        ("timeout", False),
    ):
        value = values[key]
        if (
            not _is_number(value)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero_ok)
        ):
            raise PresetError(
                f"{where} key '{key}' = {value!r} is not allowed: must be a number "
                + (">= 0" if zero_ok else "> 0")
            )
    if not isinstance(values["title"], str):
        raise PresetError(f"{where} key 'title' must be a string")
    return values


def _check_run_config(where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise PresetError(f"{where} must be a table of run-config keys")
    for key, value in table.items():
        if key in RESERVED:
            raise PresetError(
                f"{where} key '{key}' is not allowed here: it is {RESERVED[key]}"
            )
        if not isinstance(value, str | int | float | bool):
            raise PresetError(
                f"{where} key '{key}' = {value!r} is not allowed: run-config values "
                "are strings, numbers or booleans"
            )
    return dict(table)


def _load_setting(preset: Path, setting: Any) -> dict[str, Any]:
    """The run-config file named by ``[compare] setting`` (relative to the preset)."""
    if setting == "":
        return {}
    where = f"{preset}: [compare] key 'setting'"
    if not isinstance(setting, str):
        raise PresetError(f"{where} must be the path of a run-config file")
    file = preset.parent / setting
    if not file.is_file():
        raise PresetError(f"{where} = {setting!r}: no such file ({file})")
    try:
        data = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"{file}: not valid TOML: {err}") from None
    return _check_run_config(f"{file}", data)


def parse_preset(
    path: Path, data: dict[str, Any], allowed: list[str] | None = None
) -> Preset:
    """Validate a preset's TOML content.

    Strategy names are checked against ``allowed``, by default the names
    registered in :mod:`server_app.strategies` when this runs.
    """
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise PresetError(
            f"{path}: unknown section {', '.join(f'[{u}]' for u in unknown)}; "
            f"allowed sections: {', '.join(f'[{s}]' for s in SECTIONS)}"
        )
    if "compare" not in data:
        raise PresetError(f"{path}: section [compare] is missing")
    values = _check_compare(path, data["compare"])
    allowed = _allowed_strategies() if allowed is None else allowed
    _check_strategies(
        values["strategies"], f"{path}: [compare] key 'strategies'", allowed
    )
    run_config = {
        **_load_setting(path, values["setting"]),
        **_check_run_config(f"{path}: [run-config]", data.get("run-config", {})),
    }
    rounds = run_config.get("num-server-rounds", 1)
    if _is_int(rounds) and rounds < 1:
        raise PresetError(
            f"{path}: [run-config] key 'num-server-rounds' = {rounds} is not allowed: "
            "a comparison needs at least 1 training round"
        )
    per_strategy = data.get("strategy-config", {})
    if not isinstance(per_strategy, dict):
        raise PresetError(
            f"{path}: [strategy-config] must hold [strategy-config.<name>] tables"
        )
    strategy_config = {}
    for name, table in per_strategy.items():
        _check_strategies([name], f"{path}: [strategy-config.{name}]", allowed)
        strategy_config[name] = _check_run_config(
            f"{path}: [strategy-config.{name}]", table
        )
    if "num-server-rounds" in {k for t in strategy_config.values() for k in t}:
        raise PresetError(
            f"{path}: 'num-server-rounds' must be the same for every strategy; set "
            "it in [run-config] only"
        )
    return Preset(
        path=path,
        strategies=values["strategies"],
        seeds=values["seeds"],
        num_supernodes=values["num-supernodes"],
        run_config=run_config,
        strategy_config=strategy_config,
        title=values["title"],
        client_cpus=values["client-resources-num-cpus"],
        client_gpus=values["client-resources-num-gpus"],
        timeout=float(values["timeout"]),
    )


def load_preset(path: str | Path, allowed: list[str] | None = None) -> Preset:
    """Read and validate a preset file; every run's config is checked too."""
    path = Path(path)
    if not path.is_file():
        raise PresetError(f"preset {path} not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise PresetError(f"{path}: not valid TOML: {err}") from None
    preset = parse_preset(path, data, allowed)
    preset.runs()  # raises PresetError naming the first bad run configuration
    return preset
