"""The base class of every algorithm: the hooks the engine calls.

An algorithm holds the server state of one method (a hypernetwork, prototypes,
an averaged vector, ...) and never drives the run: :class:`server_app.engine.Engine`
does the handshake, sampling, messaging, reply validation, evaluation,
checkpoints and results, and calls these hooks. A round, as in Flower's
``Strategy.start``:

1. :meth:`Algorithm.train_payload` for each sampled client (configure);
2. the engine sends and receives, and validates each reply against
   :meth:`Algorithm.expects` and :meth:`Algorithm.read_reply`;
3. :meth:`Algorithm.apply_train_replies` with the accepted replies (aggregate),
   or, for an algorithm with :attr:`Algorithm.sequential` rounds, one
   :meth:`Algorithm.apply_train_reply` per reply in a seeded order between
   :meth:`Algorithm.begin_ordered_round` and :meth:`Algorithm.end_ordered_round`;
4. :meth:`Algorithm.eval_payload` for every client (evaluate).

An algorithm reads only its :class:`Params`: a frozen dataclass of the run-config
keys it uses, declared next to the algorithm and filled from the run config in
one place (:meth:`Params.from_config`). Defaults live in the run-config schema
(:mod:`common.config`) only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar, Self

from flwr.app import RecordDict
from flwr.common.logger import log

from common.config import RunConfig

from ..checkpoint import holds_state_dict, load_optimizer, pack, pack_optimizer, unpack
from ..engine.registry import ClientInfo, ClientRegistry
from ..engine.replies import Expect, Reply


@dataclass(frozen=True)
class Params:
    """The run-config keys every algorithm reads; subclasses add their own.

    Field names are the snake_case attributes of
    :class:`common.config.RunConfig` (``fml-alpha`` is ``fml_alpha``).
    """

    seed: int
    #: Whether checkpoints keep the optimizer's moments (``checkpoint-optimizer``).
    checkpoint_optimizer: bool

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Self:
        """Every field from the same-named attribute of the validated ``cfg``."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})


class Algorithm(ABC):
    """Server state of one method and the hooks the engine calls.

    Parameters
    ----------
    params : Params
        The algorithm's keys of the run config (its :attr:`Params` type);
        :meth:`from_config` builds them.
    """

    #: Name under which the algorithm is registered (``strategy = "<name>"``).
    name: ClassVar[str] = ""
    #: Attributes that hold learned or random state, saved in checkpoints
    #: (modules by ``state_dict``, optimizers by parameter name, arrays,
    #: generators, values).
    checkpoint_attributes: ClassVar[tuple[str, ...]] = ()
    #: Optimizer attribute -> attribute of the module whose ``named_parameters``
    #: name its parameters (the checkpoint keys its state by those names).
    optimizer_modules: ClassVar[dict[str, str]] = {}

    #: The type of this algorithm's :attr:`params`.
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params
        self.clients = ClientRegistry()

    @classmethod
    def from_config(cls, cfg: RunConfig) -> Self:
        """The algorithm with its :attr:`Params` read from ``cfg``."""
        return cls(cls.Params.from_config(cfg))

    # -- state -------------------------------------------------------------------
    def start(self, clients: ClientRegistry) -> None:
        """Keep the engine's registry (it grows as clients join) and :meth:`setup`."""
        self.clients = clients
        self.setup(clients)

    @abstractmethod
    def setup(self, clients: ClientRegistry) -> None:
        """Build the server state for the registered clients (before round 1)."""

    def register(self, name: str, num_params: int) -> None:
        """Create the server state of a client that joined after the handshake."""
        return None

    # -- a round -----------------------------------------------------------------
    @abstractmethod
    def train_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Records sent to ``client`` for training (the engine adds ``config``)."""

    def eval_payload(self, client: ClientInfo, server_round: int) -> RecordDict:
        """Records sent to ``client`` for evaluation (default: same as training)."""
        return self.train_payload(client, server_round)

    def expects(self, client: ClientInfo) -> dict[str, Expect]:
        """Arrays a train reply of ``client`` must carry, by name (default none)."""
        return {}

    def read_reply(self, client: ClientInfo, arrays: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`apply_train_replies` receives of a reply's declared arrays
        (default: the arrays). Raise ``ValueError`` for a reply that cannot be
        used; the engine rejects it."""
        return arrays

    @abstractmethod
    def apply_train_replies(self, server_round: int, replies: list[Reply]) -> None:
        """Update the server state from the round's accepted train replies."""

    #: Whether rounds apply replies one at a time in a seeded order.
    sequential: bool = False

    def window(self, num_clients: int) -> int:
        """Sequential rounds: clients in flight at once (0 = all)."""
        return 0

    def begin_ordered_round(self, server_round: int) -> None:
        """Sequential rounds: before the first reply is applied."""
        return None

    def apply_train_reply(self, server_round: int, reply: Reply) -> None:
        """Sequential rounds: apply one accepted reply."""
        return None

    def end_ordered_round(
        self, server_round: int, replies: list[Reply], complete: bool
    ) -> None:
        """Sequential rounds: after the last reply. ``complete``: at least
        ``min-train-clients`` replies were applied (otherwise the round must
        change nothing)."""
        return None

    # -- after training ----------------------------------------------------------
    def after_training(self, results_dir: Path) -> None:
        """Once the training rounds are done (MH-pFedHN saves its hypernetwork)."""
        return None

    def begin_novel_phase(self) -> bool:
        """Prepare fitting clients that join after training; ``False``: none."""
        return False

    # -- reporting ---------------------------------------------------------------
    def client_details(self, client: ClientInfo) -> dict[str, Any]:
        """Extra per-client fields for ``clients.json`` (e.g. chunks and head)."""
        return {}

    def summary(self) -> None:
        """Log the algorithm's configuration."""
        log(INFO, "Strategy %s with %d clients", self.name, len(self.clients))

    # -- checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every attribute in :attr:`checkpoint_attributes`, packed."""
        state = {}
        for attr in self.checkpoint_attributes:
            value = getattr(self, attr)
            if attr in self.optimizer_modules:
                module = getattr(self, self.optimizer_modules[attr])
                keep = self.params.checkpoint_optimizer
                state[attr] = pack_optimizer(value, module) if keep else None
            else:
                state[attr] = pack(value)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after :meth:`setup` built the structure)."""
        for attr in self.checkpoint_attributes:
            current = getattr(self, attr)
            if attr in self.optimizer_modules:
                if state[attr] is None:
                    log(
                        WARNING,
                        "the checkpoint holds no %s state (checkpoint-optimizer = "
                        "false): it restarts from zero moments",
                        attr,
                    )
                    continue
                module = getattr(self, self.optimizer_modules[attr])
                load_optimizer(current, module, state[attr])
                continue
            if current is None and holds_state_dict(state[attr]):
                current = self.build_module(attr)
            setattr(self, attr, unpack(state[attr], current))

    def build_module(self, attr: str) -> Any:
        """Create the module behind attribute ``attr`` that is built lazily (on
        the first replies), so a checkpoint can load into it."""
        raise NotImplementedError(f"{type(self).__name__} cannot rebuild '{attr}'")
