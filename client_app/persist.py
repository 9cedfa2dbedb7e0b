"""Client state on disk: it survives a SuperNode restart and a resumed run.

Flower keeps ``context.state`` in memory, so a restarted SuperNode, and every
client of a run resumed from a checkpoint (a new run for Flower), starts with an
empty one: the client would lose its BatchNorm statistics (``model-buffers``), its
personal model (``model-params``, strategies whose clients keep their model) and
any other array it keeps. With a state folder (node config ``state-dir``, or
run-config ``client-state-dir`` where no node config can be given, as in a
simulation) the ClientApp

- after every TRAIN message writes every ArrayRecord of ``context.state`` to
  ``<folder>/<client-name>.npz`` (a temporary file in the same folder, fsynced,
  then ``os.replace``: a crash mid-write leaves the previous file intact). When
  the server may have written a checkpoint since that file was saved, the file
  first moves to ``<client-name>.checkpointed.npz``: the state as of the last
  checkpoint, which a resumed run needs when later rounds were lost;
- when a message arrives at a SuperNode process that has not yet looked at the
  files (``context.state`` has no :data:`MARKER`), puts the saved records back into
  ``context.state`` before the client is built.

A file is restored only into its own run, named by the server's run key
(:data:`common.protocol.RUN_KEY`, kept across ``resume-from``): written by the same
Flower run (a SuperNode restart), or saved at or before the checkpoint round the
run resumed after (:data:`common.protocol.RESUMED_AT`). Anything else (another
run, or rounds the resumed run repeats) is ignored and overwritten at the next
save, so a resumed run equals an uninterrupted one. An unreadable file stops the
message with a :class:`StateFileError` naming the file (move it away to start the
client afresh).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common.logger import log

from common import protocol as P

if TYPE_CHECKING:
    from common.config import RunConfig

#: Node config key naming the folder for the state files.
STATE_DIR_KEY = "state-dir"
#: ``context.state`` record marking a SuperNode process that synced with the file.
MARKER = "persist"
FORMAT = 1
_HEADER = "__header__"


class StateFileError(RuntimeError):
    """A saved client state file cannot be used; the message names the file."""


@dataclass(frozen=True)
class StateFiles:
    """Where one client's state files live, and for which run."""

    folder: Path
    name: str
    #: The server's run key and the round it resumed after (0: not resumed).
    run_key: str
    resumed_at: int
    #: Run-config ``checkpoint-every``: which rounds the server may checkpoint.
    checkpoint_every: int

    @classmethod
    def of(
        cls, context: Context, cfg: RunConfig, name: str, config: ConfigRecord
    ) -> StateFiles | None:
        """The files of client ``name``, or ``None`` without a state folder."""
        folder = str(context.node_config.get(STATE_DIR_KEY, "")).strip()
        folder = folder or cfg.client_state_dir
        if not folder:
            return None
        return cls(
            Path(folder).expanduser(),
            name,
            str(config.get(P.RUN_KEY, "")),
            int(config.get(P.RESUMED_AT, 0)),
            cfg.checkpoint_every,
        )

    @property
    def latest(self) -> Path:
        return self.folder / f"{self.name}.npz"

    @property
    def checkpointed(self) -> Path:
        return self.folder / f"{self.name}.checkpointed.npz"

    def last_checkpoint_before(self, server_round: int) -> int:
        """The latest round before ``server_round`` the server may have
        checkpointed: a multiple of ``checkpoint-every``, or the resume round."""
        every = self.checkpoint_every
        periodic = (server_round - 1) // every * every if every else 0
        return max(periodic, self.resumed_at)


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


def restore(context: Context, files: StateFiles | None) -> int:
    """Put the saved records of this run back into a fresh ``context.state``.

    Does nothing without a state folder, once this SuperNode process has synced
    (:data:`MARKER` in ``context.state``), or when neither file holds this run's
    state (see the module docstring). Returns the number of records restored.
    """
    if files is None or MARKER in context.state:
        return 0
    restored, latest_round = 0, -1
    for path in (files.latest, files.checkpointed):
        if not path.exists():
            continue
        header, records = load_state(path)
        same_run = header.get("run-key") == files.run_key
        same_process_run = header.get("run-id") == context.run_id
        round_ = int(header.get("round", -1))
        if not same_run or not (same_process_run or round_ <= files.resumed_at):
            log(INFO, "client '%s': %s holds another run's state (or rounds this "
                "run repeats); not restored", files.name, path)  # fmt: skip
            continue
        for name, record in records.items():
            if name not in context.state:
                context.state[name] = record
                restored += 1
        if path == files.latest:
            latest_round = round_
        log(INFO, "client '%s': restored %d state record(s) (%s) saved after round "
            "%s from %s", files.name, restored, ", ".join(sorted(records)) or "none",
            round_, path)  # fmt: skip
        break
    _mark(context, files, latest_round)
    return restored


def save(context: Context, files: StateFiles | None, server_round: int) -> int:
    """After TRAIN: write ``context.state``'s ArrayRecords to the latest file,
    first keeping the previous one as the checkpointed state when the server may
    have checkpointed since it was saved."""
    if files is None:
        return 0
    previous = int(context.state[MARKER]["round"]) if MARKER in context.state else -1
    kept = 0 <= previous <= files.last_checkpoint_before(server_round)
    if kept and files.latest.exists():
        os.replace(files.latest, files.checkpointed)
    meta = {
        "client-name": files.name,
        "run-id": context.run_id,
        "run-key": files.run_key,
        "round": server_round,
    }
    count = save_state(files.latest, context.state, meta)
    _mark(context, files, server_round)
    return count


def _mark(context: Context, files: StateFiles, latest_round: int) -> None:
    """Synced; ``round``: the round of the latest file when it holds this run's
    state (-1 when it does not, so it is never kept as the checkpointed one)."""
    context.state[MARKER] = ConfigRecord(
        {"file": str(files.latest), "round": latest_round}
    )


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (best effort: not every platform allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
