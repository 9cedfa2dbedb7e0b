"""Client state that survives a SuperNode restart: node config ``state-dir``.

Flower keeps ``context.state`` in the SuperNode's memory, so a restarted SuperNode
starts with an empty one: the client would lose its BatchNorm statistics
(``model-buffers``), its personal model (``model-params``, strategies whose
clients keep their model) and any other array it keeps. With node config
``state-dir`` set, the ClientApp

- after every TRAIN message writes every ArrayRecord of ``context.state`` to
  ``<state-dir>/<client-name>.npz`` (a temporary file in the same folder, fsynced,
  then ``os.replace``: a crash mid-write leaves the previous file intact);
- when a message arrives at a SuperNode process that has not yet looked at the
  file (``context.state`` has no :data:`MARKER`), puts the saved records back into
  ``context.state`` before the client is built.

A file is only restored into the run that wrote it: ``context.state`` belongs to
one run, so a file left by an earlier run (same ``state-dir``) is ignored and
overwritten at the next save. An unreadable file stops the message with a
:class:`StateFileError` naming the file (move it away to start the client afresh).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.logger import log

#: Node config key naming the folder for the state files.
STATE_DIR_KEY = "state-dir"
#: ``context.state`` record marking a SuperNode process that synced with the file.
MARKER = "persist"
FORMAT = 1
_HEADER = "__header__"


class StateFileError(RuntimeError):
    """A saved client state file cannot be used; the message names the file."""


def state_path(context: Context, client_name: str) -> Path | None:
    """``<state-dir>/<client-name>.npz``, or ``None`` without ``state-dir``."""
    state_dir = str(context.node_config.get(STATE_DIR_KEY, "")).strip()
    if not state_dir:
        return None
    return Path(state_dir).expanduser() / f"{client_name}.npz"


def save_state(path: Path, state: RecordDict, meta: dict[str, Any]) -> int:
    """Write the ArrayRecords of ``state`` (and ``meta``) to ``path`` atomically.

    Returns the number of records written. On any failure the previous file is
    left as it was and the temporary file is removed.
    """
    arrays: dict[str, np.ndarray] = {}
    index: list[list[str]] = []
    for record_name, record in state.array_records.items():
        for key, array in record.items():
            slot = f"a{len(index)}"
            arrays[slot] = array.numpy()
            index.append([record_name, key, slot])
    header = {"format": FORMAT, **meta, "records": index}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return len({name for name, _, _ in index})


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, ArrayRecord]]:
    """The header and the ArrayRecords saved in ``path``.

    Raises :class:`StateFileError` (naming ``path``) when the file is not a state
    file this version can read.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data[_HEADER].tobytes().decode())
            if header.get("format") != FORMAT:
                raise ValueError(f"format {header.get('format')!r}, expected {FORMAT}")
            contents: dict[str, dict[str, np.ndarray]] = {}
            for record_name, key, slot in header["records"]:
                contents.setdefault(record_name, {})[key] = data[slot]
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        EOFError,
        zipfile.BadZipFile,
    ) as err:
        raise StateFileError(
            f"client state file {path} cannot be read ({type(err).__name__}: {err}); "
            "move it away to start this client without its saved state"
        ) from err
    records = {
        name: ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
        )
        for name, arrays in contents.items()
    }
    return header, records


def restore(context: Context, client_name: str) -> int:
    """Put the saved records back into a fresh ``context.state``.

    Does nothing without ``state-dir``, once this SuperNode process has synced
    (:data:`MARKER` in ``context.state``), without a file, or when the file was
    written by another run. Returns the number of records restored.
    """
    path = state_path(context, client_name)
    if path is None or MARKER in context.state:
        return 0
    restored = 0
    if path.exists():
        header, records = load_state(path)
        if header.get("run-id") != context.run_id:
            log(
                INFO,
                "client '%s': %s holds run %s's state, not run %s's; not restored",
                client_name,
                path,
                header.get("run-id"),
                context.run_id,
            )
        else:
            for name, record in records.items():
                if name not in context.state:
                    context.state[name] = record
                    restored += 1
            log(
                INFO,
                "client '%s': restored %d state record(s) (%s) saved after round "
                "%s from %s",
                client_name,
                restored,
                ", ".join(sorted(records)) or "none",
                header.get("round"),
                path,
            )
    context.state[MARKER] = ConfigRecord({"file": str(path)})
    return restored


def save(context: Context, client_name: str, server_round: int) -> int:
    """After TRAIN: write ``context.state``'s ArrayRecords to the state file."""
    path = state_path(context, client_name)
    if path is None:
        return 0
    meta = {"client-name": client_name, "run-id": context.run_id, "round": server_round}
    count = save_state(path, context.state, meta)
    context.state[MARKER] = ConfigRecord({"file": str(path)})
    return count


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
