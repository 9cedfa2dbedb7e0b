"""Checkpoints: the complete server state of a run, written atomically.

``<run dir>/checkpoint.pt`` holds one dictionary (``torch.save``, read back with
``weights_only=True``, so loading never executes code):

``format``
    :data:`FORMAT`, bumped when the layout changes.
``strategy``, ``config``
    The strategy name and the resolved run config (dash-case keys) of the run.
``round``
    The last training round whose update is in the state.
``waiting``
    That round's record when its evaluation rides on the next round's messages
    (carried evaluation), else ``None``.
``metrics``
    Every row written to ``metrics.jsonl`` so far.
``clients``
    The registry (names, sizes, example counts); node ids are not kept.
``state``
    :func:`server_app.engine.checkpointing.state_dict`: random generators, and
    every attribute the strategy lists in ``checkpoint_attributes``
    (hypernetwork, optimizer, prototypes, ...). Modules are saved by
    ``state_dict`` (keyed by parameter name); an optimizer by the names of its
    parameters in the module that owns
    them (:func:`pack_optimizer`), never by position: a resumed run registers its
    clients in name order, the original run in order of arrival.

A write goes to ``checkpoint.pt.tmp``, is flushed to disk, and then renamed over
the old file: the previous checkpoint stays complete until the new one is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import ConfigError, RunConfig

CHECKPOINT_FILE = "checkpoint.pt"
#: Layout version: 2 keys optimizer state by parameter name (:func:`pack_optimizer`).
FORMAT = 2

#: Run-config keys a resumed run may change; every other key must match.
MAY_DIFFER = frozenset(
    {
        "num-server-rounds",
        "checkpoint-every",
        "checkpoint-optimizer",
        "resume-from",
        "client-state-dir",
        "round-timeout",
        "results-dir",
        "run-name",
        "data-dir",
        "download",
        "device",
        "min-clients",
        "novel-rounds",
    }
)


class CheckpointError(ConfigError):
    """A checkpoint cannot be used; the message names the file and the mismatch."""


def checkpoint_path(resume_from: str, results_dir: str = ".") -> Path:
    """The checkpoint file named by ``resume-from``.

    ``resume-from`` is a run directory or a checkpoint file; a relative path is
    looked up in ``results-dir`` first (so a run name is enough), then in the
    working directory.
    """
    given = Path(resume_from).expanduser()
    candidates = [given]
    if not given.is_absolute():
        candidates = [Path(results_dir).expanduser() / given, given]
    for path in candidates:
        path = path.resolve()
        if path.is_dir():
            path = path / CHECKPOINT_FILE
        if path.is_file():
            return path
    raise CheckpointError(
        f"run-config key 'resume-from' = {resume_from!r} is not allowed: no "
        f"checkpoint at {' or '.join(str(c.resolve()) for c in candidates)}; give a "
        f"run directory holding {CHECKPOINT_FILE} (or its name inside results-dir) "
        "or the checkpoint file itself"
    )


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint; a truncated or foreign file raises CheckpointError.

    ``mmap``: map the tensors instead of reading them (a launcher's quick check
    of a multi-GB file).
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for a damaged file
        # torch's own text suggests weights_only=False, which would run code.
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(err).__name__}): it is "
            "truncated or not a checkpoint of this app; give the checkpoint.pt "
            "of a run of this app, or its run folder"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else None
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}; this version reads only format "
            f"{FORMAT} (format 1 stored optimizer state by position, which cannot be "
            "mapped back to parameters safely); start the run afresh"
        )
    return payload


def check_compatible(payload: dict[str, Any], cfg: RunConfig, path: Path) -> None:
    """Refuse a checkpoint of another strategy or an incompatible config."""
    if payload["strategy"] != cfg.strategy:
        raise CheckpointError(
            f"checkpoint {path} was written by strategy '{payload['strategy']}'; "
            f"this run uses '{cfg.strategy}'"
        )
    # A key newer than the checkpoint had its default's behaviour then.
    saved = RunConfig().flat() | payload["config"]
    differ = [
        f"{key} (checkpoint {saved.get(key)!r}, now {value!r})"
        for key, value in cfg.flat().items()
        if key not in MAY_DIFFER and saved.get(key) != value
    ]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} comes from an incompatible run config: "
            + "; ".join(differ)
            + f". Only these keys may change on resume: {', '.join(sorted(MAY_DIFFER))}"
        )
    if payload["round"] > cfg.num_server_rounds:
        raise CheckpointError(
            f"checkpoint {path} is at round {payload['round']}, beyond "
            f"num-server-rounds = {cfg.num_server_rounds}"
        )


# -- strategy attributes <-> checkpoint values --------------------------------------
def pack(value: Any) -> Any:
    """A checkpoint-safe form of a strategy attribute (tensors and plain values).

    An optimizer is refused: its ``state_dict`` is positional, so it is saved by
    parameter name with :func:`pack_optimizer` instead.
    """
    if isinstance(value, torch.optim.Optimizer):
        raise TypeError(
            "an optimizer is checkpointed by parameter name (pack_optimizer): list "
            "it in the strategy's optimizer_modules"
        )
    if isinstance(value, nn.Module):
        return {"__state_dict__": value.state_dict()}
    if isinstance(value, torch.Generator):
        return {"__generator__": value.get_state()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, dict):
        return {"__dict__": {k: pack(v) for k, v in value.items()}}
    if isinstance(value, list | tuple):
        return {"__list__": [pack(v) for v in value]}
    return value


def holds_state_dict(saved: Any) -> bool:
    """Whether ``saved`` is a packed module (needs an object)."""
    return isinstance(saved, dict) and set(saved) == {"__state_dict__"}


def unpack(saved: Any, current: Any) -> Any:
    """The attribute value for ``saved``; modules load in place."""
    if isinstance(saved, dict) and len(saved) == 1:
        ((tag, inner),) = saved.items()
        if tag == "__state_dict__":
            current.load_state_dict(inner)
            return current
        if tag == "__generator__":
            current.set_state(inner)
            return current
        if tag == "__ndarray__":
            return inner.numpy()
        if tag == "__dict__":
            return {
                k: unpack(
                    v, (current or {}).get(k) if isinstance(current, dict) else None
                )
                for k, v in inner.items()
            }
        if tag == "__list__":
            return [unpack(v, None) for v in inner]
    return saved


# -- optimizers, by parameter name ----------------------------------------------------
def _parameter_names(optimizer: torch.optim.Optimizer, module: nn.Module) -> list[str]:
    """The names in ``module`` of the optimizer's parameters, in its order."""
    names = {id(p): n for n, p in module.named_parameters()}
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = sum(id(p) not in names for p in flat)
    if unknown:
        raise ValueError(f"{unknown} optimizer parameters are not in the module")
    return [names[id(p)] for p in flat]


