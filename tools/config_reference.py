"""Write docs/configuration.md from the config schema.

Defaults come from :class:`common.config.RunConfig` and meanings from
:mod:`common.config_help`, so the reference cannot drift from the code
(``tests/test_config.py`` fails when the file is stale)::

    python -m tools.config_reference            # rewrite docs/configuration.md
    python -m tools.config_reference --check    # exit 1 when it is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import RunConfig
from common.config_help import NODE_CONFIG_HELP, RUN_CONFIG_HELP

PATH = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

HEAD = r"""# Configuration

Every run-config key, its default and what it does.

## How to set keys

The defaults live in `[tool.flwr.app.config]` of `pyproject.toml`. Override them
per run:

```bash
make run RUN_CONFIG="num-server-rounds=5 hn-update='mean'"
.venv/bin/flwr run . --federation-config simulation.toml \
    --run-config 'num-server-rounds=5 hn-update="mean"' --stream
```

String values need quotes inside the run config: `'mean'` or `"mean"`. A
run-config file of `conf/` (the paper's settings) goes under the overrides:

```bash
make run SETTING=conf/cifar10-pathological-cnn.toml CLIENTS=50 \
    RUN_CONFIG="num-server-rounds=100"
```

Every key is checked before Flower starts (`make run`) and again before round 1.
A bad value stops the run with one message that names the key, the value and what
is allowed. A comparison preset sets keys in its
`[run-config]` and `[strategy-config.<name>]` tables
([Comparing strategies](guides/comparing.md#write-a-preset)).

The simulated federation (number of clients, CPU and GPU share of each) is not in
the run config: it is `simulation.toml`, passed to `flwr run --federation-config`
(`make run CLIENTS=50` changes the number of clients for one run;
`make run FEDERATION_CONFIG=/abs/path/other.toml` uses another file). On a CUDA
machine, give each client a GPU share there (`client-resources-num-gpus = 0.1` lets
10 clients share one GPU); `device = "auto"` then uses CUDA.

## Run-config keys
"""

NODE_INTRO = r"""## Node config

Per SuperNode (`flower-supernode --node-config`); a simulation sets
`partition-id` and `num-partitions` itself. See [Deploying](guides/deploying.md).
"""


def toml_value(value: object) -> str:
    """A default as it is written in a run config (TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def render() -> str:
    """The whole reference page."""
    defaults = RunConfig().flat()
    missing = sorted(set(defaults) - set(RUN_CONFIG_HELP))
    extra = sorted(set(RUN_CONFIG_HELP) - set(defaults))
    if missing or extra:
        raise KeyError(f"common/config_help.py: missing {missing}, unknown {extra}")
    lines = [HEAD.rstrip("\n"), "", "| key | default | meaning |", "|---|---|---|"]
    for key, meaning in RUN_CONFIG_HELP.items():
        lines.append(f"| `{key}` | `{toml_value(defaults[key])}` | {meaning} |")
    lines += ["", NODE_INTRO.rstrip("\n"), "", "| key | meaning |", "|---|---|"]
    lines += [f"| {key} | {meaning} |" for key, meaning in NODE_CONFIG_HELP.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        stale = not PATH.is_file() or PATH.read_text() != text
        if stale:
            print(f"{PATH} is stale: run python -m tools.config_reference")
        return int(stale)
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
