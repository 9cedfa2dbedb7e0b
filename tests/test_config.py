"""Run-config validation: defaults, and one clear message per bad value."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig, load_run_config
from server_app.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]


def pyproject_defaults() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_schema_defaults():
    defaults = pyproject_defaults()
    assert set(defaults) == set(RunConfig().flat()), "every key needs both"
    cfg = load_run_config(defaults)
    assert cfg.flat() == RunConfig().flat()


def test_the_configuration_reference_is_generated_from_the_schema():
    """docs/configuration.md is what ``python -m tools.config_reference`` writes:
    every key of the schema, its default and its meaning (common/config_help.py)."""
    from tools import config_reference

    assert set(config_reference.RUN_CONFIG_HELP) == set(RunConfig().flat())
    text = config_reference.render()
    assert config_reference.PATH.read_text() == text, (
        "docs/configuration.md is stale: run python -m tools.config_reference"
    )
    assert "| `hn-window` | `2` |" in text and '| `dataset` | `"cifar10"` |' in text


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("models", "cnn,alexnet", "unknown model alexnet; allowed: cnn"),
        ("models", "", "comma-separated list"),
        ("dataset", "mnist2", "unknown dataset; allowed: cifar10"),
        ("client-lr", 0.0, "greater than 0"),
        ("client-lr", -1.0, "greater than 0"),
        ("hn-lr", 0, "greater than 0"),
        ("batch-size", 0, "greater than or equal to 1"),
        ("fraction-train", 0.0, "greater than 0"),
        ("fraction-train", 1.5, "less than or equal to 1"),
        ("partition", "iid", "'pathological' or 'dirichlet'"),
        ("hn-update", "avg", "'sequential' or 'mean'"),
        ("client-precision", "fp16", "'fp32' or 'bf16'"),
        ("num-server-rounds", 2.5, "valid integer"),
        ("run-name", "../x", "plain folder name"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(key, value, fragment):
    with pytest.raises(ConfigError) as info:
        load_run_config({key: value})
    message = str(info.value)
    assert f"'{key}'" in message
    assert repr(value) in message
    assert fragment in message


def test_classes_per_client_above_class_count():
    with pytest.raises(
        ConfigError, match="'classes-per-client' = 11.*between 1 and 10"
    ):
        load_run_config({"classes-per-client": 11})
    assert load_run_config({"classes-per-client": 11, "dataset": "cifar100"})


def test_unknown_key_is_refused():
    with pytest.raises(ConfigError, match="unknown run-config key 'num-round'"):
        load_run_config({"num-round": 3})


def test_unknown_strategy_lists_allowed():
    cfg = load_run_config({"strategy": "fedsomething"})
    with pytest.raises(
        ConfigError, match="'strategy' = 'fedsomething'.*allowed: .*mh-pfedhn"
    ):
        build_strategy(cfg)


def test_models_list_is_normalised():
    cfg = load_run_config({"models": " cnn, vgg8 "})
    assert cfg.model_list == ["cnn", "vgg8"]