def pack_optimizer(
    optimizer: torch.optim.Optimizer | None, module: nn.Module
) -> dict[str, Any] | None:
    """``optimizer``'s state keyed by the names of its parameters in ``module``.

    ``{"__optimizer__": {"state": {name: per-parameter state}, "groups": [group
    settings with "params": [names]]}}``: torch's own ``state_dict`` with every
    position replaced by the parameter's name (``embeddings.client-1``,
    ``heads.4.weight``, ...), so it loads onto the right parameters whatever
    order they were registered in.
    """
    if optimizer is None:
        return None
    names = _parameter_names(optimizer, module)
    saved = optimizer.state_dict()
    return {
        "__optimizer__": {
            "state": {names[i]: state for i, state in saved["state"].items()},
            "groups": [
                group | {"params": [names[i] for i in group["params"]]}
                for group in saved["param_groups"]
            ],
        }
    }


def load_optimizer(
    optimizer: torch.optim.Optimizer | None, module: nn.Module, saved: Any
) -> None:
    """Load :func:`pack_optimizer`'s ``saved`` into ``optimizer``, by name.

    The parameters must be the same names with the same shapes on both sides;
    otherwise :class:`CheckpointError` names each that differs. A parameter's
    group settings (``lr``, ``betas``, ...) are those of its saved group.
    """
    if saved is None or optimizer is None:
        if saved is not optimizer:
            raise CheckpointError(
                "checkpoint optimizer state does not match this run: "
                f"{'none saved' if saved is None else 'saved, but no optimizer here'}"
            )
        return
    if not isinstance(saved, dict) or set(saved) != {"__optimizer__"}:
        raise CheckpointError(
            "checkpoint optimizer state is not keyed by parameter name"
        )
    saved = saved["__optimizer__"]
    names = _parameter_names(optimizer, module)
    params = dict(module.named_parameters())
    settings = {
        n: {k: v for k, v in group.items() if k != "params"}
        for group in saved["groups"]
        for n in group["params"]
    }
    index = {n: i for i, n in enumerate(names)}
    problems = []
    if missing := [n for n in names if n not in settings]:
        problems.append(f"not in the checkpoint: {', '.join(missing)}")
    known = settings.keys() | saved["state"].keys()
    if extra := sorted(n for n in known if n not in index):
        problems.append(f"only in the checkpoint: {', '.join(extra)}")
    for name, state in saved["state"].items():
        shapes = {
            tuple(v.shape) for v in state.values() if torch.is_tensor(v) and v.dim()
        }
        if name in index and shapes - {tuple(params[name].shape)}:
            problems.append(
                f"{name} has shape {tuple(params[name].shape)}, its saved state "
                f"{', '.join(map(str, sorted(shapes)))}"
            )
    if problems:
        raise CheckpointError(
            "checkpoint optimizer state does not match this run's parameters ("
            + "; ".join(problems)
            + ")"
        )
    groups, start = [], 0
    for group in optimizer.param_groups:
        members = names[start : start + len(group["params"])]
        start += len(members)
        own = {k: v for k, v in group.items() if k != "params"}
        options = settings[members[0]] if members else own
        if any(settings[n] != options for n in members):
            raise CheckpointError(
                "checkpoint optimizer state gives parameters of one group different "
                f"settings: {', '.join(members)}"
            )
        groups.append(options | {"params": [index[n] for n in members]})
    optimizer.load_state_dict(
        {
            "state": {index[n]: state for n, state in saved["state"].items()},
            "param_groups": groups,
        }
    )
