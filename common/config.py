"""Run configuration: one typed, validated view of ``[tool.flwr.app.config]``.

Flower hands both apps a flat ``run_config`` mapping with dash-case keys (defaults
from ``pyproject.toml``, overridden by ``flwr run --run-config``). Both the
ServerApp and the ClientApp call :func:`load_run_config` once, so a bad value stops
the run before round 1 with one message naming the key, the value and what is
allowed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.datasets import (
    DATASETS,
    DEFAULT_EMNIST_SPLIT,
    EMNIST_SPLITS,
    dataset_info,
)


class ConfigError(ValueError):
    """A run-config value is not allowed; the message says which and why."""


def _dash(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Every run-config key of the app (see the README's table for meanings)."""

    model_config = ConfigDict(
        alias_generator=_dash, populate_by_name=True, extra="forbid", frozen=True
    )

    # What runs (``strategy`` is checked against the server's registry)
    strategy: str = "mh-pfedhn"
    num_server_rounds: int = Field(40, ge=0)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    eval_every: int = Field(1, ge=1)
    min_clients: int = Field(2, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)
    #: Messages of one exchange pushed but not yet answered, at most (0 = all at
    #: once); bounds what waits in the SuperLink (see
    #: :mod:`server_app.engine.exchange`).
    max_in_flight: int = Field(64, ge=0)
    seed: int = Field(42, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Data (``dataset``: a name of :data:`common.datasets.DATASETS`, the registry)
    dataset: str = "cifar10"
    #: The EMNIST split (:data:`common.datasets.EMNIST_SPLITS`); ``emnist`` only.
    emnist_split: str = DEFAULT_EMNIST_SPLIT
    data_dir: str = "~/.cache/mh-pfedhn/data"
    download: bool = True
    partition: Literal["pathological", "dirichlet"] = "pathological"
    classes_per_client: int = Field(2, ge=1)
    dirichlet_alpha: float = Field(0.1, gt=0.0)
    dirichlet_min_size: int = Field(31, ge=1)

    # Client models and local training
    models: str = "cnn"
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    client_lr: float = Field(5e-3, gt=0.0)
    client_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    client_weight_decay: float = Field(5e-4, ge=0.0)
    client_grad_clip: float = Field(50.0, gt=0.0)
    #: BatchNorm statistics a client evaluates with: ``stored`` (the paper: those
    #: kept from its own last training), ``recalibrate`` (recomputed for the
    #: evaluated weights on its train split first, then the stored ones restored;
    #: :func:`client_app.training.recalibrate_batchnorm`) or ``both`` (the stored
    #: reading as ``accuracy``, the recalibrated one as ``accuracy_recalibrated``).
    #: Evaluation only.
    bn_eval: Literal["stored", "recalibrate", "both"] = "stored"
    #: Intra-op threads torch uses in every ClientApp message (0: the process's
    #: own, i.e. all cores in deployment, 1 per simulated client under Ray).
    client_threads: int = Field(0, ge=0)
    #: Arithmetic of the local training steps: ``fp32`` (the paper) or ``bf16``
    #: (autocast: convolutions and matrix products in bfloat16; weights, optimizer,
    #: updates and evaluation in fp32).
    client_precision: Literal["fp32", "bf16"] = "fp32"

    # Hypernetwork
    hn_lr: float = Field(2e-4, gt=0.0)
    hn_grad_clip: float = Field(50.0, gt=0.0)
    hn_update: Literal["sequential", "mean"] = "sequential"
    hn_window: int = Field(2, ge=0)
    #: Order of a sequential round: ``random`` (a seeded permutation) or
    #: ``by-size``: clients of equal size side by side in the window, so no core
    #: waits for a large model beside a small one (the same as ``random`` when
    #: all clients have one size or ``hn-window = 1``).
    hn_order: Literal["random", "by-size"] = "random"
    embed_dim: int = Field(64, ge=1)
    embed_init_std: float = Field(0.002, gt=0.0)
    hidden_dim: int = Field(128, ge=1)
    hidden_layers: int = Field(3, ge=1)
    chunk_size: int = Field(3072, ge=1)
    #: ``per-position`` (the paper) or a compact head: ``shared`` (one map per
    #: head) or ``low-rank`` (per-position maps of rank ``head-rank``); see
    #: :mod:`server_app.hypernet`.
    head_type: Literal["per-position", "shared", "low-rank"] = "per-position"
    head_rank: int = Field(8, ge=1)
    #: ``streams``: extractor from the global stream seeded by ``seed``, heads and
    #: embeddings from a stream derived from it; ``reference``: one stream in the
    #: authors' script's order of draws (:func:`server_app.hypernet.reference_init_`).
    hn_init: Literal["streams", "reference"] = "streams"

    # What crosses the wire for theta/delta (MH-pFedHN, MH-pFedHNGD): ``fp32``,
    # ``fp16`` (both directions in half precision; the server keeps fp32) or
    # ``topk`` (theta fp32 down, the ``topk-fraction`` largest-magnitude delta
    # entries up as indices + values); see :mod:`common.transfer`.
    transfer: Literal["fp32", "fp16", "topk"] = "fp32"
    topk_fraction: float = Field(0.1, gt=0.0, le=1.0)

    # Clients that join after training (generalisation)
    train_clients: int = Field(0, ge=0)
    novel_rounds: int = Field(0, ge=0)
    novel_lr: float = Field(2e-4, gt=0.0)
    hypernet_from: str = ""

    # MH-pFedHNGD
    global_model: str = "cnn"
    gd_alpha: float = Field(0.2, ge=0.0, le=1.0)
    gd_temperature: float = Field(15.0, gt=0.0)

    # Baselines (HtFLlib's defaults; see each strategy module's docstring)
    reg_lambda: float = Field(1.0, ge=0.0)
    fml_alpha: float = Field(0.5, ge=0.0, le=1.0)
    fml_beta: float = Field(0.5, ge=0.0, le=1.0)
    fedkd_energy_start: float = Field(0.95, gt=0.0, le=1.0)
    fedkd_energy_end: float = Field(0.98, gt=0.0, le=1.0)
    server_lr: float = Field(0.01, gt=0.0)
    server_epochs: int = Field(100, ge=1)
    tgp_margin: float = Field(100.0, ge=0.0)
    pfedhn_lr: float = Field(0.01, gt=0.0)
    pfedhn_weight_decay: float = Field(1e-3, ge=0.0)
    pfedhn_embed_dim: int = Field(0, ge=0)
    pfedhn_hidden_dim: int = Field(100, ge=1)

    # Results, checkpoints and robustness
    results_dir: str = "~/mh-pfedhn-results"
    run_name: str = ""
    checkpoint_every: int = Field(10, ge=0)
    #: Keep the optimizer's moments in checkpoints (twice the hypernetwork's size):
    #: needed for a resume that equals an uninterrupted run.
    checkpoint_optimizer: bool = True
    resume_from: str = ""
    #: Simulation: each client's state on disk, so a resumed run keeps it
    #: (deployment sets node config ``state-dir`` per SuperNode instead).
    client_state_dir: str = ""
    max_delta_norm: float = Field(0.0, ge=0.0)
    min_train_clients: int = Field(1, ge=1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset; allowed: {', '.join(DATASETS)}")
        return value

    @field_validator("emnist_split")
    @classmethod
    def _known_emnist_split(cls, value: str) -> str:
        if value not in EMNIST_SPLITS:
            raise ValueError(
                f"unknown EMNIST split; allowed: {', '.join(EMNIST_SPLITS)}"
            )
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: str) -> str:
        from common.models import available_models

        names = [m.strip() for m in value.split(",")]
        allowed = available_models()
        if not value.strip() or any(not m for m in names):
            raise ValueError(
                "must be a comma-separated list of model names, e.g. 'cnn,vgg8'"
            )
        unknown = [m for m in names if m not in allowed]
        if unknown:
            raise ValueError(
                f"unknown model {', '.join(unknown)}; allowed: {', '.join(allowed)}"
            )
        return ",".join(names)

    @field_validator("global_model")
    @classmethod
    def _known_global_model(cls, value: str) -> str:
        from common.models import available_models

        if value not in available_models():
            raise ValueError(f"unknown model; allowed: {', '.join(available_models())}")
        return value

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, value: str) -> str:
        if value and (value in {".", ".."} or "/" in value or "\\" in value):
            raise ValueError("must be a plain folder name (no path separators)")
        return value

    def torch_device(self) -> torch.device:
        """``device`` as a torch device; ``auto`` is CUDA when available, else CPU."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "run-config key 'device' = 'cuda' is not allowed here: CUDA is not "
                "available; use 'auto' or 'cpu'"
            )
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def model_list(self) -> list[str]:
        """``models`` as a list, in the order clients are assigned to them."""
        return self.models.split(",")

    def flat(self) -> dict[str, Any]:
        """The resolved configuration with dash-case keys, as written to disk."""
        return self.model_dump(by_alias=True)


#: Strategies that train one architecture for every client.
HOMOGENEOUS_STRATEGIES = ("fedavg", "pfedhn")
#: The MH-pFedHN hypernetwork strategies (chunked heads, theta/delta exchange).
MH_STRATEGIES = ("mh-pfedhn", "mh-pfedhngd")
#: Strategies that can send theta/delta lighter than float32 (``transfer``).
TRANSFER_STRATEGIES = MH_STRATEGIES


def _check_combinations(cfg: RunConfig) -> None:
    if cfg.strategy in HOMOGENEOUS_STRATEGIES and len(set(cfg.model_list)) > 1:
        raise ConfigError(
            f"run-config key 'models' = {cfg.models!r} is not allowed with strategy "
            f"'{cfg.strategy}': it trains one architecture for every client, so "
            "'models' must name a single model (e.g. 'cnn'); use a model-"
            "heterogeneous strategy for a mixed list"
        )
    if cfg.transfer != "fp32" and cfg.strategy not in TRANSFER_STRATEGIES:
        raise ConfigError(
            f"run-config key 'transfer' = {cfg.transfer!r} is not allowed with "
            f"strategy '{cfg.strategy}': it sends float32 only; 'fp16' and 'topk' "
            f"are supported by {', '.join(TRANSFER_STRATEGIES)}"
        )
    if cfg.hn_init == "reference" and (
        cfg.strategy not in MH_STRATEGIES or cfg.head_type != "per-position"
    ):
        raise ConfigError(
            f"run-config key 'hn-init' = {cfg.hn_init!r} is not allowed with strategy "
            f"'{cfg.strategy}' and head-type '{cfg.head_type}': the reference order "
            "of draws exists for the per-position heads of "
            f"{', '.join(MH_STRATEGIES)} only; use 'streams'"
        )
    if cfg.num_server_rounds == 0 and cfg.novel_rounds == 0:
        raise ConfigError(
            "run-config key 'num-server-rounds' = 0 is not allowed with novel-rounds "
            "= 0: the run would do nothing; use at least 1 (0 rounds only fit the "
            "novel clients of a trained hypernetwork: set novel-rounds, "
            "train-clients and hypernet-from)"
        )
    if cfg.fedkd_energy_start > cfg.fedkd_energy_end:
        raise ConfigError(
            f"run-config key 'fedkd-energy-start' = {cfg.fedkd_energy_start} is not "
            f"allowed: it must not exceed fedkd-energy-end = {cfg.fedkd_energy_end}"
        )
    if cfg.emnist_split != DEFAULT_EMNIST_SPLIT and cfg.dataset != "emnist":
        raise ConfigError(
            f"run-config key 'emnist-split' = {cfg.emnist_split!r} is not allowed with "
            f"dataset '{cfg.dataset}': it selects the split of 'emnist' only; leave "
            f"it at '{DEFAULT_EMNIST_SPLIT}'"
        )
    # imagefolder finds its class count in the data: the clients check it.
    classes = dataset_info(cfg.dataset, emnist_split=cfg.emnist_split).num_classes
    if cfg.partition == "pathological" and 0 < classes < cfg.classes_per_client:
        raise ConfigError(
            f"run-config key 'classes-per-client' = {cfg.classes_per_client} is not "
            f"allowed: dataset '{cfg.dataset}' has {classes} classes, so it must be "
            f"between 1 and {classes}"
        )
    for key in ("client-lr", "hn-lr", "dirichlet-alpha", "server-lr", "pfedhn-lr"):
        value = getattr(cfg, key.replace("-", "_"))
        if not math.isfinite(value):
            raise ConfigError(
                f"run-config key '{key}' = {value} is not allowed: must be finite"
            )


def _explain(err: ValidationError, raw: Mapping[str, Any]) -> str:
    lines = []
    for item in err.errors():
        key = str(item["loc"][0]) if item["loc"] else "?"
        if item["type"] == "extra_forbidden":
            lines.append(
                f"unknown run-config key '{key}'; allowed keys: "
                + ", ".join(sorted(RunConfig().flat()))
            )
            continue
        value = raw.get(key, item.get("input"))
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"run-config key '{key}' = {value!r} is not allowed: {message}")
    return "; ".join(lines)


def load_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower ``run_config`` mapping into a :class:`RunConfig`.

    Raises
    ------
    ConfigError
        With one message naming every offending key, its value and what is allowed.
    """
    try:
        cfg = RunConfig.model_validate(dict(raw))
    except ValidationError as err:
        raise ConfigError(_explain(err, raw)) from None
    _check_combinations(cfg)
    return cfg
